"""Watershed baseline: beats the trivial prediction on phantom slices, presets run, CSV round-trip."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2ct.baseline.watershed import (
    PRESETS,
    BaselineConfig,
    compare_configs,
    get_preset,
    preprocess,
    relabel_uint8,
    segment_files,
    segment_slice,
)
from d2ct.errors import ConfigError
from d2ct.evaluation.ari import adjusted_rand_index, mean_ari

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantom_slices():
    from d2ct.data.phantom import generate_slice

    rng = np.random.default_rng(7)
    return [generate_slice(rng, size=128)[:2] for _ in range(4)]


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from d2ct.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom") / "ds"
    write_phantom_dataset(root, n_train=6, n_labelled=4, n_test=2, size=96, seed=3, progress=False)
    return root


def test_baseline_beats_all_background_on_phantom(phantom_slices):
    for name in PRESETS:
        ours, trivial = [], []
        for image, label in phantom_slices:
            pred = segment_slice(image, name)
            assert pred.shape == image.shape and pred.dtype == np.uint8
            ours.append(adjusted_rand_index(label, pred, exclude_background=True))
            trivial.append(adjusted_rand_index(label, np.zeros_like(label), exclude_background=True))
        assert mean_ari(trivial) == 0.0  # one predicted cluster vs several true structures
        assert mean_ari(ours) > 0.05, name


def test_presets_and_config_validation():
    assert set(PRESETS) == {"baseline", "clahe_bilateral", "clahe_tv"}
    assert get_preset("clahe_tv").denoise == "tv" and get_preset("clahe_tv").clahe
    assert get_preset("baseline", marker_threshold=3).marker_threshold == 3
    with pytest.raises(ConfigError, match="preset"):
        get_preset("nope")
    with pytest.raises(ConfigError, match="denoise"):
        BaselineConfig(denoise="gaussian")
    with pytest.raises(ConfigError, match="background"):
        BaselineConfig(background="outside")
    with pytest.raises(ConfigError, match="unknown"):
        PRESETS["baseline"].replace(not_a_field=1)


def test_preprocessing_changes_the_image_and_keeps_uint8():
    rng = np.random.default_rng(0)
    img = (np.clip(rng.normal(100, 30, (40, 40)), 0, 255)).astype(np.uint8)
    img.setflags(write=False)  # like a PIL-backed array
    for name in PRESETS:
        out = preprocess(img, PRESETS[name])
        assert out.dtype == np.uint8 and out.shape == img.shape and out.flags.writeable
    tv = preprocess(img, PRESETS["clahe_tv"].replace(clahe=False))
    assert tv.std() < img.std()  # denoising smooths
    assert segment_slice(np.full((20, 20), 7, np.uint8)).max() == 0  # flat image: all background


def test_background_modes_and_relabel():
    img = np.zeros((60, 60), np.uint8)
    img[10:50, 10:50] = 120  # body
    img[20:30, 20:30] = 200  # organ
    img[35:45, 35:45] = 60
    for bg in ("none", "largest", "border", "dark"):
        pred = segment_slice(img, get_preset("baseline", background=bg, marker_radius=2))
        if bg == "none":
            assert (pred > 0).all()
        else:
            assert pred[0, 0] == 0 and pred[25, 25] > 0  # air outside is background, the organ is not
    big = np.arange(600).reshape(20, 30)
    lab = relabel_uint8(big)
    assert lab.max() == 255 and (lab == 0).sum() == 600 - 255  # 599 regions + 0: the largest 255 kept
    lab2 = relabel_uint8(np.array([[0, 5, 5, 9], [9, 9, 3, 3]]), background=[9])
    np.testing.assert_array_equal(lab2, [[0, 2, 2, 0], [0, 0, 1, 1]])  # equal areas: smaller id first


def test_segment_files_parallel_matches_serial_and_csv_reads_back(phantom_root, tmp_path):
    from d2ct.data.images import list_slices
    from d2ct.data.labels_csv import read_labels_csv

    img_dir = phantom_root / "train-images"
    names = list_slices(img_dir)[:4]
    paths = [img_dir / n for n in names]
    serial = segment_files(paths, "clahe_tv", workers=1, progress=False)
    parallel = segment_files(paths, "clahe_tv", workers=2, progress=False)
    np.testing.assert_array_equal(serial, parallel)

    out = tmp_path / "sub.csv.gz"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "baseline.py"), "--images", str(img_dir), "--out", str(out),
                        "--preset", "clahe_tv", "--workers", "2", "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr  # the pool's workers end quietly
    table = read_labels_csv(out)
    assert table.names == list_slices(img_dir)
    np.testing.assert_array_equal(table.values[:4].reshape(serial.shape), serial)


def test_compare_presets_tool(phantom_root, tmp_path):
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "baseline.py"), "--data", str(phantom_root),
                        "--compare-presets", "--out-dir", str(out), "--quiet", "--set", "marker_radius=2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "clahe_tv" in r.stdout and "| ARI | ARI_fg |" in r.stdout
    doc = json.loads((out / "compare.json").read_text())
    assert [row["preset"] for row in doc["rows"]] == list(PRESETS)
    assert all(row["n_images"] == 4 and -1 <= row["ARI"] <= 1 for row in doc["rows"])
    assert doc["configs"]["baseline"]["marker_radius"] == 2
    assert (out / "clahe_tv" / "summary.json").is_file() and (out / "clahe_tv" / "labels.csv.gz").is_file()
    rows = compare_configs(phantom_root, {"t": get_preset("clahe_tv")}, split="test", workers=1, progress=False)
    assert rows[0]["n_images"] == 2


def test_tool_errors(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "baseline.py")]
    r = subprocess.run(tool + ["--images", str(tmp_path / "missing"), "--out", str(tmp_path / "x.csv")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "missing" in r.stderr
    r = subprocess.run(tool + ["--images", str(tmp_path), "--out", "x.csv", "--set", "marker_threshold=abc"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "marker_threshold" in r.stderr
