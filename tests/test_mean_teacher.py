"""D2CT.MEAN_TEACHER: the teacher's instances carried into the strong view, the EMA update, the
config checks, the two-view mapper, and a tiny real training run that resumes with its teacher."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import Instances

from d2ct.config import setup_cfg
from d2ct.engine.mean_teacher import TwoViewMapper, ema_update, pseudo_instances
from d2ct.errors import ConfigError

from .conftest import TINY_OPTS, box_mask, run_tool, train_tiny

DEMO = "configs/demo/radiologist_r50.yaml"
MT = ["D2CT.MEAN_TEACHER.ENABLED", "True", "D2CT.MEAN_TEACHER.UNLABELLED_DATASETS", "('phantom_unlabelled',)",
      "D2CT.AUGMENT.STUDENT.ENABLED", "True"]


def _found(masks, scores) -> Instances:
    inst = Instances(masks[0].shape)
    inst.pred_masks = torch.from_numpy(np.stack(masks))
    inst.scores = torch.tensor(scores)
    inst.pred_classes = torch.zeros(len(scores), dtype=torch.long)
    return inst


def test_pseudo_instances_follow_the_strong_views_geometry():
    square, small = box_mask(64, 64, 10, 30, 20, 44), box_mask(64, 64, 50, 54, 2, 6)
    found = _found([square, small, box_mask(64, 64, 40, 60, 40, 60)], [0.9, 0.8, 0.3])
    # the strong view: rotated 30 degrees about the centre, then shifted right by 4 pixels
    rotate = T.RotationTransform(64, 64, angle=30, expand=False)
    shift = T.PadTransform(4, 0, 0, 0, 60, 64)
    tfm = T.TransformList([rotate, T.CropTransform(0, 0, 60, 64), shift])
    target = pseudo_instances(found, tfm, (64, 64), threshold=0.5, min_area=0)
    assert len(target) == 2  # the 0.3 instance is below the threshold
    expected = tfm.apply_segmentation(square.astype(np.uint8)) > 0
    assert expected.sum() > 300 and (target.gt_masks.tensor[0].numpy() == expected).all()
    ys, xs = np.nonzero(expected)  # the box is tight around the warped mask, not the rotated box
    assert target.gt_boxes.tensor[0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # a structure too small after the warp is dropped
    assert len(pseudo_instances(found, tfm, (64, 64), threshold=0.5, min_area=17)) == 1
    empty = pseudo_instances(_found([square], [0.1]), tfm, (64, 64), threshold=0.5)
    assert len(empty) == 0 and empty.gt_masks.tensor.shape == (0, 64, 64)


def test_ema_update_moves_the_teacher_toward_the_student():
    teacher, student = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
    student.num_batches_tracked += 7
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, torch.full((3,), 1.2))
    assert teacher.num_batches_tracked.item() == 7  # integer buffers are copied
    assert torch.allclose(student.weight, torch.full((3,), 3.0))  # the student is not touched


def test_mean_teacher_settings_are_checked():
    with pytest.raises(ConfigError, match="needs D2CT.MEAN_TEACHER.UNLABELLED_DATASETS"):
        setup_cfg(DEMO, ["D2CT.MEAN_TEACHER.ENABLED", "True"])
    with pytest.raises(ConfigError, match="needs D2CT.AUGMENT.STUDENT.ENABLED True"):
        setup_cfg(DEMO, MT[:4])
    with pytest.raises(ConfigError, match="EMA_DECAY must lie strictly between 0 and 1, got 1.0"):
        setup_cfg(DEMO, MT + ["D2CT.MEAN_TEACHER.EMA_DECAY", "1.0"])
    with pytest.raises(ConfigError, match="UNSUP_LOSSES: loss_nope; choose from"):
        setup_cfg(DEMO, MT + ["D2CT.MEAN_TEACHER.UNSUP_LOSSES", "['loss_cls', 'loss_nope']"])
    assert setup_cfg(DEMO, MT).D2CT.MEAN_TEACHER.ENABLED


def test_two_view_mapper_makes_the_strong_view_from_the_weak_one(tiny_phantom):
    from detectron2.data import DatasetCatalog

    from d2ct.data.register import register_challenge_dataset

    register_challenge_dataset("mtview", tiny_phantom)

    cfg = setup_cfg(DEMO, MT + ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128"])
    mapper = TwoViewMapper(cfg, is_train=True)
    pool = DatasetCatalog.get("mtview_unlabelled")
    assert pool and all(not d.get("annotations") for d in pool)
    np.random.seed(0)
    views = [mapper(d) for d in pool[:4]]
    for v in views:
        weak = v["image"].numpy().transpose(1, 2, 0)
        # the kept transforms redo the strong view from the weak one exactly: what the teacher
        # draws on the weak view lands where the student sees it
        assert np.array_equal(v["strong_transforms"].apply_image(weak), v["strong_image"].numpy().transpose(1, 2, 0))
        assert v["strong_image"].shape[1:] == (96, 96) and "instances" not in v
    assert any(not torch.equal(v["image"], v["strong_image"]) for v in views)


@pytest.mark.timeout(900)
def test_a_tiny_mean_teacher_run_trains_and_resumes_with_its_teacher(tiny_phantom, tmp_path):
    opts = [*MT, "D2CT.MEAN_TEACHER.SCORE_THRESHOLD", "0.0", "D2CT.MEAN_TEACHER.EMA_DECAY", "0.5",
            "D2CT.AUGMENT.STUDENT.COPY_PASTE_PROB", "0.0", "SOLVER.CHECKPOINT_PERIOD", "2",
            "DATALOADER.NUM_WORKERS", "1"]  # labelled slices read by a worker process, as in real runs
    out = train_tiny(DEMO, tiny_phantom, tmp_path / "mt", *opts)
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if "loss_cls_unsup" in line]
    assert rows and all(np.isfinite(r["loss_cls_unsup"]) and "loss_box_reg_unsup" not in r for r in rows)
    assert rows[-1]["pseudo_instances_per_slice"] > 0  # threshold 0: the untrained teacher's instances
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    teacher, student = final["mean_teacher"], final["model"]
    assert teacher.keys() == student.keys()
    moved = [k for k in student if student[k].is_floating_point() and not torch.equal(student[k], teacher[k])]
    assert moved  # the teacher lags the student by the EMA
    # a longer schedule resumes from the last checkpoint, its teacher loaded from it
    proc = run_tool("train_net.py", "--config", DEMO, "--resume", *TINY_OPTS, "D2CT.DATA_ROOT", tiny_phantom,
                    "OUTPUT_DIR", out, *opts, "SOLVER.MAX_ITER", "3")
    assert "Resumed from" in proc.stdout + proc.stderr and "at iteration 2 of 3" in proc.stdout + proc.stderr
    resumed = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert resumed["iteration"] == 2 and resumed["mean_teacher"].keys() == teacher.keys()
