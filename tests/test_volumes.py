"""Volume import: NIfTI / DICOM orientation, HU window, slice order, labels, inverse transform, errors.

Every synthetic volume samples one analytic object defined in world (RAS+) millimetres, so the
expected display array is computed independently of the code under test: column 0 is the patient's
right-most voxel (largest RAS x), row 0 the most anterior one (largest RAS y), slice 0 the most
inferior one (smallest z).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from d2ct.data.volumes import (
    import_volume, load_label_volume, load_volume, resample_slices, restore_slices, save_label_volume, select_slices,
    window,
)
from d2ct.errors import ConfigError, DataError

NX, NY, NZ = 22, 18, 7  # voxels along RAS x (left-right), y (antero-posterior), z
SX, SY, SZ = 2.0, 2.5, 3.0  # mm


def _axis(n, sp):
    return (np.arange(n) - (n - 1) / 2) * sp


XS, YS, ZS = _axis(NX, SX), _axis(NY, SY), _axis(NZ, SZ)


def world(x, y, z):
    """(HU, label) of the object at RAS+ mm. HU: air outside a box, inside 20 HU per slice level
    (so slice order is visible), a 500 HU marker at the patient's right-anterior corner (label 5),
    a 300-labelled block at the left-posterior corner in the upper half."""
    inside = (np.abs(x) < 18) & (np.abs(y) < 18)
    level = np.rint((z - ZS[0]) / SZ)
    hu = np.where(inside, 20.0 * level, -1000.0)
    marker = (x > 8) & (x < 18) & (y > 8) & (y < 18)
    hu = np.where(marker, 500.0, hu)
    lab = np.where(marker, 5, 0)
    block = (x < -8) & (x > -18) & (y < -8) & (y > -18) & (z > 0)
    lab = np.where(block, 300, lab)
    return hu.astype(np.float32), lab.astype(np.int32)


def expected_display():
    z, y, x = np.meshgrid(ZS, YS[::-1], XS[::-1], indexing="ij")
    return world(x, y, z)


def make_nifti(tmp_path: Path, R: np.ndarray, name: str = "ct.nii.gz", labels: bool = False, label_map=None):
    """Sample the object on a grid whose voxel axes point along the columns of the signed
    permutation ``R`` (RAS+ directions); returns the path and the native arrays."""
    R = np.asarray(R, float)
    world_n = np.array([NX, NY, NZ])
    world_sp = np.array([SX, SY, SZ])
    axes = [int(np.flatnonzero(R[:, j])[0]) for j in range(3)]  # world axis of each voxel axis
    shape = tuple(int(world_n[a]) for a in axes)
    A = np.eye(4)
    A[:3, :3] = R * world_sp[axes][None, :]
    A[:3, 3] = -A[:3, :3] @ ((np.array(shape) - 1) / 2)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    xyz = ijk @ A[:3, :3].T + A[:3, 3]
    hu, lab = world(xyz[..., 0], xyz[..., 1], xyz[..., 2])
    data = lab if labels else hu
    if label_map is not None:
        data = label_map(data)
    img = nib.Nifti1Image(data.astype(np.int16 if labels else np.float32), A)
    path = tmp_path / name
    nib.save(img, str(path))
    return path, data, A


AFFINES = {
    "ras": np.eye(3),
    "lps": np.diag([-1.0, -1.0, 1.0]),  # DICOM-like, as dcm2niix-less converters write it
    "permuted": np.array([[0, 0, -1], [0, -1, 0], [1, 0, 0]], float),  # i -> superior, j -> posterior, k -> left
    "flipped_z": np.diag([1.0, -1.0, -1.0]),
}


def test_window_values():
    hu = np.array([-1000, -160, 0, 40, 240, 3000], np.float32)
    assert window(hu).tolist() == [0, 0, 102, 128, 255, 255]
    assert window(np.array([0.0]), level=0, width=2000).tolist() == [128]
    with pytest.raises(DataError, match="width"):
        window(hu, width=0)


@pytest.mark.parametrize("orient", sorted(AFFINES))
def test_nifti_display_orientation(tmp_path, orient):
    path, _, _ = make_nifti(tmp_path, AFFINES[orient])
    vol = load_volume(path)
    exp_hu, _ = expected_display()
    assert vol.shape == (NZ, NY, NX) and vol.hu.dtype == np.float32
    np.testing.assert_array_equal(vol.hu, exp_hu)
    assert np.allclose(vol.spacing, (SZ, SY, SX))
    # marker (patient right, anterior) in the top-left quadrant of every slice
    rows, cols = np.nonzero(vol.hu[0] == 500)
    assert rows.max() < NY / 2 and cols.max() < NX / 2
    # slices inferior -> superior
    assert [float(vol.hu[z, NY // 2, NX // 2]) for z in range(NZ)] == [20.0 * z for z in range(NZ)]
    # display affine: voxel (0, 0, 0) is right (max x), anterior (max y), inferior (min z)
    assert np.allclose(vol.affine @ [0, 0, 0, 1], [XS[-1], YS[-1], ZS[0], 1])
    assert [vol.native_slice_index(z) for z in (0, NZ - 1)] in ([0, NZ - 1], [NZ - 1, 0])


# ----------------------------------------------------------------------------------------- DICOM
IOPS = {
    "standard": [1, 0, 0, 0, 1, 0],  # rows along patient left, columns posterior: already display
    "rotated180": [-1, 0, 0, 0, -1, 0],
    "transposed": [0, 1, 0, 1, 0, 0],  # rows run posterior, normal points inferior
}
SLOPE, INTERCEPT = 2.0, -1000.0


def write_dicom_series(folder: Path, iop, seed: int = 0, series_uid: str | None = None, n_extra: int = 1):
    """One CT series written with pydicom from scratch, files in shuffled order and named randomly.
    Geometry in LPS (DICOM): x = patient left, y = posterior. Stored = (HU - intercept) / slope."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row_dir, col_dir = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(row_dir, col_dir)
    # in-plane sizes: the axis along the rows has as many columns as world voxels on it
    wn = {0: (NX, SX), 1: (NY, SY)}
    cols, csp = wn[int(np.flatnonzero(row_dir)[0])]
    rows, rsp = wn[int(np.flatnonzero(col_dir)[0])]
    series_uid = series_uid or generate_uid()
    study = generate_uid()
    order = rng.permutation(NZ)
    for n, k in enumerate(order):
        z_lps = ZS[k]
        centre = np.array([0.0, 0.0, z_lps])
        ipp = centre - row_dir * csp * (cols - 1) / 2 - col_dir * rsp * (rows - 1) / 2
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        p = ipp[None, None, :] + c[..., None] * csp * row_dir + r[..., None] * rsp * col_dir
        hu, _ = world(-p[..., 0], -p[..., 1], p[..., 2])  # LPS -> RAS
        stored = np.rint((hu - INTERCEPT) / SLOPE).astype("<u2")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = int(n + 1)
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [rsp, csp]
        ds.SliceThickness = SZ
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"IM{rng.integers(1e9):09d}", enforce_file_format=True)
    for i in range(n_extra):
        (folder / f"README{i}.txt").write_text("not a DICOM file\n")
    return folder


@pytest.mark.parametrize("orient", sorted(IOPS))
def test_dicom_series_orientation_order_and_rescale(tmp_path, orient):
    folder = write_dicom_series(tmp_path / "series", IOPS[orient])
    vol = load_volume(folder)
    exp_hu, _ = expected_display()
    assert vol.kind == "dicom" and vol.shape == (NZ, NY, NX)
    np.testing.assert_array_equal(vol.hu, exp_hu)  # HU = stored * slope + intercept, exactly
    assert np.allclose(vol.spacing, (SZ, SY, SX))
    rows, cols = np.nonzero(vol.hu[3] == 500)
    assert rows.max() < NY / 2 and cols.max() < NX / 2
    # every display slice knows its file, and that file's position is that slice's
    import pydicom

    zs = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in vol.slice_files]
    assert np.allclose(zs, ZS)


# --------------------------------------------------------------------------------------- labels
def test_label_volume_in_another_orientation_and_roundtrip(tmp_path):
    img_path, _, _ = make_nifti(tmp_path, AFFINES["permuted"])
    lab_path, native_lab, _ = make_nifti(tmp_path, AFFINES["lps"], "seg.nii.gz", labels=True)
    vol = load_volume(img_path)
    disp = load_label_volume(lab_path, vol)  # same voxels, other axis order: accepted
    _, exp_lab = expected_display()
    np.testing.assert_array_equal(disp, exp_lab)
    # save_label_volume writes on the image's native grid: same array as a label sampled on it
    out = save_label_volume(disp, vol, tmp_path / "pred.nii.gz")
    _, native_exp, A = make_nifti(tmp_path, AFFINES["permuted"], "expected.nii.gz", labels=True)
    saved = nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), native_exp)
    assert np.allclose(saved.affine, A) and saved.get_data_dtype() == np.uint16  # 300 does not fit in uint8
    # deterministic bytes (gzip without a time stamp)
    again = save_label_volume(disp, vol, tmp_path / "pred2.nii.gz")
    assert again.read_bytes() == out.read_bytes()
    with pytest.raises(DataError, match="do not match"):
        save_label_volume(disp[:, :-1], vol, tmp_path / "bad.nii.gz")


def test_dicom_labels_and_save_roundtrip(tmp_path):
    folder = write_dicom_series(tmp_path / "series", IOPS["transposed"])
    vol = load_volume(folder)
    lab_path, _, _ = make_nifti(tmp_path, AFFINES["ras"], "seg.nii.gz", labels=True)
    disp = load_label_volume(lab_path, vol)
    _, exp_lab = expected_display()
    np.testing.assert_array_equal(disp, exp_lab)
    out = save_label_volume(disp, vol, tmp_path / "pred.nii")
    np.testing.assert_array_equal(load_label_volume(out, vol), exp_lab)


def test_label_grid_mismatch_names_the_file(tmp_path):
    img_path, _, _ = make_nifti(tmp_path, AFFINES["ras"])
    vol = load_volume(img_path)
    bad = tmp_path / "small_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((NX - 1, NY, NZ), np.int16), np.diag([SX, SY, SZ, 1])), str(bad))
    with pytest.raises(DataError, match="small_seg.nii.gz.*not on the grid"):
        load_label_volume(bad, vol)
    shifted = tmp_path / "shifted_seg.nii.gz"
    _, lab, A = make_nifti(tmp_path, AFFINES["ras"], "tmp_seg.nii.gz", labels=True)
    A2 = A.copy()
    A2[0, 3] += SX  # one voxel off
    nib.save(nib.Nifti1Image(lab.astype(np.int16), A2), str(shifted))
    with pytest.raises(DataError, match="shifted_seg"):
        import_volume(img_path, tmp_path / "out", label_path=shifted, progress=False)
    assert not (tmp_path / "out").exists()
    frac = tmp_path / "frac_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.full((NX, NY, NZ), 0.5, np.float32), A), str(frac))
    with pytest.raises(DataError, match="non-integer"):
        load_label_volume(frac, vol)


# ---------------------------------------------------------------------------------------- import
def _read_manifest(root: Path) -> list[dict]:
    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_import_nifti_keeps_labels_and_writes_layout(tmp_path):
    from d2ct.data.challenge import ChallengeDataset

    img_path, _, _ = make_nifti(tmp_path, AFFINES["lps"])
    lab_path, _, _ = make_nifti(tmp_path, AFFINES["lps"], "seg.nii.gz", labels=True,
                                label_map=lambda a: np.where(a == 300, 7, a))
    s = import_volume(img_path, tmp_path / "ds", label_path=lab_path, progress=False)
    assert s.n_slices == NZ and s.image_shape == (NY, NX) and s.n_labelled == NZ
    ds = ChallengeDataset.open(tmp_path / "ds")
    assert ds.names == [f"{i}.png" for i in range(NZ)] and ds.shape == (NY, NX)
    exp_hu, exp_lab = expected_display()
    exp_lab = np.where(exp_lab == 300, 7, exp_lab)
    for z in range(NZ):
        np.testing.assert_array_equal(ds.read_image(f"{z}.png"), window(exp_hu[z]))
        np.testing.assert_array_equal(ds.label_map(f"{z}.png"), exp_lab[z])  # values kept
    rows = _read_manifest(tmp_path / "ds")
    assert [int(r["slice_index"]) for r in rows] == list(range(NZ))
    assert np.allclose([float(r["z_mm"]) for r in rows], ZS)
    assert rows[0]["source"] == str(img_path) and float(rows[0]["pixel_mm_row"]) == SY
    assert rows[-1]["labels"] == "5=5;7=7" and rows[0]["labels"] == "5=5"
    meta = json.loads((tmp_path / "ds" / "import.json").read_text())
    assert meta["slice_indices"] == list(range(NZ)) and meta["volume_shape"] == [NZ, NY, NX]


def test_import_label_above_255_needs_renumbering(tmp_path):
    img_path, _, _ = make_nifti(tmp_path, AFFINES["ras"])
    lab_path, _, _ = make_nifti(tmp_path, AFFINES["ras"], "seg.nii.gz", labels=True)
    with pytest.raises(DataError, match="300.*renumber"):
        import_volume(img_path, tmp_path / "a", label_path=lab_path, progress=False)
    s = import_volume(img_path, tmp_path / "b", label_path=lab_path, renumber=True, seed=1, progress=False)
    from d2ct.data.labels_csv import read_labels_csv

    table = read_labels_csv(tmp_path / "b" / "labels.csv.gz")
    _, exp_lab = expected_display()
    numbers_of_marker = set()
    for z, name in enumerate(table.names):
        lab = table.label_map(name, (NY, NX))
        k = len(np.unique(exp_lab[z])) - 1
        assert set(np.unique(lab).tolist()) - {0} == set(range(1, k + 1))
        assert np.array_equal(lab > 0, exp_lab[z] > 0)
        numbers_of_marker.add(int(lab[exp_lab[z] == 5][0]))
    assert numbers_of_marker == {1, 2}  # renumbered per slice, not one fixed mapping
    assert s.n_labelled == NZ


def test_import_slice_selection_and_resampling(tmp_path):
    img_path, _, _ = make_nifti(tmp_path, AFFINES["permuted"])
    lab_path, _, _ = make_nifti(tmp_path, AFFINES["permuted"], "seg.nii.gz", labels=True,
                                label_map=lambda a: np.where(a == 5, 0, a))  # only the upper-half block
    s = import_volume(img_path, tmp_path / "sel", label_path=lab_path, only_labelled=True, step=2, size=32,
                      renumber=True, progress=False)
    labelled = [z for z in range(NZ) if ZS[z] > 0]
    assert s.slice_indices == labelled[::2] and s.image_shape == (32, 32)
    rows = _read_manifest(tmp_path / "sel")
    assert [int(r["slice_index"]) for r in rows] == labelled[::2]
    px = float(rows[0]["pixel_mm_row"])
    assert px == pytest.approx(max(NX * SX, NY * SY) / 32, rel=1e-3) and rows[0]["pixel_mm_col"] == rows[0]["pixel_mm_row"]
    s2 = import_volume(img_path, tmp_path / "rng", z_range=(2, 5), progress=False)
    assert s2.slice_indices == [2, 3, 4] and not (tmp_path / "rng" / "labels.csv.gz").exists()
    assert select_slices(10, step=3, z_range=(1, 9)) == [1, 4, 7]
    with pytest.raises(ConfigError, match="z_range"):
        select_slices(10, z_range=(5, 11))
    with pytest.raises(ConfigError, match="step"):
        select_slices(10, step=0)
    with pytest.raises(ConfigError, match="only_labelled"):
        import_volume(img_path, tmp_path / "x", only_labelled=True, progress=False)


def test_resample_and_restore_labels():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, size=(2, 9, 12)).astype(np.uint8)
    up, geom = resample_slices(lab, (2.0, 2.0), 48, labels=True)  # x4 wide side, padded rows
    assert up.shape == (2, 48, 48) and geom.resized == (36, 48) and geom.offset == (6, 0)
    assert not up[:, :6].any()
    np.testing.assert_array_equal(restore_slices(up, geom), lab)
    hu = np.full((1, 10, 20), 100.0, np.float32)
    small, g = resample_slices(hu, (1.0, 1.0), 10)
    assert g.resized == (5, 10) and g.offset == (2, 0) and np.allclose(small[0, 2:7], 100.0) and (small[0, :2] == -1024).all() and (small[0, 7:] == -1024).all()


# ----------------------------------------------------------------------------------------- errors
def test_unreadable_and_missing_inputs(tmp_path):
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(b"this is not a nifti file at all" * 10)
    with pytest.raises(DataError, match="broken.nii.gz"):
        load_volume(garbage)
    with pytest.raises(DataError, match="not found"):
        load_volume(tmp_path / "nope.nii")
    with pytest.raises(DataError, match="not a NIfTI"):
        (tmp_path / "x.png").write_bytes(b"x")
        load_volume(tmp_path / "x.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        load_volume(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="no DICOM image slices"):
        load_volume(junk)


def test_two_series_need_a_choice(tmp_path):
    folder = tmp_path / "mixed"
    write_dicom_series(folder, IOPS["standard"], seed=1, series_uid="1.2.3.1", n_extra=0)
    write_dicom_series(folder, IOPS["standard"], seed=2, series_uid="1.2.3.2", n_extra=0)
    with pytest.raises(DataError, match="2 DICOM series"):
        load_volume(folder)
    assert load_volume(folder, series_uid="1.2.3.2").shape == (NZ, NY, NX)


def test_existing_output_and_tool(tmp_path, capsys):
    img_path, _, _ = make_nifti(tmp_path, AFFINES["lps"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        import_volume(img_path, out, progress=False)
    assert (out / "keep.txt").exists()
    from d2ct.data.cli import import_volume as tool
    assert tool.main([str(img_path), "--out", str(out), "--overwrite", "--z-range", "1:3", "--size", "16"]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0.png", "1.png"] and not (out / "keep.txt").exists()
    assert tool.main([str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o2")]) == 2
    assert "error: " in capsys.readouterr().err
