"""CTSegmentationEvaluator inside a tiny Detectron2 evaluation (inference_on_dataset) and the
evaluation report / tools/evaluate.py on real CSV files."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from d2ct.utils.masks import encode_mask
from d2ct.evaluation.evaluator import CTSegmentationEvaluator, truth_label_map

detectron2 = pytest.importorskip("detectron2")
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.evaluation import inference_on_dataset, print_csv_format  # noqa: E402
from detectron2.evaluation.testing import flatten_results_dict  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H = W = 48


def _label_maps(n=4, seed=0):
    rng = np.random.default_rng(seed)
    maps = np.zeros((n, H, W), np.uint8)
    for i in range(n):
        for v in rng.permutation(np.arange(1, 5))[: rng.integers(2, 5)]:
            r, c = rng.integers(0, H - 12), rng.integers(0, W - 12)
            maps[i, r : r + rng.integers(4, 12), c : c + rng.integers(4, 12)] = v
    return maps


def _dicts(maps):
    out = []
    for i, m in enumerate(maps):
        anns = []
        for v in np.unique(m[m > 0]):
            mask = m == v
            ys, xs = np.nonzero(mask)
            anns.append({"bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                  float(ys.max() - ys.min() + 1)],
                         "bbox_mode": 1, "segmentation": encode_mask(mask), "area": float(mask.sum()),
                         "category_id": 0, "iscrowd": 0, "label_value": int(v)})
        out.append({"file_name": f"{i}.png", "name": f"{i}.png", "image_id": i, "height": H, "width": W,
                    "annotations": anns})
    return out


@pytest.fixture()
def tiny_dataset():
    name = "d2ct_test_eval_tiny"
    maps = _label_maps()
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: _dicts(maps))
    MetadataCatalog.get(name).set(thing_classes=["structure"])
    yield name, maps
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _instances(masks: np.ndarray, scores: np.ndarray) -> Instances:
    inst = Instances((H, W))
    m = torch.as_tensor(masks, dtype=torch.bool)
    inst.pred_masks = m
    inst.scores = torch.as_tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.zeros(len(masks), dtype=torch.int64)
    boxes = torch.zeros(len(masks), 4)
    for k, mk in enumerate(m):
        ys, xs = torch.nonzero(mk, as_tuple=True)
        if len(ys):
            boxes[k] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    inst.pred_boxes = Boxes(boxes)
    return inst


class PerfectModel(nn.Module):
    """Returns the ground-truth structures as instances (label values deliberately not reused)."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def forward(self, inputs):
        outs = []
        for inp in inputs:
            m = self.maps[inp["image_id"]]
            values = np.unique(m[m > 0])
            masks = np.stack([m == v for v in values])
            outs.append({"instances": _instances(masks, np.linspace(0.95, 0.8, len(values)))})
        return outs


class NoiseModel(nn.Module):
    def __init__(self, seed=0, n=6):
        super().__init__()
        self.rng = np.random.default_rng(seed)
        self.n = n

    def forward(self, inputs):
        outs = []
        for _ in inputs:
            masks = np.zeros((self.n, H, W), bool)
            for k in range(self.n):
                r, c = self.rng.integers(0, H - 10, 2)
                masks[k, r : r + self.rng.integers(3, 15), c : c + self.rng.integers(3, 15)] = True
            outs.append({"instances": _instances(masks, self.rng.uniform(0.3, 1.0, self.n))})
        return outs


class EmptyModel(nn.Module):
    def forward(self, inputs):
        return [{"instances": _instances(np.zeros((0, H, W), bool), np.zeros(0))} for _ in inputs]


def _loader(maps):
    # what build_detection_test_loader yields: batches of 1, annotations dropped by the test mapper
    return [[{"file_name": f"{i}.png", "image_id": i, "height": H, "width": W}] for i in range(len(maps))]


def test_truth_label_map_rebuilds_the_map(tiny_dataset):
    name, maps = tiny_dataset
    for d, m in zip(DatasetCatalog.get(name), maps):
        np.testing.assert_array_equal(truth_label_map(d), m)


def test_perfect_and_noisy_models(tiny_dataset, tmp_path):
    name, maps = tiny_dataset
    ev = CTSegmentationEvaluator(name, output_dir=tmp_path / "perfect")
    res = inference_on_dataset(PerfectModel(maps), _loader(maps), ev)
    assert list(res) == ["segm", "ct"]
    assert res["segm"]["AP"] == pytest.approx(100.0)
    assert res["ct"]["ARI"] == pytest.approx(1.0) and res["ct"]["ARI_fg"] == pytest.approx(1.0)
    assert res["ct"]["Dice"] == pytest.approx(1.0) and res["ct"]["Recall50"] == pytest.approx(1.0)
    assert res["ct"]["n_images"] == len(maps)
    per_image = pd.read_csv(tmp_path / "perfect" / "ct_per_image.csv")
    assert len(per_image) == len(maps) and (per_image["ARI"] == 1.0).all()
    assert json.loads((tmp_path / "perfect" / "ct_summary.json").read_text())["results"]["ct"]["ARI"] == 1.0
    # what EvalHook / print_csv_format need: a flat dict of floats
    flat = flatten_results_dict(res)
    assert {"segm/AP", "ct/ARI", "ct/Dice"} <= set(flat) and all(isinstance(float(v), float) for v in flat.values())
    print_csv_format(res)

    noisy = inference_on_dataset(NoiseModel(), _loader(maps), CTSegmentationEvaluator(name))
    assert noisy["segm"]["AP"] < 50.0
    assert noisy["ct"]["ARI"] < 0.5 and noisy["ct"]["Dice"] < res["ct"]["Dice"]


def test_empty_predictions_and_reuse(tiny_dataset):
    name, maps = tiny_dataset
    ev = CTSegmentationEvaluator(name, distributed=False)
    res = inference_on_dataset(EmptyModel(), _loader(maps), ev)
    assert res["segm"]["AP"] == 0.0
    assert res["ct"]["ARI"] == 0.0 and res["ct"]["Dice"] == 0.0 and res["ct"]["Recall50"] == 0.0
    # reset() between runs: a second evaluation is not polluted by the first
    res2 = inference_on_dataset(PerfectModel(maps), _loader(maps), ev)
    assert res2["ct"]["ARI"] == pytest.approx(1.0) and res2["ct"]["n_images"] == len(maps)


def test_score_threshold_and_fallback(tiny_dataset):
    name, maps = tiny_dataset

    class LowScores(PerfectModel):
        def forward(self, inputs):
            outs = super().forward(inputs)
            for o in outs:
                o["instances"].scores = o["instances"].scores * 0.1  # all below 0.5
            return outs

    with_fallback = inference_on_dataset(LowScores(maps), _loader(maps), CTSegmentationEvaluator(name, fallback_top_k=10))
    no_fallback = inference_on_dataset(LowScores(maps), _loader(maps), CTSegmentationEvaluator(name, fallback_top_k=0))
    assert with_fallback["ct"]["ARI"] == pytest.approx(1.0)
    assert no_fallback["ct"]["ARI"] == 0.0
    assert with_fallback["segm"]["AP"] == no_fallback["segm"]["AP"] == pytest.approx(100.0)  # AP ignores the threshold


def test_unknown_image_id_is_a_clear_error(tiny_dataset):
    from d2ct.errors import DataError

    name, maps = tiny_dataset
    ev = CTSegmentationEvaluator(name)
    ev.reset()
    with pytest.raises(DataError, match="image_id 99"):
        ev.process([{"image_id": 99, "file_name": "x.png", "height": H, "width": W}],
                   EmptyModel()([{"image_id": 99}]))


# ----------------------------------------------------------------- CSV report and tools/evaluate.py
def _write_csv(path, names, maps):
    from d2ct.data.labels_csv import write_labels_csv

    write_labels_csv(path, names, maps)


def test_evaluate_csv_and_tool(tmp_path):
    from d2ct.evaluation.report import evaluate_csv

    maps = _label_maps(n=5, seed=3)
    maps[4] = 0  # an unlabelled column
    names = [f"{i}.png" for i in range(5)]
    pred = maps.copy()
    pred[1] = 0  # one image predicted empty
    _write_csv(tmp_path / "truth.csv", names, maps)
    _write_csv(tmp_path / "pred.csv.gz", names, pred)
    (tmp_path / "annotated.json").write_text(json.dumps({"annotated": names[:4]}))
    pd.DataFrame({"file": names, "source": ["a", "a", "b", "b", "b"]}).to_csv(tmp_path / "manifest.csv", index=False)

    res = evaluate_csv(tmp_path / "truth.csv", tmp_path / "pred.csv.gz", annotated=tmp_path / "annotated.json",
                       progress=False)
    assert list(res.per_image["name"]) == names[:4]
    assert res.summary["ARI"] == pytest.approx(0.75)  # three perfect, one empty (ARI 0)
    assert res.summary["Recall50"] < 1.0

    out = tmp_path / "report"
    cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--truth", str(tmp_path / "truth.csv"),
           "--pred", str(tmp_path / "pred.csv.gz"), "--skip-empty", "--manifest", str(tmp_path / "manifest.csv"),
           "--group-by", "source", "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ARI" in r.stdout and "by source" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["n_images"] == 4 and summary["info"]["skipped_empty"] == 1
    assert summary["summary"]["ARI"] == pytest.approx(0.75)
    by = pd.read_csv(out / "by_source.csv")
    assert list(by["source"]) == ["a", "b"] and list(by["n_images"]) == [2, 2]
    assert by.loc[by["source"] == "a", "ARI"].item() == pytest.approx(0.5)
    assert len(pd.read_csv(out / "per_image.csv")) == 4
    assert (out / "ari_hist.png").stat().st_size > 1000


def test_evaluate_tool_errors(tmp_path):
    maps = _label_maps(n=3, seed=4)
    names = ["0.png", "1.png", "2.png"]
    _write_csv(tmp_path / "truth.csv", names, maps)
    _write_csv(tmp_path / "pred.csv", names[:2], maps[:2])
    _write_csv(tmp_path / "small.csv", names, maps[:, :20, :20])
    tool = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--truth", str(tmp_path / "truth.csv"), "--quiet"]

    r = subprocess.run(tool + ["--pred", str(tmp_path / "pred.csv")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr and "2.png" in r.stderr and "pred.csv" in r.stderr
    r = subprocess.run(tool + ["--pred", str(tmp_path / "small.csv")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pixels" in r.stderr and "small.csv" in r.stderr
    r = subprocess.run(tool + ["--pred", str(tmp_path / "truth.csv"), "--shape", "40", "40"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--shape" in r.stderr
    r = subprocess.run(tool + ["--pred", str(tmp_path / "truth.csv"), "--group-by", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--manifest" in r.stderr


def test_non_square_needs_shape(tmp_path):
    from d2ct.errors import ConfigError
    from d2ct.evaluation.report import evaluate_csv

    maps = np.zeros((2, 6, 10), np.uint8)
    maps[:, 1:3, 2:5] = 1
    _write_csv(tmp_path / "t.csv", ["0.png", "1.png"], maps)
    with pytest.raises(ConfigError, match="--shape"):
        evaluate_csv(tmp_path / "t.csv", tmp_path / "t.csv", progress=False)
    res = evaluate_csv(tmp_path / "t.csv", tmp_path / "t.csv", shape=(6, 10), progress=False, with_ap=False)
    assert res.summary["ARI"] == 1.0 and "AP" not in res.summary
    assert math.isclose(res.summary["Dice"], 1.0)
