"""Ignore regions: uncertain pseudo-labels (COCO iscrowd) are neither structure nor background.

From the pseudo-label file through the dataset mapper to Detectron2's ROI-head sampling, and a
real training run on a set that carries them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from d2ct.config import setup_cfg
from d2ct.data.challenge import ChallengeDataset
from d2ct.data.coco import dataset_dicts, load_coco_dicts, to_coco_json
from d2ct.engine.mapper import IGNORE_CLASS, CTDatasetMapper
from d2ct.pseudolabel.run import resolve_overlaps

from .conftest import box_mask as _box
from .conftest import train_tiny

DEMO = "configs/demo/radiologist_r50.yaml"


def test_uncertain_instances_become_ignore_regions_and_lose_overlaps():
    sure, unsure, faint = _box(20, 20, 0, 8, 0, 8), _box(20, 20, 4, 12, 4, 12), _box(20, 20, 15, 19, 15, 19)
    masks, scores = np.stack([sure, unsure, faint]), np.array([0.9, 0.5, 0.1])
    anns = resolve_overlaps(scores, masks, threshold=0.7, min_area=1, ignore_below=0.3)
    assert [(a["score"], a["iscrowd"]) for a in anns] == [(0.9, 0), (0.5, 1)]  # 0.1: below both, dropped
    assert anns[0]["area"] == 64 and anns[1]["area"] == 64 - 16  # the kept structure wins the overlap
    # without ignore_below: the published method, the uncertain instance is simply dropped
    assert [a["iscrowd"] for a in resolve_overlaps(scores, masks, threshold=0.7, min_area=1)] == [0]


@pytest.fixture(scope="module")
def crowd_json(tiny_phantom, tmp_path_factory):
    """The tiny phantom's labelled slices as a pseudo-label file, every second structure a crowd region."""
    ds = ChallengeDataset.open(tiny_phantom)
    dicts = dataset_dicts(ds, ds.labelled_names, workers=1)
    for d in dicts:
        for i, ann in enumerate(d["annotations"]):
            ann["score"], ann["iscrowd"] = (0.9, 0) if i % 2 == 0 else (0.5, 1)
    path = tmp_path_factory.mktemp("crowd") / "pseudo_labels.json"
    path.write_text(json.dumps(to_coco_json(dicts, description="test")))
    return path


@pytest.mark.parametrize("as_ignore", [True, False])
def test_mapper_turns_crowd_annotations_into_ignore_instances_or_drops_them(crowd_json, as_ignore):
    cfg = setup_cfg(DEMO, ["D2CT.CROWD_AS_IGNORE", str(as_ignore), "D2CT.AUGMENT.ENABLED", "False"])
    mapper = CTDatasetMapper(cfg, is_train=True)
    record = next(d for d in load_coco_dicts(crowd_json) if len(d["annotations"]) >= 2)
    crowd = sum(a["iscrowd"] for a in record["annotations"])
    classes = mapper(record)["instances"].gt_classes.tolist()
    assert record["annotations"][1]["iscrowd"] == 1, "the mapper must not change the dataset's own dict"
    if as_ignore:
        assert sorted(classes) == sorted([IGNORE_CLASS] * crowd + [0] * (len(record["annotations"]) - crowd))
    else:
        assert classes == [0] * (len(record["annotations"]) - crowd)


def test_roi_heads_sample_no_proposal_on_an_ignore_region():
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    cfg = setup_cfg(DEMO, ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512"])
    heads = build_model(cfg).roi_heads
    structure, ignore = [10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 90.0, 90.0]
    targets = Instances((128, 128), gt_boxes=Boxes(torch.tensor([structure, ignore])),
                        gt_classes=torch.tensor([0, IGNORE_CLASS]))
    # proposals around both boxes (IoU >= 0.5 with their own box), and some far from both
    jitter = torch.tensor([[dx, dy, dx, dy] for dx in (-3.0, 0.0, 3.0) for dy in (-3.0, 0.0, 3.0)])
    boxes = torch.cat([torch.tensor(structure) + jitter, torch.tensor(ignore) + jitter,
                       torch.tensor([[100.0, 0.0, 127.0, 30.0], [0.0, 100.0, 30.0, 127.0]])])
    proposals = Instances((128, 128), proposal_boxes=Boxes(boxes), objectness_logits=torch.zeros(len(boxes)))
    with EventStorage():
        sampled = heads.label_and_sample_proposals([proposals], [targets])[0]
    from detectron2.structures import pairwise_iou

    iou_ignore = pairwise_iou(sampled.proposal_boxes, Boxes(torch.tensor([ignore])))[:, 0]
    iou_structure = pairwise_iou(sampled.proposal_boxes, Boxes(torch.tensor([structure])))[:, 0]
    classes = sampled.gt_classes
    assert IGNORE_CLASS not in classes.tolist()
    assert not (iou_ignore >= 0.5).any(), "a proposal on the ignore region was sampled"
    assert (classes[iou_structure >= 0.5] == 0).all() and (iou_structure >= 0.5).sum() >= 9  # + the gt box
    assert (classes == heads.num_classes).sum() == 2  # the two far proposals: background


def test_training_on_pseudo_labels_with_ignore_regions(crowd_json, tiny_phantom, tmp_path):
    out = train_tiny(DEMO, tiny_phantom, tmp_path / "model", "DATASETS.TRAIN", "('phantom_pseudo',)",
                     "D2CT.PSEUDO_LABELS", json.dumps([str(crowd_json)]))
    assert (out / "model_final.pth").exists()
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if '"total_loss"' in line]
    assert rows and all(np.isfinite(r["total_loss"]) for r in rows)
