"""CT volumes (NIfTI, DICOM series) -> display-oriented HU slices -> the challenge layout.

Display orientation (what every d2ct slice looks like): the radiological view, as the challenge
images are: rows run anterior -> posterior (anterior at the top), columns run patient right ->
patient left (the patient's right on the image left), and slices run inferior -> superior.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from d2ct.errors import ConfigError, DataError
from d2ct.utils.fileio import umask_mode

logger = logging.getLogger(__name__)


def window(hu: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """HU -> uint8 display values: ``round(255 * (hu - (level - width/2)) / width)``, clipped to 0..255.

    The default (level 40 / width 400, i.e. -160..240 HU) is the challenge's abdominal window.
    """
    if not width > 0:
        raise DataError(f"window width must be > 0 HU, got {width}")
    lo = level - width / 2.0
    out = np.asarray(hu, dtype=np.float32) - np.float32(lo)
    out *= np.float32(255.0 / width)
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the block succeeds it is renamed
    onto ``path`` (replacing an existing folder only when ``overwrite``), else it is removed.

    A killed run leaves at most a hidden ``.<name>.*.tmp`` folder, never a half-written ``path``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DataError(f"output folder {path} exists and is not empty; choose another one or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes 0700 folders
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "data")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------- volumes in memory
_DISPLAY_CODES = ("L", "P", "S")  # array axes (col, row, slice): towards patient Left, Posterior, Superior
_SWAP = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)  # (z, r, c) <-> (c, r, z)


@dataclass
class Volume:
    """A CT volume in display orientation.

    ``hu``: (Z, H, W) float32 Hounsfield units; rows run anterior -> posterior, columns patient
    right -> left, slices inferior -> superior. ``affine``: 4x4 mapping a display voxel index
    ``(z, row, col, 1)`` to RAS+ world millimetres. ``spacing``: (slice, row, col) mm.
    ``native_shape`` / ``native_affine``: the grid the data came in (NIfTI array, or for DICOM the
    slices stacked in position order with axes (column, row, slice)), used to write labels back in
    that grid (:func:`save_label_volume`). ``slice_files``: for DICOM, the file of each display slice.
    """

    hu: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    kind: str
    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    slice_files: list[str] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)

    def _xform(self, inverse: bool = False) -> np.ndarray:
        from nibabel import orientations as ornt

        src = ornt.io_orientation(self.native_affine)
        tgt = ornt.axcodes2ornt(_DISPLAY_CODES)
        return ornt.ornt_transform(tgt, src) if inverse else ornt.ornt_transform(src, tgt)

    def to_display(self, native: np.ndarray) -> np.ndarray:
        """An array on the native grid -> display orientation (Z, H, W)."""
        from nibabel import orientations as ornt

        native = np.asarray(native)
        if native.shape != self.native_shape:
            raise DataError(f"array of shape {native.shape} is not on the native grid {self.native_shape} of {self.source}")
        return np.ascontiguousarray(ornt.apply_orientation(native, self._xform()).transpose(2, 1, 0))

    def to_native(self, display: np.ndarray) -> np.ndarray:
        """A display-oriented (Z, H, W) array -> the native grid (inverse of :meth:`to_display`)."""
        from nibabel import orientations as ornt

        display = np.asarray(display)
        if display.shape != self.shape:
            raise DataError(f"array of shape {display.shape} does not match the volume {self.shape} of {self.source}")
        return np.ascontiguousarray(ornt.apply_orientation(display.transpose(2, 1, 0), self._xform(inverse=True)))

    def native_slice_index(self, z: int) -> int:
        """Index along the native slice axis of display slice ``z``."""
        inv = np.linalg.inv(self.native_affine)
        a = inv @ self.affine @ np.array([z, 0, 0, 1.0])
        b = inv @ self.affine @ np.array([z + 1, 0, 0, 1.0])
        axis = int(np.argmax(np.abs(b[:3] - a[:3])))
        return int(round(a[axis]))

    def slice_position(self, z: int) -> float:
        """World superior coordinate (RAS z, mm) of the centre of display slice ``z``."""
        h, w = self.shape[1:]
        return float((self.affine @ np.array([z, (h - 1) / 2, (w - 1) / 2, 1.0]))[2])


def _display_geometry(native_affine: np.ndarray, native_shape: tuple) -> np.ndarray:
    """Affine of the display array (z, r, c) given the native affine and shape."""
    from nibabel import orientations as ornt

    xform = ornt.ornt_transform(ornt.io_orientation(native_affine), ornt.axcodes2ornt(_DISPLAY_CODES))
    return native_affine @ ornt.inv_ornt_aff(xform, native_shape) @ _SWAP


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _load_nifti_array(path: Path, what: str):
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many kinds (ImageFileError, EOFError, zlib/gzip errors...)
        raise DataError(f"{path}: cannot read the {what} as NIfTI: {exc}") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: the {what} must be a 3-D volume, got shape {data.shape}")
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: the {what} has a singular or invalid affine")
    return data, affine


def load_volume(path: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Load a CT volume (a ``.nii`` / ``.nii.gz`` file or a DICOM series folder) in display orientation.

    DICOM: slices are sorted by ImagePositionPatient projected on the slice normal, rescaled to HU
    (RescaleSlope / RescaleIntercept), and reoriented with ImageOrientationPatient. A folder with
    several series needs ``series_uid``. Oblique volumes are shown on their closest axial grid.
    """
    path = Path(path)
    if path.is_dir():
        return _load_dicom(path, series_uid)
    if not path.exists():
        raise DataError(f"{path}: image volume not found")
    if not _is_nifti(path):
        raise DataError(f"{path}: not a NIfTI file (.nii / .nii.gz) nor a DICOM folder")
    data, affine = _load_nifti_array(path, "image volume")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise DataError(f"{path}: unsupported NIfTI data type {data.dtype}")
    data = data.astype(np.float32, copy=False)
    data = _finite_hu(data, path)
    return _make_volume(data, affine, str(path), "nifti")


def _finite_hu(data: np.ndarray, source) -> np.ndarray:
    """NaN / infinite voxels (a failed conversion upstream) set to the volume's lowest finite value
    (shown black, as air), with one warning naming the file; an all-NaN volume is an error."""
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if not n_bad:
        return data
    if n_bad == data.size:
        raise DataError(f"{source}: every voxel is NaN or infinite; there is no image to segment")
    low = float(data[~bad].min())
    logger.warning("%s: %d voxel(s) (%.2f%%) are NaN or infinite; they are set to the lowest value %.1f HU "
                   "(black in every window)", source, n_bad, 100.0 * n_bad / data.size, low)
    data = np.array(data, dtype=np.float32, copy=True)
    data[bad] = low
    return data


def _warn_if_oblique(native_affine: np.ndarray, source: str) -> None:
    """One warning when the voxel axes are tilted from the scanner axes: the volume is then shown on
    its closest axis-aligned grid (slices are not exactly axial); labels stay on the native grid."""
    directions = native_affine[:3, :3] / np.linalg.norm(native_affine[:3, :3], axis=0)
    tilt = float(np.degrees(np.arccos(np.clip(np.abs(directions).max(axis=0), -1.0, 1.0))).max())
    if tilt > 0.5:
        logger.warning("%s: oblique volume (voxel axes tilted up to %.1f degrees from the scanner axes); it is "
                       "snapped to the closest axial grid, so slices are not exactly axial. Label volumes are "
                       "saved on the original grid.", source, tilt)


def _make_volume(native: np.ndarray, native_affine: np.ndarray, source: str, kind: str,
                 files: list[str] | None = None, meta: dict | None = None) -> Volume:
    shape = tuple(int(s) for s in native.shape)
    _warn_if_oblique(native_affine, source)
    affine = _display_geometry(native_affine, shape)
    vol = Volume(hu=np.empty(0, np.float32), affine=affine, spacing=_spacing(affine), source=source, kind=kind,
                 native_shape=shape, native_affine=native_affine, meta=dict(meta or {}))
    vol.hu = vol.to_display(native).astype(np.float32, copy=False)
    if files is not None:
        vol.slice_files = [files[vol.native_slice_index(z)] for z in range(vol.shape[0])]
    return vol


_DICOM_HEADER_TAGS = ["SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                      "Rows", "Columns", "NumberOfFrames", "Modality", "SliceThickness", "SeriesDescription"]


def _load_dicom(folder: Path, series_uid: str | None) -> Volume:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)
    if not files:
        raise DataError(f"{folder}: the DICOM folder is empty")
    headers = []
    for p in files:
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True, specific_tags=_DICOM_HEADER_TAGS)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError):
            continue
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "Rows" not in ds:
            continue  # DICOMDIR, reports, localisers without geometry
        headers.append((p, ds))
    if not headers:
        raise DataError(f"{folder}: no DICOM image slices found ({len(files)} files looked at)")
    series: dict[str, list] = {}
    for p, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((p, ds))
    if series_uid is not None:
        if series_uid not in series:
            raise DataError(f"{folder}: no series {series_uid!r}; found {', '.join(sorted(series))}")
        chosen = series[series_uid]
    elif len(series) > 1:
        desc = "; ".join(f"{uid} ({len(v)} slices)" for uid, v in sorted(series.items()))
        raise DataError(f"{folder}: the folder holds {len(series)} DICOM series ({desc}); choose one with series_uid / --series")
    else:
        chosen = next(iter(series.values()))
        series_uid = next(iter(series))
    for p, ds in chosen:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(f"{p}: multi-frame (enhanced) DICOM is not supported; convert the series to NIfTI first")

    # geometry: one orientation for all, sorted by position along the normal
    iop0 = np.asarray(chosen[0][1].ImageOrientationPatient, dtype=float)
    if iop0.shape != (6,):
        raise DataError(f"{chosen[0][0]}: ImageOrientationPatient must have 6 values")
    row_dir, col_dir = iop0[:3], iop0[3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.5:
        raise DataError(f"{chosen[0][0]}: degenerate ImageOrientationPatient {iop0.tolist()}")
    normal /= np.linalg.norm(normal)
    rows, cols = int(chosen[0][1].Rows), int(chosen[0][1].Columns)
    spacing_rc = np.asarray(chosen[0][1].get("PixelSpacing", [1.0, 1.0]), dtype=float)
    items = []
    for p, ds in chosen:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        if not np.allclose(iop, iop0, atol=1e-4):
            raise DataError(f"{p}: ImageOrientationPatient {iop.tolist()} differs from {iop0.tolist()} of {chosen[0][0].name}")
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise DataError(f"{p}: slice size {ds.Rows}x{ds.Columns} differs from {rows}x{cols} of {chosen[0][0].name}")
        if not np.allclose(np.asarray(ds.get("PixelSpacing", [1.0, 1.0]), float), spacing_rc, atol=1e-4):
            raise DataError(f"{p}: PixelSpacing differs from {spacing_rc.tolist()} of {chosen[0][0].name}")
        ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
        items.append((float(ipp @ normal), ipp, p))
    items.sort(key=lambda t: t[0])
    pos = np.array([t[0] for t in items])
    if len(pos) > 1:
        gaps = np.diff(pos)
        if gaps.min() < 1e-3:
            i = int(np.argmin(gaps))
            raise DataError(f"{folder}: slices {items[i][2].name} and {items[i + 1][2].name} lie at the same position "
                            f"({pos[i]:.3f} mm); several acquisitions in one series are not supported")
        med = float(np.median(gaps))
        if gaps.max() - gaps.min() > 0.1 * med:
            logger.warning("%s: uneven slice spacing (%.3f..%.3f mm); the volume assumes %.3f mm",
                           folder, gaps.min(), gaps.max(), med)
        step = (items[-1][1] - items[0][1]) / (len(items) - 1)
    else:
        thick = float(chosen[0][1].get("SliceThickness", 1.0) or 1.0)
        step = normal * thick

    # pixels -> HU, stacked as (column, row, slice)
    native = np.empty((cols, rows, len(items)), np.float32)
    for k, (_, _, p) in enumerate(items):
        try:
            ds = pydicom.dcmread(str(p))
            arr = ds.pixel_array
            hu = apply_modality_lut(arr, ds)
        except Exception as exc:
            raise DataError(f"{p}: cannot decode the DICOM pixel data: {exc}") from None
        if arr.shape != (rows, cols):
            raise DataError(f"{p}: pixel data of shape {arr.shape}, expected {(rows, cols)}")
        native[:, :, k] = np.asarray(hu, dtype=np.float32).T
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing_rc[1]  # along a row: column index
    lps[:3, 1] = col_dir * spacing_rc[0]  # down a column: row index
    lps[:3, 2] = step
    lps[:3, 3] = items[0][1]
    native_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    meta = {"series_uid": series_uid, "n_files": len(items)}
    return _make_volume(native, native_affine, str(folder), "dicom", files=[str(t[2]) for t in items], meta=meta)


# ---------------------------------------------------------------------------------- label volumes
def load_label_volume(path: str | os.PathLike, reference: Volume) -> np.ndarray:
    """A NIfTI label volume on the grid of ``reference`` -> (Z, H, W) int64 in display orientation.

    The label file may be stored in another axis order than the image as long as it covers the same
    voxels (same display shape and affine); otherwise DataError naming the label file.
    """
    path = Path(path)
    if not _is_nifti(path):
        raise DataError(f"{path}: the label volume must be a NIfTI file (.nii / .nii.gz)")
    data, affine = _load_nifti_array(path, "label volume")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating) or data.dtype == bool):
        raise DataError(f"{path}: unsupported label data type {data.dtype}")
    shape = tuple(int(s) for s in data.shape)
    disp_aff = _display_geometry(affine, shape)
    from nibabel import orientations as ornt

    xform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(_DISPLAY_CODES))
    disp_shape = tuple(int(shape[int(np.flatnonzero(xform[:, 0] == ax)[0])]) for ax in (2, 1, 0))
    tol = max(1e-3, 0.05 * min(reference.spacing))
    if disp_shape != reference.shape or not np.allclose(disp_aff, reference.affine, rtol=0, atol=tol):
        raise DataError(
            f"{path}: the label volume (shape {shape}, voxel size {np.round(_spacing(affine), 4).tolist()} mm, "
            f"origin {np.round(affine[:3, 3], 3).tolist()}) is not on the grid of the image {reference.source} "
            f"(shape {reference.native_shape}, voxel size {np.round(_spacing(reference.native_affine), 4).tolist()} mm, "
            f"origin {np.round(reference.native_affine[:3, 3], 3).tolist()})")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise DataError(f"{path}: the label volume holds non-integer values; labels must be integers")
    data = data.astype(np.int64)
    if data.size and data.min() < 0:
        raise DataError(f"{path}: the label volume holds negative values (min {int(data.min())}); labels must be >= 0")
    return np.ascontiguousarray(ornt.apply_orientation(data, xform).transpose(2, 1, 0))


def save_label_volume(label_maps: np.ndarray, reference: Volume, path: str | os.PathLike) -> Path:
    """Write display-oriented label maps (Z, H, W) as a NIfTI label volume on the original grid
    and orientation of ``reference`` (the inverse of the display transform), so that it overlays
    the input volume in any viewer. ``.nii.gz`` is gzip-compressed (reproducibly); atomic."""
    import gzip

    import nibabel as nib

    from d2ct.utils.fileio import atomic_write

    path = Path(path)
    if not _is_nifti(path):
        raise ConfigError(f"{path}: the label volume path must end in .nii or .nii.gz")
    maps = np.asarray(label_maps)
    if maps.shape != reference.shape:
        raise DataError(f"{path}: label maps of shape {maps.shape} do not match the volume {reference.shape} of "
                        f"{reference.source} (resampled slices must be restored first, see restore_slices)")
    if maps.dtype.kind not in "uib":
        raise DataError(f"{path}: label maps must be integers, got {maps.dtype}")
    if maps.size and maps.min() < 0:
        raise DataError(f"{path}: label maps hold negative values")
    dtype = np.uint8 if (maps.size == 0 or maps.max() <= 255) else (np.uint16 if maps.max() <= 65535 else np.int32)
    native = reference.to_native(maps.astype(dtype))
    img = nib.Nifti1Image(native, reference.native_affine)
    img.set_qform(reference.native_affine, code=1)
    img.set_sform(reference.native_affine, code=1)
    img.header.set_xyzt_units("mm")
    data = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with atomic_write(path, "wb") as f:
        f.write(data)
    return path


# ------------------------------------------------------------------------------------ resampling
@dataclass(frozen=True)
class SliceGeometry:
    """How :func:`resample_slices` mapped (H, W) slices onto (size, size): zoom then centred padding."""

    in_shape: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]  # top, left padding
    size: int
    pixel_mm: float  # output pixel size (square)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def resample_slices(stack: np.ndarray, pixel_mm: tuple[float, float], size: int, *, labels: bool = False,
                    fill: float | None = None) -> tuple[np.ndarray, SliceGeometry]:
    """Resample (Z, H, W) slices to (Z, size, size) with square pixels: the larger physical side
    spans ``size`` pixels, the other is padded symmetrically (with ``fill``: -1024 HU for images,
    0 for labels). Images use linear interpolation (with Gaussian anti-aliasing when shrinking), labels nearest neighbour."""
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 8:
        raise ConfigError(f"size must be an integer >= 8 pixels, got {size!r}")
    stack = np.asarray(stack)
    z, h, w = stack.shape
    ph, pw = float(pixel_mm[0]), float(pixel_mm[1])
    fov = max(h * ph, w * pw)
    out_mm = fov / size
    nh = min(size, max(1, int(round(h * ph / out_mm))))
    nw = min(size, max(1, int(round(w * pw / out_mm))))
    geom = SliceGeometry((h, w), (nh, nw), ((size - nh) // 2, (size - nw) // 2), int(size), out_mm)
    if fill is None:
        fill = 0 if labels else -1024.0
    out = np.full((z, size, size), fill, dtype=stack.dtype)
    if (nh, nw) == (h, w):
        res = stack
    elif labels:
        rows = np.minimum((np.arange(nh) + 0.5) * h / nh, h - 1).astype(int)
        cols = np.minimum((np.arange(nw) + 0.5) * w / nw, w - 1).astype(int)
        res = stack[:, rows][:, :, cols]
    else:
        from skimage.transform import resize

        shrink = nh < h or nw < w  # Gaussian prefilter against aliasing when downsampling
        res = resize(stack.astype(np.float32, copy=False), (z, nh, nw), order=1, mode="edge", clip=False,
                     preserve_range=True, anti_aliasing=shrink).astype(stack.dtype, copy=False)
    t, l = geom.offset
    out[:, t:t + nh, l:l + nw] = res
    return out, geom


def restore_slices(label_maps: np.ndarray, geom: SliceGeometry) -> np.ndarray:
    """Inverse of :func:`resample_slices` for label maps: crop the padding, nearest-neighbour back
    to the volume's (H, W)."""
    maps = np.asarray(label_maps)
    if maps.ndim != 3 or maps.shape[1:] != (geom.size, geom.size):
        raise DataError(f"label maps of shape {maps.shape} are not (Z, {geom.size}, {geom.size}) slices")
    t, l = geom.offset
    nh, nw = geom.resized
    h, w = geom.in_shape
    crop = maps[:, t:t + nh, l:l + nw]
    rows = np.minimum((np.arange(h) + 0.5) * nh / h, nh - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) * nw / w, nw - 1).astype(int)
    return np.ascontiguousarray(crop[:, rows][:, :, cols])


# ---------------------------------------------------------------------------------------- import
@dataclass
class ImportSummary:
    """What :func:`import_volume` wrote."""

    out_dir: Path
    n_slices: int
    slice_indices: list[int]  # display slice index of each written image (0.png, 1.png, ...)
    image_shape: tuple[int, int]
    n_labelled: int  # slices with at least one label (0 without a label volume)
    volume_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # of the written slices: (slice, row, col) mm
    geometry: SliceGeometry | None  # resampling, when ``size`` was given


def select_slices(n: int, *, step: int = 1, z_range: tuple[int, int] | None = None,
                  labelled: np.ndarray | None = None) -> list[int]:
    """Display slice indices kept: ``z_range`` = [start, stop) first, then (when ``labelled`` is a
    boolean per slice) only labelled slices, then every ``step``-th of what remains."""
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 1:
        raise ConfigError(f"step must be an integer >= 1, got {step!r}")
    idx = list(range(n))
    if z_range is not None:
        try:
            start, stop = (int(v) for v in z_range)
        except (TypeError, ValueError):
            raise ConfigError(f"z_range must be (start, stop) slice indices, got {z_range!r}") from None
        if not 0 <= start < stop <= n:
            raise ConfigError(f"z_range {start}:{stop} is not within the volume's {n} slices (0 <= start < stop <= {n})")
        idx = idx[start:stop]
    if labelled is not None:
        idx = [i for i in idx if labelled[i]]
    return idx[::step]


def import_volume(image_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                  label_path: str | os.PathLike | None = None, level: float = 40.0, width: float = 400.0,
                  size: int | None = None, step: int = 1, z_range: tuple[int, int] | None = None,
                  only_labelled: bool = False, renumber: bool = False, seed: int = 0,
                  series_uid: str | None = None, overwrite: bool = False, progress: bool = True) -> ImportSummary:
    """Import a CT volume (NIfTI file or DICOM folder), with an optional NIfTI label volume on the
    same grid, into the challenge layout at ``out_dir``.

    Writes ``images/<i>.png`` (axial slices, inferior to superior, display orientation, HU window
    ``level`` / ``width`` -> uint8), with labels ``labels.csv.gz`` (one column per image) and
    ``annotated.json`` (every written image), ``manifest.csv`` (source file, slice index, spacing,
    labels per image) and ``import.json`` (parameters, grid and resampling, to map predictions
    back). ``size``: resample every slice to size x size (square pixels, padded). ``renumber``:
    each slice's labels become a random permutation of 1..K (seeded); without it values are kept
    and must be <= 255. The folder is written to a temporary folder and renamed into place; an
    existing non-empty ``out_dir`` is replaced only with ``overwrite``.
    """
    from d2ct.utils.progress import progress_bar as tqdm  # line mode when stderr is not a terminal

    from d2ct.data.images import write_slice
    from d2ct.data.labels_csv import write_labels_csv
    from d2ct.utils.fileio import atomic_write, atomic_write_json

    out_dir = Path(out_dir)
    if only_labelled and label_path is None:
        raise ConfigError("only_labelled needs a label volume (label_path / --labels)")
    if not width > 0:
        raise ConfigError(f"window width must be > 0 HU, got {width}")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"output folder {out_dir} exists and is not empty; choose another one or use overwrite")
    vol = load_volume(image_path, series_uid=series_uid)
    labels = load_label_volume(label_path, vol) if label_path is not None else None
    has = labels.reshape(labels.shape[0], -1).any(axis=1) if labels is not None else None
    keep = select_slices(vol.shape[0], step=step, z_range=z_range, labelled=has if only_labelled else None)
    if not keep:
        raise DataError(f"{image_path}: no slice selected (volume of {vol.shape[0]} slices, step={step}, "
                        f"z_range={z_range}, only_labelled={only_labelled})")

    hu = vol.hu[keep]
    lab = labels[keep] if labels is not None else None
    geom = None
    spacing = vol.spacing
    if size is not None:
        hu, geom = resample_slices(hu, vol.spacing[1:], size)
        if lab is not None:
            lab, _ = resample_slices(lab, vol.spacing[1:], size, labels=True)
        spacing = (vol.spacing[0], geom.pixel_mm, geom.pixel_mm)

    # labels -> uint8 per slice, kept or renumbered
    maps = None
    mapping: list[dict[int, int]] = []
    if lab is not None:
        rng = np.random.default_rng(seed)
        maps = np.zeros(lab.shape, np.uint8)
        for i, z in enumerate(keep):
            present = np.unique(lab[i])
            present = present[present > 0]
            if renumber:
                if present.size > 255:
                    raise DataError(f"{label_path}: slice {z} has {present.size} structures; at most 255 fit in a uint8 label map")
                new = rng.permutation(present.size) + 1
                lut = dict(zip(present.tolist(), new.tolist()))
                maps[i] = _relabel(lab[i], present, new)
            else:
                if present.size and present.max() > 255:
                    raise DataError(f"{label_path}: label value {int(present.max())} on slice {z} is above 255; "
                                    "use renumber (--renumber) to number each slice's structures 1..K")
                lut = {int(v): int(v) for v in present}
                maps[i] = lab[i]
            mapping.append(dict(sorted(((int(n), int(o)) for o, n in lut.items()))))

    images = window(hu, level, width)
    names = [f"{i}.png" for i in range(len(keep))]
    source = str(Path(image_path))
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        for name, img in tqdm(list(zip(names, images)), desc="slices", unit="slice", disable=not progress, leave=False):
            write_slice(tmp / "images" / name, img)
        if maps is not None:
            write_labels_csv(tmp / "labels.csv.gz", names, maps)
            atomic_write_json(tmp / "annotated.json", {"annotated": names})
        buf = io.StringIO(newline="")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["id", "file", "source", "source_file", "slice_index", "native_slice_index", "z_mm", "slice_mm",
                    "pixel_mm_row", "pixel_mm_col", "native_pixel_mm", "n_structures", "labels"])
        for i, z in enumerate(keep):
            src_file = vol.slice_files[z] if vol.slice_files else source
            lab_txt = ";".join(f"{n}={o}" for n, o in mapping[i].items()) if maps is not None else ""
            w.writerow([i, names[i], source, src_file, z, vol.native_slice_index(z), f"{vol.slice_position(z):.3f}",
                        f"{spacing[0]:.4f}", f"{spacing[1]:.4f}", f"{spacing[2]:.4f}",
                        f"{vol.spacing[1]:.4f}x{vol.spacing[2]:.4f}", len(mapping[i]) if maps is not None else "",
                        lab_txt])
        with atomic_write(tmp / "manifest.csv", "w", encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
        atomic_write_json(tmp / "import.json", {
            "image": source, "labels": str(label_path) if label_path is not None else None, "kind": vol.kind,
            "series_uid": vol.meta.get("series_uid"), "level": level, "width": width, "size": size, "step": step,
            "z_range": list(z_range) if z_range is not None else None, "only_labelled": only_labelled,
            "renumber": renumber, "seed": seed, "slice_indices": keep, "volume_shape": list(vol.shape),
            "spacing": list(vol.spacing), "affine": vol.affine.tolist(), "native_shape": list(vol.native_shape),
            "native_affine": vol.native_affine.tolist(), "geometry": geom.to_dict() if geom else None})
    return ImportSummary(out_dir=out_dir, n_slices=len(keep), slice_indices=keep, image_shape=images.shape[1:],
                         n_labelled=int(sum(bool(m) for m in mapping)) if maps is not None else 0,
                         volume_shape=vol.shape, spacing=tuple(spacing), geometry=geom)


def _relabel(slice_labels: np.ndarray, present: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Map the sorted values ``present`` to ``new`` (0 stays 0)."""
    out = np.zeros(slice_labels.shape, np.uint8)
    if present.size:
        pos = np.searchsorted(present, slice_labels)
        pos = np.minimum(pos, present.size - 1)
        hit = present[pos] == slice_labels
        out[hit] = new[pos[hit]]
    return out
