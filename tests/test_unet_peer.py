"""The U-Net peer: targets, label maps from probabilities, and a tiny real training run whose
submission CSV d2ct's evaluation scores."""
from __future__ import annotations

import json

import numpy as np
import pytest

from d2ct.data.labels_csv import read_labels_csv
from d2ct.peer.unet import (BACKGROUND, BOUNDARY, INTERIOR, UNetOptions, label_map_from_probabilities,
                            pixel_classes)

from .conftest import run_tool


def _two_touching():
    y = np.zeros((20, 20), np.uint8)
    y[4:16, 2:10] = 3
    y[4:16, 10:18] = 7  # touches label 3 along column 9|10
    return y


def test_pixel_classes_mark_the_rims_between_structures():
    y = _two_touching()
    t = pixel_classes(y)
    assert (t[y == 0] == BACKGROUND).all()
    assert (t[4:16, 9] == BOUNDARY).all() and (t[4:16, 10] == BOUNDARY).all()  # where 3 meets 7
    assert (t[5:15, 3:9] == INTERIOR).all()
    assert set(np.unique(pixel_classes(y, boundary=False))) == {0, 1}


def test_touching_structures_stay_apart_through_the_boundary_class():
    y = _two_touching()
    probs = np.eye(3)[pixel_classes(y)].transpose(2, 0, 1).astype(np.float32)  # a perfect prediction
    out = label_map_from_probabilities(probs, min_area=1)
    assert out.max() == 2
    from d2ct.evaluation.ari import adjusted_rand_index

    assert adjusted_rand_index(y, out) == pytest.approx(1.0)
    # foreground only: the two become one structure
    fg = np.stack([probs[0], probs[1] + probs[2]])
    assert label_map_from_probabilities(fg, min_area=1).max() == 1
    # small components are dropped
    probs[:, 0, 0] = [0, 1, 0]
    assert label_map_from_probabilities(probs, min_area=2).max() == 2


def test_unet_trains_and_its_submission_is_scored(tmp_path):
    from d2ct.data.phantom import write_phantom_dataset

    data = tmp_path / "phantom"
    write_phantom_dataset(data, n_train=10, n_labelled=10, n_test=3, size=64, seed=2, progress=False)
    out = tmp_path / "unet"
    proc = run_tool("train_unet.py", "--data", data, "--out", out, "--iters", "150", "--batch-size", "4",
                    "--eval-period", "75", "--channels", "8", "16", "32", "--device", "cpu", timeout=600)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["iteration"] for r in metrics["history"]] == [75, 150]
    assert all("val_ARI" in r for r in metrics["history"]) and metrics["best"]["iteration"] in (75, 150)
    # it learned something: the loss fell well below the untrained network's
    assert metrics["final_loss"] < 0.75 * metrics["first_loss"]
    for name in ("model_best.pt", "model_final.pt", "submission.csv", "evaluate/summary.json"):
        assert (out / name).exists(), name
    sub = read_labels_csv(out / "submission.csv")
    assert sub.names == ["0.png", "1.png", "2.png"] and sub.n_pixels == 64 * 64
    assert "ARI" in proc.stdout
    ev = run_tool("evaluate.py", "--truth", data / "test-labels.csv.gz", "--pred", out / "submission.csv")
    assert "ARI" in ev.stdout
    summary = json.loads((out / "evaluate" / "summary.json").read_text())["summary"]
    assert -1 <= summary["ARI"] <= 1


def test_a_wall_time_budget_ends_the_cosine_schedule(tmp_path):
    """--seconds stops training long before --iters: the learning rate must still decay to zero,
    or the model kept is one trained at full rate."""
    from d2ct.peer.unet import train_unet

    rng = np.random.default_rng(0)
    images = rng.random((4, 32, 32), dtype=np.float32)
    labels = np.stack([_two_touching()] * 4)
    labels = np.pad(labels, ((0, 0), (6, 6), (6, 6)))
    options = UNetOptions(max_iter=100000, max_seconds=2.0, eval_period=100000, channels=(4, 8), batch_size=2)
    summary = train_unet(images, labels, tmp_path, options)
    assert summary["iterations"] < options.max_iter  # stopped by the clock
    assert summary["history"][-1]["lr"] < 1e-3 * options.lr


def test_unet_options_are_checked():
    from d2ct.errors import ConfigError

    with pytest.raises(ConfigError, match="max_iter"):
        UNetOptions(max_iter=0).check()
    with pytest.raises(ConfigError, match="two channel widths"):
        UNetOptions(channels=(8,)).check()
