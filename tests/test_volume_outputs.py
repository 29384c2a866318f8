"""3-D phantom volumes, 3-D scores, and the files written next to a predicted label volume
(NIfTI on the input's grid, JSON side-car, ITK-SNAP / Slicer colour tables, 3-plane overlay)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

from d2ct.data.phantom import generate_volume, write_phantom_volume
from d2ct.data.volumes import load_label_volume, load_volume
from d2ct.errors import ConfigError
from d2ct.evaluation.volume_metrics import format_volume_scores, score_volume
from d2ct.postprocess.linking import LinkOptions
from d2ct.postprocess.volume_output import write_volume_prediction

from .test_linking import scramble

SIZE, NZ = 80, 24


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("vol") / "phantom3d"
    paths = write_phantom_volume(root, seed=4, size=SIZE, n_slices=NZ)
    return root, paths


def test_phantom_volume_is_smooth_and_reproducible(phantom, tmp_path):
    hu, lab, info = generate_volume(4, SIZE, NZ)
    assert hu.shape == lab.shape == (NZ, SIZE, SIZE) and lab.dtype == np.uint8
    names = info["structures"]
    assert {"liver", "spleen", "kidney_left", "aorta", "vertebral_column"} <= set(names.values())
    # every structure occupies one run of consecutive slices, and its area changes gradually
    for label in names:
        present = np.flatnonzero((lab == label).any(axis=(1, 2)))
        assert present.size and np.array_equal(present, np.arange(present[0], present[-1] + 1)), names[label]
    liver = next(k for k, v in names.items() if v == "liver")
    area = (lab == liver).sum(axis=(1, 2))
    inside = area[area > 0]
    assert np.abs(np.diff(inside)).max() < 0.35 * inside.max()
    # the liver is at the top (superior = high slice index), the hip bones at the bottom
    hip = next(k for k, v in names.items() if v == "hip_right")
    assert np.flatnonzero(area)[-1] == NZ - 1
    assert np.flatnonzero((lab == hip).any(axis=(1, 2)))[0] == 0
    # same parameters, same files
    again = write_phantom_volume(tmp_path / "again", seed=4, size=SIZE, n_slices=NZ)
    for key in ("ct.nii.gz", "labels.nii.gz"):
        assert again[key].read_bytes() == phantom[1][key].read_bytes()
    with pytest.raises(ConfigError, match="levels"):
        generate_volume(0, 64, 8, levels=(0.5, 0.2))


def test_phantom_nifti_reads_back_in_display_orientation(phantom):
    root, paths = phantom
    hu, lab, info = generate_volume(4, SIZE, NZ)
    vol = load_volume(paths["ct.nii.gz"])
    assert vol.shape == hu.shape
    assert np.allclose(vol.spacing, info["spacing"])
    assert np.abs(vol.hu - np.clip(np.rint(hu), -1024, 3071)).max() == 0
    np.testing.assert_array_equal(load_label_volume(paths["labels.nii.gz"], vol), lab)
    meta = json.loads(paths["structures.json"].read_text())
    assert meta["structures"] == {str(k): v for k, v in info["structures"].items()}


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("P", "S", "R")])
def test_linked_volume_keeps_the_input_affine_and_grid(phantom, tmp_path, codes):
    """The phantom stored in three orientations; per-slice labels renumbered at random, linked and
    written: the NIfTI has the input's own affine, shape and axis order, and one label per organ."""
    from nibabel import orientations as ornt

    _, paths = phantom
    ct = nib.load(paths["ct.nii.gz"])
    xform = ornt.ornt_transform(ornt.io_orientation(ct.affine), ornt.axcodes2ornt(codes))
    ct2 = ct.as_reoriented(xform)
    assert nib.aff2axcodes(ct2.affine) == codes
    nib.save(ct2, tmp_path / "ct.nii.gz")
    lab_native = np.asarray(nib.load(paths["labels.nii.gz"]).as_reoriented(xform).dataobj)

    vol = load_volume(tmp_path / "ct.nii.gz")
    truth = vol.to_display(lab_native)
    out = tmp_path / "seg.nii.gz"
    result = write_volume_prediction(scramble(truth, 3), vol, out, options=LinkOptions(min_slices=1),
                                     viz=tmp_path / "viz")
    seg = nib.load(out)
    assert seg.shape == ct2.shape
    assert np.allclose(seg.affine, ct2.affine) and nib.aff2axcodes(seg.affine) == codes
    data = np.asarray(seg.dataobj)
    assert adjusted_rand_score(lab_native.ravel(), data.ravel()) == 1.0
    assert result["n_structures"] == len(np.unique(lab_native)) - 1

    side = json.loads(result["paths"]["json"].read_text())
    rows = side["structures"]
    assert [r["label"] for r in rows] == list(range(1, len(rows) + 1))
    vox = [r["voxels"] for r in rows]
    assert vox == sorted(vox, reverse=True)  # largest first
    voxel_ml = float(np.prod(vol.spacing)) / 1000
    for r in rows:
        assert r["voxels"] == int((data == r["label"]).sum())
        assert r["volume_ml"] == pytest.approx(r["voxels"] * voxel_ml, rel=1e-3)
        zs = np.flatnonzero((vol.to_display(data) == r["label"]).any(axis=(1, 2)))
        assert (r["z_first"], r["z_last"]) == (zs[0], zs[-1])
    itk = result["paths"]["itksnap"].read_text().splitlines()
    assert sum(1 for line in itk if line and not line.startswith("#")) == len(rows) + 1
    ctbl = [line.split() for line in result["paths"]["slicer"].read_text().splitlines() if not line.startswith("#")]
    assert [int(c[0]) for c in ctbl] == list(range(len(rows) + 1)) and all(len(c) == 6 for c in ctbl)
    png = result["paths"]["viz"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000


def test_per_slice_labels_kept_on_request(phantom, tmp_path):
    _, paths = phantom
    vol = load_volume(paths["ct.nii.gz"])
    truth = load_label_volume(paths["labels.nii.gz"], vol)
    scrambled = scramble(truth, 5)
    out = tmp_path / "seg.nii"
    write_volume_prediction(scrambled, vol, out, link=False)
    np.testing.assert_array_equal(vol.to_display(np.asarray(nib.load(out).dataobj)), scrambled)


def _direct_scores(truth, pred):
    """Per-structure Dice after Hungarian IoU matching, from boolean masks directly."""
    tl = [v for v in np.unique(truth) if v]
    pl = [v for v in np.unique(pred) if v]
    iou = np.zeros((len(tl), len(pl)))
    dice = np.zeros_like(iou)
    for i, t in enumerate(tl):
        a = truth == t
        for j, p in enumerate(pl):
            b = pred == p
            inter = np.logical_and(a, b).sum()
            iou[i, j] = inter / np.logical_or(a, b).sum()
            dice[i, j] = 2 * inter / (a.sum() + b.sum())
    r, c = linear_sum_assignment(iou, maximize=True)
    ok = iou[r, c] > 0
    return dice[r[ok], c[ok]].sum() / len(tl)


def test_3d_scores_match_direct_computation_and_count_errors():
    _, truth, info = generate_volume(2, 64, 16)
    names = {v: k for k, v in info["structures"].items()}
    pred = truth.astype(np.uint16) * 3 + 1000 * (truth > 0)  # renamed (labels are arbitrary)
    pred[truth == 0] = 0
    # split the liver into three stacked parts of about equal volume (three predicted structures)
    idx = np.flatnonzero(truth.ravel() == names["liver"])  # in z order
    flat = pred.reshape(-1)
    for k, part in enumerate(np.array_split(idx, 3)):
        flat[part] = 2010 + k
    # merge both kidneys into one prediction; miss the spleen; shift the aorta by 3 voxels
    pred[(truth == names["kidney_left"]) | (truth == names["kidney_right"])] = 2001
    pred[truth == names["spleen"]] = 0
    aorta = truth == names["aorta"]
    pred[aorta] = 0
    pred[np.roll(aorta, 3, axis=2) & (pred == 0)] = 2002

    s = score_volume(truth, pred, spacing=info["spacing"])
    assert s.summary["ARI_3d"] == pytest.approx(adjusted_rand_score(truth.ravel(), pred.ravel()), abs=1e-12)
    fg = truth > 0
    assert s.summary["ARI_3d_fg"] == pytest.approx(adjusted_rand_score(truth[fg], pred[fg]), abs=1e-12)
    assert s.summary["Dice_3d"] == pytest.approx(_direct_scores(truth, pred), abs=1e-12)
    status = {info["structures"][r["label"]]: r["status"] for r in s.per_structure}
    assert status["liver"] == "split"
    # the smaller kidney is merged; the larger is found when it still has IoU >= 0.5 with the union
    kl, kr = ((truth == names[k]).sum() for k in ("kidney_left", "kidney_right"))
    small, large = ("kidney_left", "kidney_right") if kl < kr else ("kidney_right", "kidney_left")
    assert status[small] == "merged"
    assert status[large] == ("found" if max(kl, kr) / (kl + kr) >= 0.5 else "merged")
    assert status["spleen"] == "missed"
    assert status["vertebral_column"] == "found"
    n = len(info["structures"])
    assert s.summary["n_true"] == n
    assert s.summary["found"] + s.summary["missed"] + s.summary["split"] + s.summary["merged"] == n
    assert s.summary["merged"] == 1 + (status[large] == "merged") and s.summary["split"] == 1
    assert "ARI 3-D" in format_volume_scores(s)
    # identical partitions score 1 whatever the numbering
    perfect = score_volume(truth, np.where(truth > 0, 255 - truth, 0))
    assert perfect.summary["ARI_3d"] == 1.0 and perfect.summary["Dice_3d"] == 1.0
    assert perfect.summary["found"] == n and perfect.summary["false"] == 0
    # per-slice numbering (what an unlinked 2-D model gives) is penalised in 3-D, clearly on the
    # truth-foreground voxels (over all voxels the background pairs dominate)
    unlinked = score_volume(truth, scramble(truth, 0)).summary
    assert unlinked["ARI_3d"] < 1.0 and unlinked["ARI_3d_fg"] < 0.5 and unlinked["found"] < n // 2
