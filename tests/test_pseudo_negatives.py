"""D2CT.PSEUDO_NEGATIVES ignore: on pseudo-labelled slices, what the teachers did not draw is not
taught as background (d2ct/modeling/pseudo_negatives.py); human-labelled slices are unchanged."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from d2ct.config import setup_cfg
from d2ct.data.coco import load_coco_dicts
from d2ct.engine.mapper import CTDatasetMapper
from d2ct.errors import ConfigError

from .conftest import train_tiny
from .test_ignore_regions import crowd_json  # noqa: F401  (the tiny phantom as a pseudo-label file)

DEMO = "configs/demo/radiologist_r50.yaml"
IGNORE = ["MODEL.DEVICE", "cpu", "D2CT.PSEUDO_NEGATIVES", "ignore"]


def _targets(pseudo: bool):
    from detectron2.structures import Boxes, Instances

    structure = [10.0, 10.0, 40.0, 40.0]
    fields = {"gt_boxes": Boxes(torch.tensor([structure])), "gt_classes": torch.tensor([0])}
    if pseudo:
        fields["gt_pseudo"] = torch.ones(1, dtype=torch.bool)
    return structure, Instances((128, 128), **fields)


@pytest.mark.parametrize("pseudo", [True, False])
def test_roi_heads_sample_no_background_on_a_pseudo_labelled_slice(pseudo):
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    cfg = setup_cfg(DEMO, IGNORE + ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512"])
    heads = build_model(cfg).roi_heads
    assert type(heads).__name__ == "PseudoAwareROIHeads"
    structure, targets = _targets(pseudo)
    jitter = torch.tensor([[dx, dy, dx, dy] for dx in (-3.0, 0.0, 3.0) for dy in (-3.0, 0.0, 3.0)])
    far = torch.tensor([[100.0, 0.0, 127.0, 30.0], [0.0, 100.0, 30.0, 127.0], [60.0, 60.0, 90.0, 90.0]])
    boxes = torch.cat([torch.tensor(structure) + jitter, far])
    proposals = Instances((128, 128), proposal_boxes=Boxes(boxes), objectness_logits=torch.zeros(len(boxes)))
    with EventStorage():
        sampled = heads.label_and_sample_proposals([proposals], [targets])[0]
    background = int((sampled.gt_classes == heads.num_classes).sum())
    assert int((sampled.gt_classes == 0).sum()) >= 9  # the structure's proposals (+ its box) in both cases
    assert background == (0 if pseudo else 3)


@pytest.mark.parametrize("pseudo", [True, False])
def test_rpn_samples_no_background_anchor_on_a_pseudo_labelled_slice(pseudo):
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes

    cfg = setup_cfg(DEMO, IGNORE)
    rpn = build_model(cfg).proposal_generator
    assert type(rpn).__name__ == "PseudoAwareRPN"
    structure, targets = _targets(pseudo)
    grid = [[x, y, x + 30.0, y + 30.0] for x in range(0, 98, 8) for y in range(0, 98, 8)]
    labels, _ = rpn.label_and_sample_anchors([Boxes(torch.tensor(grid + [structure]))], [targets])
    labels = labels[0]
    assert int((labels == 1).sum()) >= 1
    background = int((labels == 0).sum())
    assert background == 0 if pseudo else background > 0


def test_a_kept_share_of_background_stays_background_on_a_pseudo_labelled_slice():
    """PSEUDO_NEGATIVES_KEEP: about that share of the sampled background survives, positives all do."""
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    base = IGNORE + ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512", "MODEL.ROI_HEADS.POSITIVE_FRACTION", "0.25"]
    far = torch.tensor([[float(x), 70.0, x + 20.0, 90.0] for x in range(0, 100)])  # 100 background proposals
    structure, targets = _targets(True)
    counts = {}
    for keep in (0.0, 0.5, 1.0):
        model = build_model(setup_cfg(DEMO, base + ["D2CT.PSEUDO_NEGATIVES_KEEP", str(keep)]))
        boxes = torch.cat([torch.tensor([structure]), far])
        proposals = Instances((128, 128), proposal_boxes=Boxes(boxes), objectness_logits=torch.zeros(len(boxes)))
        with EventStorage():
            sampled = model.roi_heads.label_and_sample_proposals([proposals], [targets])[0]
        counts[keep] = int((sampled.gt_classes == model.roi_heads.num_classes).sum())
        assert int((sampled.gt_classes == 0).sum()) >= 1  # the structure is always sampled
        grid = [[x, y, x + 30.0, y + 30.0] for x in range(0, 98, 8) for y in range(0, 98, 8)]
        labels = model.proposal_generator.label_and_sample_anchors([Boxes(torch.tensor(grid + [structure]))],
                                                                   [targets])[0][0]
        counts[f"rpn{keep}"] = int((labels == 0).sum())
        assert int((labels == 1).sum()) >= 1
    assert counts[0.0] == 0 and counts[1.0] == 100  # keep 1: every background proposal, as on a human slice
    assert 30 <= counts[0.5] <= 70
    assert counts["rpn0.0"] == 0 and 0.3 * counts["rpn1.0"] <= counts["rpn0.5"] <= 0.7 * counts["rpn1.0"]


def test_mapper_marks_pseudo_labelled_slices_only_when_asked(crowd_json):  # noqa: F811
    record = next(d for d in load_coco_dicts(crowd_json) if d["annotations"])
    human = {**record, "annotations": [{k: v for k, v in a.items() if k != "score"} for a in record["annotations"]]}
    aware = CTDatasetMapper(setup_cfg(DEMO, IGNORE + ["D2CT.AUGMENT.ENABLED", "False"]), is_train=True)
    plain = CTDatasetMapper(setup_cfg(DEMO, ["D2CT.AUGMENT.ENABLED", "False"]), is_train=True)
    marked = aware(record)["instances"]
    assert marked.has("gt_pseudo") and bool(marked.gt_pseudo.all())
    assert not aware(human)["instances"].has("gt_pseudo")
    assert not plain(record)["instances"].has("gt_pseudo")
    assert not CTDatasetMapper(setup_cfg(DEMO, IGNORE), is_train=False)(record).get("instances")


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="D2CT.PSEUDO_NEGATIVES must be one of background, ignore"):
        setup_cfg(DEMO, ["D2CT.PSEUDO_NEGATIVES", "drop"])
    with pytest.raises(ConfigError, match="MODEL.ROI_HEADS.NAME StandardROIHeads"):
        setup_cfg(DEMO, IGNORE + ["MODEL.ROI_HEADS.NAME", "Res5ROIHeads"])
    assert setup_cfg(DEMO, ["MODEL.DEVICE", "cpu"]).MODEL.ROI_HEADS.NAME == "StandardROIHeads"  # default unchanged
    with pytest.raises(ConfigError, match="D2CT.PSEUDO_NEGATIVES_KEEP must be a number from 0 to 1, got 1.5"):
        setup_cfg(DEMO, IGNORE + ["D2CT.PSEUDO_NEGATIVES_KEEP", "1.5"])
    with pytest.raises(ConfigError, match="D2CT.PSEUDO_NEGATIVES_KEEP 0.3 applies with D2CT.PSEUDO_NEGATIVES ignore"):
        setup_cfg(DEMO, ["D2CT.PSEUDO_NEGATIVES_KEEP", "0.3"])


def test_training_steps_on_pseudo_labels_with_background_ignored(crowd_json, tiny_phantom, tmp_path):  # noqa: F811
    """Real training steps, and the trained folder predicts (its config names the pseudo-aware parts)."""
    from d2ct.engine.predictor import load_trained

    out = train_tiny(DEMO, tiny_phantom, tmp_path / "model", "DATASETS.TRAIN", "('phantom_train', 'phantom_pseudo')",
                     "D2CT.PSEUDO_LABELS", json.dumps([str(crowd_json)]), "D2CT.PSEUDO_NEGATIVES", "ignore")
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if '"total_loss"' in line]
    assert rows and all(np.isfinite(r["total_loss"]) for r in rows)
    cfg, weights = load_trained(out)
    assert cfg.MODEL.ROI_HEADS.NAME == "PseudoAwareROIHeads" and weights.endswith(".pth")
