"""Pseudo-labelling: radiologist weights, pool partition, consensus fusion, overlap resolution,
and the tool end to end with a really trained (tiny) model, in 1 and 2 CPU processes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from d2ct.data.coco import load_coco_dicts
from d2ct.errors import ConfigError
from d2ct.pseudolabel.consensus import consensus_instances
from d2ct.pseudolabel.radiologists import Radiologist, group_sizes, normalised_weights, partition_pool
from d2ct.pseudolabel.run import resolve_overlaps

from .conftest import box_mask, run_tool


def test_weights_are_normalised_validation_aps():
    assert normalised_weights([30.0, 20.0, 50.0]).tolist() == pytest.approx([0.3, 0.2, 0.5])
    assert normalised_weights([0, 0]).tolist() == [0.5, 0.5]
    with pytest.raises(ConfigError):
        normalised_weights([10, -1])
    with pytest.raises(ConfigError):
        normalised_weights([])


@pytest.mark.parametrize("n,weights", [(10, [0.5, 0.3, 0.2]), (7, [1, 1, 1]), (1000, [0.41, 0.33, 0.26]), (2, [0.9, 0.05, 0.05])])
def test_group_sizes_are_proportional_and_cover_the_pool(n, weights):
    sizes = group_sizes(n, weights)
    assert sum(sizes) == n
    exact = np.asarray(weights) / np.sum(weights) * n
    assert np.all(np.abs(np.asarray(sizes) - exact) < 1)


def test_partition_is_seeded_disjoint_and_complete():
    names = [f"{i}.png" for i in range(100)]
    groups = partition_pool(names, [0.5, 0.3, 0.2], seed=1)
    assert [len(g) for g in groups] == [50, 30, 20]
    assert sorted(sum(groups, [])) == sorted(names)
    assert groups == partition_pool(names, [0.5, 0.3, 0.2], seed=1)
    assert groups != partition_pool(names, [0.5, 0.3, 0.2], seed=2)


_box = box_mask


def test_consensus_keeps_agreed_and_confident_structures_only():
    a, b, c = _box(20, 20, 0, 8, 0, 8), _box(20, 20, 10, 18, 10, 18), _box(20, 20, 0, 4, 12, 20)
    a2 = _box(20, 20, 0, 8, 1, 8)  # the same structure, seen slightly differently
    model1 = (np.array([0.8, 0.6]), np.stack([a, b]))  # b: seen by one model, low score -> dropped
    model2 = (np.array([0.7, 0.95]), np.stack([a2, c]))  # c: one model but very confident -> kept
    scores, masks = consensus_instances([model1, model2], [0.6, 0.4], min_votes=2, single_model_score=0.9)
    assert len(scores) == 2
    assert scores[0] == pytest.approx(0.95)  # c
    fused_a = masks[1]
    assert scores[1] == pytest.approx(0.6 * 0.8 + 0.4 * 0.7)
    assert fused_a.sum() == a.sum()  # the heavier model's pixels win the weighted vote
    assert not (masks[:, 10:18, 10:18]).any()


def test_consensus_with_three_models_votes_pixels():
    base = _box(10, 10, 2, 8, 2, 8)
    extra = base.copy()
    extra[0, :] = True  # one model adds a row the others do not see
    preds = [(np.array([0.9]), extra[None]), (np.array([0.8]), base[None]), (np.array([0.7]), base[None])]
    scores, masks = consensus_instances(preds, [1 / 3] * 3)
    assert len(scores) == 1 and masks[0].sum() == base.sum()


def test_overlaps_are_won_by_the_higher_score():
    low = _box(10, 10, 0, 6, 0, 6)
    high = _box(10, 10, 3, 9, 3, 9)
    anns = resolve_overlaps(np.array([0.6, 0.9]), np.stack([low, high]), threshold=0.5, min_area=1)
    assert [a["score"] for a in anns] == [0.9, 0.6]
    assert anns[0]["area"] == 36 and anns[1]["area"] == 36 - 9
    assert resolve_overlaps(np.array([0.3]), low[None], threshold=0.5, min_area=1) == []


def test_radiologist_needs_its_validation_ap(tmp_path, tiny_model):
    rad = Radiologist.from_output_dir(tiny_model, threshold=0.5)
    best = json.loads((tiny_model / "model_best.json").read_text())
    assert rad.ap == pytest.approx(best["scores"]["segm/AP"])
    assert rad.weights.endswith("model_best.pth")
    with pytest.raises(ConfigError, match="config.yaml"):
        Radiologist.from_output_dir(tmp_path)


def test_pseudolabel_tool_end_to_end(tiny_model, tiny_phantom, tmp_path):
    out = tmp_path / "pl"
    args = ["--models", tiny_model, tiny_model, "--aps", "30", "10", "--thresholds", "0.0", "--data", tiny_phantom,
            "--out", out, "--min-area", "1", "--seed", "0"]
    with pytest.raises(AssertionError, match="two radiologists|twice|distinct"):
        run_tool("pseudolabel.py", *args)  # the same folder twice: names collide
    proc = run_tool("pseudolabel.py", "--models", tiny_model, "--aps", "30", "--thresholds", "0.0",
                    "--data", tiny_phantom, "--out", out, "--min-area", "1")
    assert "pool images pseudo-labelled" in proc.stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pool_images"] == 8
    assert stats["labelled_images"] + stats["excluded_images"] == 8
    dicts = load_coco_dicts(out / "pseudo_labels.json")
    assert len(dicts) == stats["labelled_images"]
    assert sum(len(d["annotations"]) for d in dicts) == stats["instances"]
    for d in dicts:
        assert d["annotations"], "images without instances are excluded"
        assert all(0.0 <= a["score"] <= 1.0 for a in d["annotations"])
    for name in ("report.md", "score_histogram.png", "stats.json", "cache/r50.json"):
        assert (out / name).exists(), name
    # a second run reads the cached predictions instead of predicting again
    again = run_tool("pseudolabel.py", "--models", tiny_model, "--aps", "30", "--thresholds", "0.0",
                     "--data", tiny_phantom, "--out", out, "--min-area", "1")
    assert "predictions read from" in again.stdout + again.stderr
    # a high threshold keeps nothing from an untrained model and says so
    strict = run_tool("pseudolabel.py", "--models", tiny_model, "--aps", "30", "--thresholds", "1.0",
                      "--data", tiny_phantom, "--out", tmp_path / "strict")
    assert "0 of 8 pool images" in strict.stdout
    # one folder under two names: two radiologists, each with its own cache and weight
    named = run_tool("pseudolabel.py", *args, "--names", "first", "second", "--out", tmp_path / "named")
    stats = json.loads((tmp_path / "named" / "stats.json").read_text())
    assert [r["name"] for r in stats["radiologists"]] == ["first", "second"], named.stdout
    assert (tmp_path / "named" / "cache" / "first.json").exists()
    with pytest.raises(AssertionError, match="--names: give 2 names"):
        run_tool("pseudolabel.py", *args, "--names", "first")


def test_pseudolabel_tool_writes_uncertain_instances_as_ignore_regions(tiny_model, tiny_phantom, tmp_path):
    """A model's cached predictions replaced by known ones (a sure, an unsure and a faint structure
    per slice): --ignore-below keeps the unsure one as an ignore region, drops the faint one."""
    from pycocotools import mask as mask_utils

    out = tmp_path / "pl"
    common = ["--models", tiny_model, "--aps", "30", "--data", tiny_phantom, "--out", out, "--min-area", "1"]
    run_tool("pseudolabel.py", *common, "--thresholds", "0.0")
    cache = json.loads((out / "cache" / "r50.json").read_text())
    for image in cache["images"]:
        h, w = image["height"], image["width"]
        boxes = [_box(h, w, 5, 25, 5, 25), _box(h, w, 40, 60, 40, 60), _box(h, w, 70, 80, 5, 15)]
        rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in boxes]
        image["rles"] = [{"size": r["size"], "counts": r["counts"].decode()} for r in rles]
        image["scores"] = [0.9, 0.5, 0.1]
    (out / "cache" / "r50.json").write_text(json.dumps(cache))
    proc = run_tool("pseudolabel.py", *common, "--thresholds", "0.7", "--ignore-below", "0.3")
    assert "predictions read from" in proc.stdout + proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    dicts = load_coco_dicts(out / "pseudo_labels.json")
    assert stats["labelled_images"] == len(dicts) == len(cache["images"])
    assert stats["instances"] == stats["ignore_regions"] == len(dicts) and stats["ignore_below"] == 0.3
    for d in dicts:
        assert [(round(a["score"], 3), a["iscrowd"]) for a in d["annotations"]] == [(0.9, 0), (0.5, 1)]
    assert "ignore regions" in (out / "report.md").read_text()
    for bad, message in ((["--thresholds", "0.7", "--ignore-below", "0.7"], "below every model's threshold"),
                         (["--thresholds", "0.7", "--ignore-below", "0.3", "--mode", "consensus"],
                          "partition mode only")):
        proc = run_tool("pseudolabel.py", *common, *bad, check=False)
        assert proc.returncode == 2 and message in proc.stdout + proc.stderr


def test_two_cpu_processes_give_the_same_pseudo_labels(tiny_model, tiny_phantom, tmp_path):
    common = ["--models", tiny_model, "--aps", "30", "--thresholds", "0.0", "--data", tiny_phantom, "--min-area", "1"]
    run_tool("pseudolabel.py", *common, "--out", tmp_path / "one")
    proc = run_tool("pseudolabel.py", *common, "--out", tmp_path / "two", "--num-gpus", "2")
    assert "launching 2 CPU processes" in proc.stderr
    one = json.loads((tmp_path / "one" / "pseudo_labels.json").read_text())
    two = json.loads((tmp_path / "two" / "pseudo_labels.json").read_text())
    assert [im["name"] for im in one["images"]] == [im["name"] for im in two["images"]]
    assert len(one["annotations"]) == len(two["annotations"])
    for a, b in zip(one["annotations"], two["annotations"]):
        assert a["image_id"] == b["image_id"] and a["segmentation"] == b["segmentation"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_pool_predictions_are_cached_as_they_come_and_resume_after_a_kill(tmp_path, monkeypatch):
    """predict_pool writes the cache every CACHE_CHUNK images: a run killed in the middle of a model's
    share predicts only the rest next time; other settings (flip TTA) do not reuse the cache."""
    from d2ct.engine.predictor import InstancePrediction
    from d2ct.pseudolabel import run

    requested: list[list[str]] = []

    class FakePredictor:
        fail_after = None  # calls before a simulated kill

        def __init__(self, cfg, weights, batch_size=4, flip_tta=False):
            self.flip_tta = flip_tta

        def predict_files_sharded(self, named_paths, progress=True, desc=""):
            if FakePredictor.fail_after is not None and len(requested) >= FakePredictor.fail_after:
                raise KeyboardInterrupt("killed")
            requested.append([n for n, _ in named_paths])
            return [InstancePrediction(n, 8, 8, np.array([0.9 if self.flip_tta else 0.5], np.float32), None, [])
                    for n, _ in named_paths]

    monkeypatch.setattr(run, "CACHE_CHUNK", 3)
    monkeypatch.setattr(run, "BatchPredictor", FakePredictor)
    monkeypatch.setattr(run, "setup_cfg", lambda config, opts: None)
    model = Radiologist(name="r50", config="c.yaml", weights="w.pth", ap=10.0)
    pool = [(f"{i}.png", f"/data/{i}.png") for i in range(8)]
    FakePredictor.fail_after = 1
    with pytest.raises(KeyboardInterrupt):
        run.predict_pool(model, pool, tmp_path)
    cache = json.loads((tmp_path / "r50.json").read_text())
    assert [im["name"] for im in cache["images"]] == ["0.png", "1.png", "2.png"]  # the first chunk survived
    FakePredictor.fail_after = None
    requested.clear()
    preds = run.predict_pool(model, pool, tmp_path)
    assert requested == [["3.png", "4.png", "5.png"], ["6.png", "7.png"]]
    assert [p.name for p in preds] == [n for n, _ in pool]
    # a subset (a partition group) and a reordering come from the cache alone
    requested.clear()
    assert [p.name for p in run.predict_pool(model, pool[5:1:-1], tmp_path)] == ["5.png", "4.png", "3.png", "2.png"]
    assert requested == []
    # flip TTA gives other predictions: the cache is not reused, then holds the new ones
    preds = run.predict_pool(model, pool[:2], tmp_path, flip_tta=True)
    assert len(requested) == 1 and [float(p.scores[0]) for p in preds] == pytest.approx([0.9, 0.9])
    assert json.loads((tmp_path / "r50.json").read_text())["flip_tta"] is True
    # a cache written before the settings were recorded counts as plain predictions
    legacy = {"model": "r50", "weights": "w.pth", "images": [
        {"name": "0.png", "height": 8, "width": 8, "scores": [0.5], "rles": []}]}
    (tmp_path / "r50.json").write_text(json.dumps(legacy))
    requested.clear()
    run.predict_pool(model, pool[:1], tmp_path)
    assert requested == []
    run.predict_pool(model, pool[:1], tmp_path, flip_tta=True)
    assert requested == [["0.png"]]


def test_pseudo_label_quality_scores_each_rule_against_the_truth():
    from pycocotools import mask as mask_util

    from d2ct.errors import DataError
    from d2ct.pseudolabel.quality import pseudo_label_quality

    def rles(*masks):
        return [mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]

    real_1, real_2, fake = box_mask(32, 32, 2, 12, 2, 12), box_mask(32, 32, 18, 28, 18, 28), box_mask(32, 32, 20, 30, 2, 10)
    truth = [np.where(real_1, 1, 0) + np.where(real_2, 7, 0), np.where(real_1, 3, 0)]
    truth = [t.astype(np.uint8) for t in truth]
    teachers = {  # a: one real structure for sure, one invented; b: both real ones, less sure
        "a": {"s0": (rles(real_1, fake), np.array([0.95, 0.6])), "s1": (rles(real_1), np.array([0.4]))},
        "b": {"s0": (rles(real_1, real_2), np.array([0.8, 0.85])), "s1": ([], np.zeros(0))},
    }
    rows = pseudo_label_quality(teachers, {"a": 0.6, "b": 0.4}, ["s0", "s1"], truth, [0.5, 0.9], min_area=5)
    by_rule = {r["rule"]: r for r in rows}
    assert list(by_rule) == ["a >= 0.5", "a >= 0.9", "b >= 0.5", "b >= 0.9", "consensus of 2 (2 agree, or one >= 0.9)"]
    # s1 keeps nothing (a's only instance is below both thresholds): never counted as kept
    a = by_rule["a >= 0.5"]
    assert (a["slices"], a["kept"], a["structures"], a["truth_per_slice"]) == (2, 1, 2, 2.0)
    assert (a["precision50"], a["recall50"]) == (0.5, 0.5)
    assert (by_rule["a >= 0.9"]["precision50"], by_rule["a >= 0.9"]["recall50"]) == (1.0, 0.5)
    assert (by_rule["b >= 0.5"]["precision50"], by_rule["b >= 0.5"]["recall50"]) == (1.0, 1.0)
    assert by_rule["b >= 0.5"]["ARI"] == pytest.approx(1.0)
    assert by_rule["b >= 0.9"]["kept"] == 0 and by_rule["b >= 0.9"]["precision50"] is None
    # consensus: real_1 (both agree) stays; the invented one (a alone, 0.6) and real_2 (b alone, 0.85 < 0.9) go
    c = by_rule["consensus of 2 (2 agree, or one >= 0.9)"]
    assert (c["kept"], c["structures"], c["precision50"], c["recall50"]) == (1, 1, 1.0, 0.5)
    with pytest.raises(DataError, match="no saved instances of b for 1 slice"):
        pseudo_label_quality({"b": {"s0": teachers["b"]["s0"]}}, {"b": 1.0}, ["s0", "s1"], truth, [0.5])
