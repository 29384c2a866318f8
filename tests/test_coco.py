"""Label maps <-> single-class COCO instances (d2ct.data.coco) and flattening (d2ct.postprocess.flatten)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from detectron2.structures import BoxMode, Instances

from d2ct.data.coco import (
    dataset_dicts,
    label_map_to_instances,
    load_coco_dicts,
    to_coco_json,
)
from d2ct.errors import DataError
from d2ct.postprocess.flatten import instances_from_detectron2, instances_to_label_map
from d2ct.utils.fileio import atomic_write_json

# pycocotools' Cython __array__ predates numpy 2's copy keyword (harmless)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# --------------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------------
@st.composite
def label_maps(draw) -> np.ndarray:
    """Random label maps: per-pixel noise over a palette (multi-part structures, holes, border
    contact, single pixels) or painted rectangles (holes punched in some), up to 255 labels."""
    h = draw(st.integers(1, 24))
    w = draw(st.integers(1, 24))
    palette = draw(st.lists(st.integers(1, 255), min_size=0, max_size=min(255, h * w), unique=True))
    kind = draw(st.sampled_from(["noise", "rectangles"]))
    if kind == "noise" or not palette:
        elements = st.sampled_from([0] + palette)
        return draw(hnp.arrays(np.uint8, (h, w), elements=elements))
    lm = np.zeros((h, w), dtype=np.uint8)
    for value in palette[:40]:
        y0, y1 = sorted(draw(st.tuples(st.integers(0, h), st.integers(0, h))))
        x0, x1 = sorted(draw(st.tuples(st.integers(0, w), st.integers(0, w))))
        lm[y0:y1, x0:x1] = value
        if draw(st.booleans()) and y1 - y0 > 2 and x1 - x0 > 2:
            lm[(y0 + y1) // 2, (x0 + x1) // 2] = 0  # a hole
    return lm


ALL_255 = np.arange(1, 256, dtype=np.uint8).tolist() + [0]
ALL_255 = np.array(ALL_255, dtype=np.uint8).reshape(16, 16)


def _round_trip(lm: np.ndarray, **kwargs) -> np.ndarray:
    instances = label_map_to_instances(lm, **kwargs)
    return instances_to_label_map(
        [a["segmentation"] for a in instances], shape=lm.shape, labels=[a["label_value"] for a in instances]
    )


# --------------------------------------------------------------------------------------------------
# label_map_to_instances
# --------------------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_maps(), st.booleans())
@example(np.zeros((5, 7), np.uint8), False)
@example(np.zeros((5, 7), np.uint8), True)
@example(np.full((3, 3), 9, np.uint8), True)
@example(np.pad(np.array([[4]], np.uint8), 3), True)
@example(ALL_255, False)
@example(ALL_255, True)
def test_round_trip_is_exact(lm, split):
    assert np.array_equal(_round_trip(lm, split_components=split), lm)


@settings(max_examples=60, deadline=None)
@given(label_maps())
def test_instance_fields_match_the_mask(lm):
    for ann in label_map_to_instances(lm, split_components=True, connectivity=1):
        assert isinstance(ann["segmentation"]["counts"], str)
        assert ann["segmentation"]["size"] == list(lm.shape)
        mask = mask_util.decode({"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()})
        assert mask.sum() == ann["area"] > 0
        assert np.all(lm[mask.astype(bool)] == ann["label_value"])
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["category_id"] == 0 and ann["iscrowd"] == 0 and ann["bbox_mode"] == BoxMode.XYWH_ABS
    json.dumps(label_map_to_instances(lm))  # serialisable as is


def test_one_instance_per_value_and_per_component():
    lm = np.zeros((10, 12), np.uint8)
    lm[0:2, 0:2] = 7  # touches the border
    lm[8:10, 10:12] = 7  # second part of 7
    lm[4:7, 4:8] = 2
    lm[5, 5] = 0  # hole
    lm[3, 3] = 2  # diagonal neighbour of the 2-block: 8-connected, not 4-connected
    per_value = label_map_to_instances(lm)
    assert [a["label_value"] for a in per_value] == [2, 7]
    assert [a["area"] for a in per_value] == [12, 8]
    assert per_value[1]["bbox"] == [0.0, 0.0, 12.0, 10.0]

    comps8 = label_map_to_instances(lm, split_components=True)
    assert [(a["label_value"], a["area"]) for a in comps8] == [(2, 12), (7, 4), (7, 4)]
    assert comps8[1]["bbox"] == [0.0, 0.0, 2.0, 2.0] and comps8[2]["bbox"] == [10.0, 8.0, 2.0, 2.0]
    comps4 = label_map_to_instances(lm, split_components=True, connectivity=1)
    assert [(a["label_value"], a["area"]) for a in comps4] == [(2, 1), (2, 11), (7, 4), (7, 4)]


def test_min_area_drops_small_instances_and_components():
    lm = np.zeros((8, 8), np.uint8)
    lm[0:3, 0:3] = 1  # 9 px
    lm[7, 7] = 1  # 1 px part of label 1
    lm[5, 0:2] = 3  # 2 px
    assert [a["label_value"] for a in label_map_to_instances(lm, min_area=3)] == [1]
    assert [a["area"] for a in label_map_to_instances(lm, min_area=3)] == [10]
    comps = label_map_to_instances(lm, split_components=True, min_area=2)
    assert [(a["label_value"], a["area"]) for a in comps] == [(1, 9), (3, 2)]


def test_bad_label_maps_raise_data_error():
    with pytest.raises(DataError, match="2-D"):
        label_map_to_instances(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(DataError, match="0..255"):
        label_map_to_instances(np.array([[0, 300]]))
    with pytest.raises(DataError, match="connectivity"):
        label_map_to_instances(np.zeros((2, 2), np.uint8), connectivity=3)
    # int arrays in range are accepted
    assert label_map_to_instances(np.array([[0, 5]], dtype=np.int64))[0]["label_value"] == 5


# --------------------------------------------------------------------------------------------------
# instances_to_label_map
# --------------------------------------------------------------------------------------------------
def _boxes(shape, *rects):
    masks = np.zeros((len(rects), *shape), dtype=bool)
    for m, (y0, y1, x0, x1) in zip(masks, rects):
        m[y0:y1, x0:x1] = True
    return masks


def test_higher_score_wins_overlaps_and_ids_follow_scores():
    masks = _boxes((6, 6), (0, 4, 0, 4), (2, 6, 2, 6))
    out = instances_to_label_map(masks, [0.3, 0.9])
    assert out.dtype == np.uint8
    assert out[3, 3] == 1 and out[5, 5] == 1  # the 0.9 instance is id 1 and owns the overlap
    assert out[0, 0] == 2 and out[1, 3] == 2
    assert set(np.unique(out)) == {0, 1, 2}  # ids are never added (no 3)
    # equal / missing scores keep the input order
    assert instances_to_label_map(masks, [0.5, 0.5])[3, 3] == 1
    assert instances_to_label_map(masks)[3, 3] == 1 and instances_to_label_map(masks)[5, 5] == 2


def test_labels_replace_ids():
    masks = _boxes((4, 4), (0, 2, 0, 2), (2, 4, 2, 4), (0, 1, 3, 4))
    out = instances_to_label_map(masks, [0.1, 0.8, 0.5], labels=[40, 7, 40])
    assert out[0, 0] == 40 and out[3, 3] == 7 and out[0, 3] == 40
    with pytest.raises(DataError, match="1..255"):
        instances_to_label_map(masks, labels=[0, 1, 2])
    with pytest.raises(DataError, match="3 masks but 2 labels"):
        instances_to_label_map(masks, labels=[1, 2])


def test_min_area_skips_and_leaves_pixels_to_lower_scores():
    masks = _boxes((6, 6), (0, 4, 0, 4), (1, 4, 1, 5), (5, 6, 5, 6))
    # instance 1 (score .8) claims 16 px; instance 2 (.9) has 12 px; single-pixel instance 3 (.7)
    out = instances_to_label_map(masks, [0.8, 0.9, 0.7], min_area=13)
    assert out[2, 2] == 1  # the .9 instance was too small: the .8 one took its pixels
    assert out[1, 4] == 0 and out[5, 5] == 0
    assert set(np.unique(out)) == {0, 1}
    # min_area counts claimable pixels only: 2 loses the overlap to 1 and keeps 3 px < 4
    out = instances_to_label_map(masks, [0.9, 0.8, 0.7], min_area=4)
    assert out[1, 4] == 0 and out[0, 0] == 1
    out = instances_to_label_map(masks, [0.9, 0.8, 0.7], min_area=3)
    assert out[1, 4] == 2


def test_threshold_and_fallback():
    masks = _boxes((5, 5), (0, 2, 0, 2), (3, 5, 3, 5), (0, 1, 4, 5))
    scores = [0.2, 0.6, 0.4]
    out = instances_to_label_map(masks, scores, score_threshold=0.5)
    assert set(np.unique(out)) == {0, 1} and out[4, 4] == 1
    out = instances_to_label_map(masks, scores, score_threshold=0.9)
    assert not out.any()
    out = instances_to_label_map(masks, scores, score_threshold=0.9, fallback_top_k=2)
    assert out[4, 4] == 1 and out[0, 4] == 2 and out[0, 0] == 0
    # the fallback is not used when something passes
    out = instances_to_label_map(masks, scores, score_threshold=0.5, fallback_top_k=2)
    assert out[0, 4] == 0


def test_more_than_255_instances_keeps_the_best(caplog):
    n = 300
    masks = np.zeros((n, 20, 20), dtype=bool)
    masks.reshape(n, -1)[np.arange(n), np.arange(n)] = True
    scores = np.arange(n, dtype=np.float32)  # the last ones are the best
    with caplog.at_level(logging.WARNING, logger="d2ct.postprocess.flatten"):
        out = instances_to_label_map(masks, scores)
    assert out.max() == 255 and np.count_nonzero(out) == 255
    assert out.ravel()[n - 1] == 1 and out.ravel()[n - 255] == 255 and out.ravel()[n - 256] == 0
    assert "dropped" in caplog.text


def test_mask_inputs_torch_rle_empty():
    masks = _boxes((4, 5), (0, 2, 0, 2), (1, 4, 1, 5))
    expected = instances_to_label_map(masks, [0.2, 0.7])
    assert np.array_equal(instances_to_label_map(torch.from_numpy(masks), torch.tensor([0.2, 0.7])), expected)
    assert np.array_equal(instances_to_label_map(masks.astype(np.uint8), np.array([0.2, 0.7])), expected)
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert np.array_equal(instances_to_label_map(rles, [0.2, 0.7]), expected)  # counts as bytes
    str_rles = [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]
    assert np.array_equal(instances_to_label_map(str_rles, [0.2, 0.7]), expected)
    assert instances_to_label_map([], shape=(3, 4)).shape == (3, 4)
    assert not instances_to_label_map(np.zeros((0, 3, 4), bool)).any()
    with pytest.raises(DataError, match="shape"):
        instances_to_label_map([])
    with pytest.raises(DataError, match="NaN"):
        instances_to_label_map(masks, [np.nan, 1.0])
    with pytest.raises(DataError, match="2 masks but 1 scores"):
        instances_to_label_map(masks, [1.0])


def test_instances_from_detectron2():
    inst = Instances((4, 5))
    inst.pred_masks = torch.from_numpy(_boxes((4, 5), (0, 2, 0, 2), (1, 4, 1, 5)))
    inst.scores = torch.tensor([0.25, 0.75])
    masks, scores = instances_from_detectron2(inst)
    assert masks.dtype == bool and masks.shape == (2, 4, 5)
    assert scores.dtype == np.float32 and scores.tolist() == [0.25, 0.75]
    out = instances_to_label_map(masks, scores)
    assert out[1, 1] == 1 and out[0, 0] == 2
    with pytest.raises(DataError, match="pred_masks"):
        instances_from_detectron2(Instances((4, 5)))


# --------------------------------------------------------------------------------------------------
# dataset_dicts (with a stand-in data set) and COCO JSON
# --------------------------------------------------------------------------------------------------
class FakeDataset:
    """Duck-typed ChallengeDataset: names, shape, root, image_path, label_map."""

    def __init__(self, maps: dict[str, np.ndarray | None], root: Path):
        self.root = root
        self.names = list(maps)
        self.maps = maps
        self.shape = next(m.shape for m in maps.values() if m is not None)

    def image_path(self, name):
        return self.root / "images" / name

    def label_map(self, name):
        return self.maps[name]


def _fake(tmp_path, n=70, seed=0):
    rng = np.random.default_rng(seed)
    maps = {}
    for i in range(n):
        if i % 5 == 4:
            maps[f"{i}.png"] = None
            continue
        lm = np.zeros((32, 32), np.uint8)
        for v in range(1, rng.integers(1, 6)):
            y, x = rng.integers(0, 28, 2)
            lm[y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = v
        maps[f"{i}.png"] = lm
    return FakeDataset(maps, tmp_path)


def test_dataset_dicts_parallel_matches_serial(tmp_path):
    ds = _fake(tmp_path)
    names = ds.names[::-1]
    serial = dataset_dicts(ds, names, workers=1)
    parallel = dataset_dicts(ds, names, workers=2)
    assert serial == parallel
    assert [d["name"] for d in serial] == names
    assert [d["image_id"] for d in serial] == [ds.names.index(n) for n in names]
    by_name = {d["name"]: d for d in serial}
    assert by_name["4.png"]["annotations"] == []
    assert by_name["3.png"]["file_name"] == str(tmp_path / "images" / "3.png")
    assert (by_name["3.png"]["height"], by_name["3.png"]["width"]) == (32, 32)
    for d in serial:
        lm = ds.label_map(d["name"])
        if lm is not None:
            anns = d["annotations"]
            rebuilt = instances_to_label_map(
                [a["segmentation"] for a in anns], shape=lm.shape, labels=[a["label_value"] for a in anns]
            )
            assert np.array_equal(rebuilt, lm)
    assert "annotations" not in dataset_dicts(ds, names[:3], with_annotations=False)[0]
    with pytest.raises(DataError, match="not in data set"):
        dataset_dicts(ds, ["nope.png"])


def test_coco_json_round_trip(tmp_path):
    ds = _fake(tmp_path, n=12)
    dicts = dataset_dicts(ds, split_components=True)
    dicts[0]["annotations"][0]["score"] = 0.75
    coco = to_coco_json(dicts, description="fake")
    assert coco["categories"] == [{"id": 1, "name": "structure", "supercategory": "structure"}]
    assert len(coco["images"]) == 12  # unlabelled images listed too
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert ann_ids == list(range(1, len(ann_ids) + 1))
    assert {a["category_id"] for a in coco["annotations"]} == {1}
    path = tmp_path / "out" / "coco.json"
    atomic_write_json(path, coco)
    back = load_coco_dicts(path)
    assert len(back) == len(dicts)
    for a, b in zip(dicts, back):
        for key in ("file_name", "height", "width", "image_id", "name"):
            assert a[key] == b[key]
        assert len(a["annotations"]) == len(b["annotations"])
        for x, y in zip(a["annotations"], b["annotations"]):
            assert y["segmentation"] == x["segmentation"]
            assert y["bbox"] == x["bbox"] and y["label_value"] == x["label_value"] and y["category_id"] == 0
            assert y["bbox_mode"] == BoxMode.XYWH_ABS
    assert back[0]["annotations"][0]["score"] == 0.75
    assert "score" not in back[0]["annotations"][1]

    # relative file names resolve against image_root
    rel = to_coco_json(dicts, image_root=tmp_path)
    assert rel["images"][0]["file_name"] == str(Path("images") / "0.png")
    atomic_write_json(tmp_path / "rel.json", rel)
    assert load_coco_dicts(tmp_path / "rel.json")[0]["file_name"] == str(tmp_path / "images" / "0.png")


def test_load_coco_dicts_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        load_coco_dicts(bad)
    with pytest.raises(DataError, match="missing.json"):
        load_coco_dicts(tmp_path / "missing.json")
    (tmp_path / "noimg.json").write_text("{}")
    with pytest.raises(DataError, match="noimg.json.*images"):
        load_coco_dicts(tmp_path / "noimg.json")
    orphan = {
        "images": [{"id": 0, "file_name": "0.png", "height": 4, "width": 4}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "segmentation": [[0, 0, 1, 0, 1, 1]], "bbox": [0, 0, 1, 1]}],
        "categories": [{"id": 1, "name": "structure"}],
    }
    (tmp_path / "orphan.json").write_text(json.dumps(orphan))
    with pytest.raises(DataError, match="orphan.json.*unknown image id 5"):
        load_coco_dicts(tmp_path / "orphan.json")


def test_load_coco_dicts_compresses_uncompressed_rle(tmp_path):
    mask = np.zeros((4, 4), np.uint8, order="F")
    mask[1:3, 1:3] = 1
    flat = mask.ravel(order="F")
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    data = {
        "images": [{"id": 3, "file_name": "/abs/3.png", "height": 4, "width": 4}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [1, 1, 2, 2],
                         "segmentation": {"size": [4, 4], "counts": counts}}],
        "categories": [{"id": 1, "name": "structure"}],
    }
    (tmp_path / "u.json").write_text(json.dumps(data))
    (rec,) = load_coco_dicts(tmp_path / "u.json")
    assert rec["file_name"] == "/abs/3.png" and rec["name"] == "3.png"
    segm = rec["annotations"][0]["segmentation"]
    assert isinstance(segm["counts"], str)
    assert np.array_equal(mask_util.decode({"size": segm["size"], "counts": segm["counts"].encode()}), mask)
