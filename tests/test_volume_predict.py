"""End to end on the 3-D phantom: make_phantom --volume, predict.py on the NIfTI (linked labels on the
input's grid, side files, 3-plane overlay), evaluate.py on label volumes (3-D scores)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from d2ct.evaluation.volume_metrics import score_volume

from .conftest import run_tool


@pytest.fixture(scope="module")
def phantom3d(tmp_path_factory):
    root = tmp_path_factory.mktemp("p3d") / "vol"
    proc = run_tool("make_phantom.py", "--volume", "--out", root, "--size", "96", "--n-slices", "12", "--seed", "1")
    assert "ct.nii.gz" in proc.stdout
    return root


def _linked_consistently(per_slice: np.ndarray, linked: np.ndarray) -> None:
    """Linking only renames: on every slice the kept voxels have the same partition as the per-slice
    labels, and what linking dropped is background."""
    for z in range(per_slice.shape[0]):
        keep = linked[z] > 0
        assert np.all(per_slice[z][keep] > 0)
        if keep.any():
            assert adjusted_rand_score(per_slice[z][keep], linked[z][keep]) == 1.0


def test_predict_phantom_volume_links_slices(tiny_model, phantom3d, tmp_path, capsys):
    ct = phantom3d / "ct.nii.gz"
    common = ["--model", tiny_model, "--input", ct, "--size", "96", "--threshold", "0.0", "--min-area", "1"]
    run_tool("predict.py", *common, "--out", tmp_path / "slices.nii.gz", "--per-slice-labels")
    proc = run_tool("predict.py", *common, "--out", tmp_path / "seg.nii.gz", "--viz", tmp_path / "viz",
                    "--min-slices", "1")
    assert "structures" in proc.stdout
    img = nib.load(ct)
    seg = nib.load(tmp_path / "seg.nii.gz")
    assert seg.shape == img.shape and np.allclose(seg.affine, img.affine)
    linked = np.asarray(seg.dataobj).astype(np.int64)
    per_slice = np.asarray(nib.load(tmp_path / "slices.nii.gz").dataobj).astype(np.int64)
    # native RAS array (x, y, z): move the slices first for the per-slice check
    _linked_consistently(np.moveaxis(per_slice, 2, 0), np.moveaxis(linked, 2, 0))
    side = json.loads((tmp_path / "seg.json").read_text())
    assert side["n_structures"] == len(np.unique(linked)) - 1
    assert side["linking"]["min_slices"] == 1
    for row in side["structures"]:
        assert row["voxels"] == int((linked == row["label"]).sum())
        assert row["mean_score"] is None or 0.0 <= row["mean_score"] <= 1.0
    assert (tmp_path / "seg.label.txt").is_file() and (tmp_path / "seg.ctbl").is_file()
    assert (tmp_path / "viz" / "seg_3plane.png").is_file()
    # per-slice numbers of a 2-D model cost nothing per slice but a lot in 3-D; linking recovers it
    truth = np.asarray(nib.load(phantom3d / "labels.nii.gz").dataobj)
    assert score_volume(truth, linked).summary["ARI_3d_fg"] >= score_volume(truth, per_slice).summary["ARI_3d_fg"] - 1e-9

    # the evaluate command on label volumes (in-process: the subprocess path is tested below)
    from d2ct.evaluation.cli import main as evaluate

    out = tmp_path / "eval"
    assert evaluate(["--truth", str(phantom3d / "labels.nii.gz"), "--pred", str(tmp_path / "seg.nii.gz"),
                     "--out", str(out)]) == 0
    assert "ARI 3-D" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ARI_3d"] == pytest.approx(adjusted_rand_score(truth.ravel(), linked.ravel()), abs=1e-12)
    assert (out / "per_structure.csv").is_file()


def test_evaluate_volume_is_exact_on_truth_and_names_grid_mismatch(phantom3d, tmp_path):
    truth = phantom3d / "labels.nii.gz"
    proc = run_tool("evaluate.py", "--truth", truth, "--pred", truth)
    assert "ARI 3-D (all voxels)      1.0000" in proc.stdout
    img = nib.load(truth)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :-1], img.affine), tmp_path / "short.nii.gz")
    proc = run_tool("evaluate.py", "--truth", truth, "--pred", tmp_path / "short.nii.gz", check=False)
    assert proc.returncode == 2 and "short.nii.gz" in proc.stderr


def test_predict_png_slices_of_one_scan_with_link_slices(tiny_model, phantom3d, tmp_path):
    """A folder of PNG slices that are one scan, in name order: --link-slices numbers each structure
    the same on every slice of the CSV, and changes nothing else."""
    from d2ct.data.images import write_slice
    from d2ct.data.labels_csv import read_labels_csv
    from d2ct.data.volumes import load_volume, window

    vol = load_volume(phantom3d / "ct.nii.gz")
    folder = tmp_path / "slices"
    folder.mkdir()
    for z, img in enumerate(window(vol.hu)):
        write_slice(folder / f"{z}.png", img)
    common = ["--model", tiny_model, "--input", folder, "--threshold", "0.0", "--min-area", "1"]
    run_tool("predict.py", *common, "--out", tmp_path / "plain.csv")
    run_tool("predict.py", *common, "--out", tmp_path / "linked.csv", "--link-slices", "--min-slices", "1")
    names = [f"{z}.png" for z in range(vol.shape[0])]
    shape = vol.shape[1:]
    plain = read_labels_csv(tmp_path / "plain.csv")
    linked = read_labels_csv(tmp_path / "linked.csv")
    a = np.stack([plain.label_map(n, shape) for n in names])
    b = np.stack([linked.label_map(n, shape) for n in names])
    _linked_consistently(a, b)
    assert np.array_equal(a > 0, b > 0)  # min-slices 1: nothing dropped
