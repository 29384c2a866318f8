"""Ensemble teacher: fusion of hand-made instances, the pseudolabel mode and its quality row."""
from __future__ import annotations

import json

import numpy as np
import pytest

from d2ct.errors import ConfigError
from d2ct.pseudolabel.ensemble import EnsembleOptions, ensemble_instances

from .conftest import box_mask

H = W = 32


def _model(*instances):
    """(scores, masks) of one model from (score, mask) pairs."""
    if not instances:
        return np.zeros(0, np.float32), np.zeros((0, H, W), bool)
    return np.array([s for s, _ in instances], np.float32), np.stack([m for _, m in instances])


def test_two_models_agree_one_fused_instance_scored_above_a_lone_one():
    liver = box_mask(H, W, 2, 14, 2, 14)
    liver_b = box_mask(H, W, 3, 14, 2, 15)  # the same structure, drawn a little differently
    lone = box_mask(H, W, 20, 30, 20, 30)
    scores, masks, votes = ensemble_instances(
        [_model((0.8, liver), (0.9, lone)), _model((0.8, liver_b))], [0.5, 0.5])
    assert len(scores) == 2 and votes.tolist() == [2, 1]
    # agreed: both models' score counts, weighted (0.5 * 0.8 + 0.5 * 0.8)
    assert scores[0] == pytest.approx(0.8)
    # seen by one model only: its score times its weight share, below the agreed one although
    # the model was more confident about it
    assert scores[1] == pytest.approx(0.45)
    assert (masks[1] == lone).all()
    # the fused mask: pixels both hold, plus those of either (equal weight: a tie is half the vote)
    assert (masks[0] == (liver | liver_b)).all()
    with_strict_vote = ensemble_instances([_model((0.8, liver)), _model((0.8, liver_b))], [0.5, 0.5], vote=0.75)[1]
    assert (with_strict_vote[0] == (liver & liver_b)).all()


def test_weights_decide_the_fused_mask_and_the_score_of_a_lone_structure():
    a = box_mask(H, W, 2, 14, 2, 14)
    b = box_mask(H, W, 2, 14, 2, 16)  # two columns wider
    only_heavy, only_light = box_mask(H, W, 20, 26, 2, 10), box_mask(H, W, 20, 26, 20, 30)
    scores, masks, votes = ensemble_instances(
        [_model((0.7, a), (0.9, only_heavy)), _model((0.7, b), (0.9, only_light))], [3.0, 1.0])
    fused = {tuple(np.argwhere(m)[0]): (s, m, v) for s, m, v in zip(scores, masks, votes)}
    s, m, v = fused[(2, 2)]
    assert v == 2 and s == pytest.approx(0.7)
    assert (m == a).all()  # the heavier model (weight 0.75 of the vote) decides the disputed columns
    assert fused[(20, 2)][0] == pytest.approx(0.9 * 0.75)
    assert fused[(20, 20)][0] == pytest.approx(0.9 * 0.25)
    # all weights zero: equal weights
    s0 = ensemble_instances([_model((0.8, a)), _model()], [0.0, 0.0])[0]
    assert s0.tolist() == pytest.approx([0.4])


def test_each_model_gives_a_cluster_at_most_one_instance_and_low_scores_take_no_part():
    a = box_mask(H, W, 2, 14, 2, 14)
    a2 = box_mask(H, W, 2, 14, 3, 14)
    # model 0 predicts the structure twice: the duplicate cannot join its own model's cluster
    scores, _, votes = ensemble_instances([_model((0.9, a), (0.6, a2)), _model((0.8, a), (0.01, a2))], [0.5, 0.5])
    assert votes.tolist() == [2, 1]
    assert scores.tolist() == pytest.approx([0.85, 0.3])
    # nothing at all
    s, m, v = ensemble_instances([_model(), _model()], [0.5, 0.5])
    assert s.shape == (0,) and m.shape == (0, H, W) and v.shape == (0,)
    with pytest.raises(ConfigError, match="2 models' predictions but 1 weights"):
        ensemble_instances([_model(), _model()], [1.0])
    with pytest.raises(ConfigError, match="vote"):
        EnsembleOptions(vote=0.0).check()


def test_ensemble_threshold_defaults_to_the_weighted_mean_of_the_models_thresholds():
    assert EnsembleOptions().resolved_threshold([0.6, 0.9], [0.75, 0.25]) == pytest.approx(0.675)
    assert EnsembleOptions(threshold=0.3).resolved_threshold([0.6, 0.9], [0.75, 0.25]) == 0.3


def test_quality_table_gets_an_ensemble_row_next_to_each_radiologist():
    from pycocotools import mask as mask_util

    from d2ct.pseudolabel.quality import pseudo_label_quality

    def rles(*masks):
        return [mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]

    real_1, real_2, fake = box_mask(32, 32, 2, 12, 2, 12), box_mask(32, 32, 18, 28, 18, 28), box_mask(32, 32, 20, 30, 2, 10)
    truth = [(np.where(real_1, 1, 0) + np.where(real_2, 7, 0)).astype(np.uint8)]
    teachers = {"a": {"s0": (rles(real_1, fake), np.array([0.95, 0.6]))},
                "b": {"s0": (rles(real_1, real_2), np.array([0.8, 0.85]))}}
    rows = pseudo_label_quality(teachers, {"a": 0.5, "b": 0.5}, ["s0"], truth, {"a": [0.5], "b": [0.5]},
                                min_area=5, ensemble=EnsembleOptions())
    by_rule = {r["rule"]: r for r in rows}
    assert list(by_rule)[-1] == "ensemble of 2 >= 0.5"
    # real_1: 0.875 kept; real_2 (b alone): 0.425, fake (a alone): 0.3, both below 0.5
    e = by_rule["ensemble of 2 >= 0.5"]
    assert (e["kept"], e["structures"], e["precision50"], e["recall50"]) == (1, 1, 1.0, 0.5)
    # a grid of thresholds: one ensemble row per threshold, as for every teacher
    rows = pseudo_label_quality(teachers, {"a": 0.5, "b": 0.5}, ["s0"], truth, [0.2, 0.5], min_area=5,
                                ensemble=EnsembleOptions())
    grid = {r["rule"]: r for r in rows}
    assert grid["ensemble of 2 >= 0.2"]["structures"] == 3 and grid["ensemble of 2 >= 0.5"]["structures"] == 1
    # without ensemble options: the table as before
    assert not any(r["rule"].startswith("ensemble") for r in pseudo_label_quality(
        teachers, {"a": 0.5, "b": 0.5}, ["s0"], truth, [0.5], min_area=5))


def test_ensemble_mode_writes_fused_pseudo_labels_with_ignore_regions(tmp_path, monkeypatch):
    """pseudo_label_pool in ensemble mode, with the models' predictions stubbed (the prediction
    itself is covered by the tiny pipeline run): what is kept, what becomes an ignore region."""
    from PIL import Image

    from d2ct.engine.predictor import InstancePrediction
    from d2ct.pseudolabel import run
    from d2ct.pseudolabel.radiologists import Radiologist

    agreed, lone, weak = box_mask(H, W, 2, 14, 2, 14), box_mask(H, W, 18, 30, 2, 12), box_mask(H, W, 18, 30, 18, 30)
    per_model = {"m1": _model((0.9, agreed), (0.9, lone), (0.3, weak)), "m2": _model((0.8, agreed))}
    pool = []
    for i in range(2):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((H, W), 40 * i, np.uint8)).save(path)
        pool.append((f"{i}.png", str(path), i))

    def fake_predict(model, named_paths, cache_dir, **_):
        s, m = per_model[model.name]
        return [InstancePrediction(n, H, W, s, (m * 255).astype(np.uint8)) for n, _ in named_paths]

    monkeypatch.setattr(run, "predict_pool", fake_predict)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")  # stats.json records each model's weights by SHA-256
    rads = [Radiologist("m1", "c.yaml", str(weights), ap=0.5, threshold=0.7),
            Radiologist("m2", "c.yaml", str(weights), ap=0.5, threshold=0.5)]
    out = tmp_path / "out"
    stats = run.pseudo_label_pool(rads, pool, out, mode="ensemble", min_area=1, ignore_below=0.2, overlays=0)
    # fused: agreed 0.85 (kept), lone 0.45 and weak 0.15; threshold = mean(0.7, 0.5) = 0.6
    assert stats["ensemble"]["threshold"] == pytest.approx(0.6)
    assert stats["ensemble"]["structures_by_votes"] == {"1": 0, "2": 2}
    assert stats["labelled_images"] == 2 and stats["instances"] == 2 and stats["ignore_regions"] == 2
    coco = json.loads((out / "pseudo_labels.json").read_text())
    anns = [a for a in coco["annotations"] if a["image_id"] == 0]
    assert sorted((a["iscrowd"], round(a["score"], 3)) for a in anns) == [(0, 0.85), (1, 0.45)]
    assert "ensemble" in (out / "report.md").read_text()
    with pytest.raises(ConfigError, match="below the ensemble threshold 0.6"):
        run.pseudo_label_pool(rads, pool, out, mode="ensemble", ignore_below=0.6)
    with pytest.raises(ConfigError, match="partition mode only, or ensemble"):
        run.pseudo_label_pool(rads, pool, out, mode="consensus", ignore_below=0.1)
