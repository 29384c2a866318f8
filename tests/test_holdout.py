"""Patient-disjoint hold-out test splits (d2ct.data.holdout, tools/make_holdout.py)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from d2ct.data.challenge import ChallengeDataset
from d2ct.data.holdout import make_holdout
from d2ct.data.images import write_slice
from d2ct.data.labels_csv import read_labels_csv, write_labels_csv
from d2ct.errors import DataError

from .conftest import run_tool

N, N_LABELLED, H, W = 30, 18, 8, 8


def _patient(i: int) -> str:
    return f"pt_{i % 6}"  # 6 patients, each with labelled and pool slices


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    names = [f"{i}.png" for i in range(N)]
    maps = []
    for i, n in enumerate(names):
        write_slice(root / "train-images" / n, rng.integers(0, 256, (H, W), dtype=np.uint8))
        lm = np.zeros((H, W), np.uint8)
        if i < N_LABELLED:
            lm[1:4, 1:4] = 3
            lm[5:7, 2:6] = i % 5 + 4
        maps.append(lm)
    write_labels_csv(root / "labels.csv.gz", names, maps)
    (root / "annotated.json").write_text(json.dumps({"annotated": names[:N_LABELLED]}))
    pd.DataFrame({"id": range(N), "file": names, "patient": [_patient(i) for i in range(N)]}).to_csv(
        root / "manifest.csv", index=False)
    return root, dict(zip(names, maps))


def test_holdout_is_patient_disjoint_and_complete(source, tmp_path):
    root, maps = source
    summary = make_holdout(root, tmp_path / "out", test_fraction=0.3, seed=1)
    out = ChallengeDataset.open(tmp_path / "out")
    test = out.test_split()
    assert test is not None and test.labels_path.name == "test-labels.csv.gz"
    assert sorted(test.names) == sorted(summary["test_images"]) and len(test.names) >= round(0.3 * N_LABELLED)
    test_patients = {_patient(int(n.split(".")[0])) for n in test.names}
    train_patients = {_patient(int(n.split(".")[0])) for n in out.names}
    assert test_patients.isdisjoint(train_patients)  # pool slices of test patients are left out too
    assert summary["pool_images_of_test_groups_left_out"] == sum(
        1 for i in range(N_LABELLED, N) if _patient(i) in test_patients)
    assert len(out.labelled_names) == summary["train_labelled"] == N_LABELLED - len(test.names)
    for n in out.labelled_names:
        assert np.array_equal(out.label_map(n), maps[n])
    for n in test.names:
        assert np.array_equal(test.label_map(n), maps[n])
        assert (test.image_dir / n).read_bytes() == (root / "train-images" / n).read_bytes()
    assert all(out.labels.is_empty(n) for n in out.unlabelled_names)
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert set(manifest["holdout"]) == {"train", "test"} and len(manifest) == len(out.names) + len(test.names)
    # same seed, same split; the tool says the same
    assert make_holdout(root, tmp_path / "again", test_fraction=0.3, seed=1)["test_images"] == summary["test_images"]
    proc = run_tool("make_holdout.py", "--data", root, "--out", tmp_path / "tool", "--test-fraction", "0.3",
                    "--seed", "1", "--link")
    assert json.loads(proc.stdout)["test"] == len(test.names)
    assert (tmp_path / "tool" / "test-images" / test.names[0]).is_symlink()
    assert read_labels_csv(tmp_path / "tool" / "test-labels.csv.gz").names == sorted(
        test.names, key=lambda n: int(n.split(".")[0]))


def test_holdout_errors_name_the_problem(source, tmp_path):
    root, _ = source
    with pytest.raises(DataError, match="no column 'scanner'"):
        make_holdout(root, tmp_path / "o1", group_by="scanner")
    make_holdout(root, tmp_path / "o2")
    with pytest.raises(DataError, match="already has a test-images/ folder"):
        make_holdout(tmp_path / "o2", tmp_path / "o3")
    with pytest.raises(DataError, match="exists and is not empty"):
        make_holdout(root, tmp_path / "o2")
    (root / "manifest.csv").write_text("file,patient\n0.png,a\n")
    with pytest.raises(DataError, match=r"image '1\.png' has no row"):
        make_holdout(root, tmp_path / "o4")
    proc = run_tool("make_holdout.py", "--data", root, "--out", tmp_path / "o5", check=False)
    assert proc.returncode == 2 and "has no row" in proc.stderr and "Traceback" not in proc.stderr
