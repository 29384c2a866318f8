"""Files people open next to a predicted label volume: colour tables for the viewers, a JSON
side-car with each structure's volume, and an axial / coronal / sagittal overlay picture.

* ITK-SNAP label description file (``<name>.label.txt``: "Segmentation > Import Label
  Descriptions"), one line per label: ``IDX R G B A VIS MSH "LABEL"``;
* 3D Slicer colour table (``<name>.ctbl``, loaded with the volume as a colour node): ``id name R G B A``;
* JSON side-car (``<name>.json``): per structure its volume (ml), slice range, voxel count and mean
  instance score, plus how the labels were made.

The colours are d2ct's overlay palette (:data:`d2ct.visualization.overlay.PALETTE`), so the PNG
overlays and the viewers show the same colour for the same label.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from d2ct.errors import ConfigError, DataError
from d2ct.utils.fileio import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["sidecar_paths", "write_itksnap_labels", "write_slicer_ctbl", "write_sidecar", "write_volume_outputs",
           "three_plane_overlay"]


def _colour(label: int) -> tuple[int, int, int]:
    from d2ct.visualization.overlay import PALETTE

    r, g, b = PALETTE[((int(label) - 1) % 255) + 1]  # ids above 255 reuse the colours
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _stem(path: Path) -> Path:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return path.with_name(name[: -len(ext)])
    return path.with_suffix("")


def sidecar_paths(nifti_path: str | os.PathLike) -> dict[str, Path]:
    """Where the side files of ``seg.nii.gz`` go: ``seg.json``, ``seg.label.txt``, ``seg.ctbl``."""
    stem = _stem(Path(nifti_path))
    return {"json": stem.with_name(stem.name + ".json"), "itksnap": stem.with_name(stem.name + ".label.txt"),
            "slicer": stem.with_name(stem.name + ".ctbl")}


def _names(structures: Sequence[dict]) -> list[tuple[int, str]]:
    return [(int(s["label"]), str(s.get("name") or f"structure_{int(s['label'])}")) for s in structures]


def write_itksnap_labels(path: str | os.PathLike, structures: Sequence[dict]) -> Path:
    """ITK-SNAP label description file; ``structures``: dicts with ``label`` and optional ``name``."""
    lines = ["################################################",
             "# ITK-SnAP Label Description File (written by d2ct)",
             "# Columns: IDX R G B A VIS MSH LABEL",
             "################################################",
             '    0     0    0    0        0  0  0    "Clear Label"']
    for label, name in _names(structures):
        r, g, b = _colour(label)
        lines.append(f'{label:5d} {r:5d} {g:4d} {b:4d}        1  1  1    "{name.replace(chr(34), chr(39))}"')
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return Path(path)


def write_slicer_ctbl(path: str | os.PathLike, structures: Sequence[dict]) -> Path:
    """3D Slicer colour table (``.ctbl``): ``id name R G B A`` per line (names without spaces)."""
    lines = ["# Color table file written by d2ct", f"# {len(structures) + 1} values", "0 background 0 0 0 0"]
    for label, name in _names(structures):
        r, g, b = _colour(label)
        lines.append(f"{label} {'_'.join(name.split())} {r} {g} {b} 255")
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return Path(path)


def write_sidecar(path: str | os.PathLike, structures: Sequence[dict], **meta) -> Path:
    """JSON side-car: ``{"structures": [...], **meta}`` (numbers rounded for reading)."""
    rows = []
    for s in structures:
        row = dict(s)
        for key in ("volume_ml", "mean_score"):
            if row.get(key) is not None:
                row[key] = round(float(row[key]), 4)
        rows.append(row)
    atomic_write_json(Path(path), {**meta, "n_structures": len(rows), "structures": rows})
    return Path(path)


def write_volume_outputs(nifti_path: str | os.PathLike, structures: Sequence[dict], **meta) -> dict[str, Path]:
    """The JSON side-car, ITK-SNAP label file and Slicer colour table next to ``nifti_path``."""
    paths = sidecar_paths(nifti_path)
    write_sidecar(paths["json"], structures, labels=Path(nifti_path).name, **meta)
    write_itksnap_labels(paths["itksnap"], structures)
    write_slicer_ctbl(paths["slicer"], structures)
    return paths


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """The centre of the labelled voxels (of the volume when nothing is labelled)."""
    if not labels.any():
        return tuple(int(s) // 2 for s in labels.shape)
    return tuple(int(round(float(np.mean(i)))) for i in np.nonzero(labels))


def _wrap(lmap: np.ndarray) -> np.ndarray:
    """Label ids above 255 reuse the palette's colours (1..255)."""
    if lmap.size == 0 or lmap.max() <= 255:
        return lmap
    return np.where(lmap > 0, (lmap.astype(np.int64) - 1) % 255 + 1, 0)


def _planes(hu: np.ndarray, labels: np.ndarray, spacing, at: tuple[int, int, int]):
    z, h, w = hu.shape
    if labels.shape != hu.shape:
        raise DataError(f"labels {labels.shape} and image {hu.shape} differ in shape")
    cz, cr, cc = at
    if not (0 <= cz < z and 0 <= cr < h and 0 <= cc < w):
        raise ConfigError(f"overlay position {at} is outside the volume {hu.shape}")
    sz, sr, sc = spacing
    # display conventions: axial as the slices are; coronal / sagittal with superior up
    return [("axial", hu[cz], labels[cz], sr / sc, f"axial, slice {cz}"),
            ("coronal", hu[::-1, cr, :], labels[::-1, cr, :], sz / sc, f"coronal, row {cr}"),
            ("sagittal", hu[::-1, :, cc], labels[::-1, :, cc], sz / sr, f"sagittal, column {cc}")]


def three_plane_overlay(hu: np.ndarray, labels: np.ndarray, path: str | os.PathLike, *,
                        spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), at: tuple[int, int, int] | None = None,
                        level: float = 40.0, width: float = 400.0, truth: np.ndarray | None = None,
                        title: str = "", dpi: int = 80) -> Path:
    """Axial / coronal / sagittal slices through ``at`` (display indices (z, row, col); default the
    centre of the labelled voxels) with the labels overlaid, one row (and a second row for ``truth``).
    ``hu``: display-oriented (Z, H, W) Hounsfield units (or uint8 already windowed); aspect ratios
    follow ``spacing`` (slice, row, col) mm. Patient right is on the image left; superior is up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from d2ct.data.volumes import window
    from d2ct.visualization.overlay import overlay

    hu = np.asarray(hu)
    labels = np.asarray(labels)
    if hu.ndim != 3:
        raise DataError(f"three_plane_overlay: the image must be (Z, H, W), got {hu.shape}")
    gray = hu if hu.dtype == np.uint8 else window(hu, level, width)
    rows = [("prediction", labels)] + ([("truth", np.asarray(truth))] if truth is not None else [])
    at = tuple(int(v) for v in at) if at is not None else _centre(labels)
    planes0 = _planes(gray, labels, spacing, at)
    widths = [p[1].shape[1] for p in planes0]
    fig, axes = plt.subplots(len(rows), 3, figsize=(10, 3.6 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for r, (name, lab) in enumerate(rows):
        for ax, (plane, img, lmap, aspect, caption) in zip(axes[r], _planes(gray, lab, spacing, at)):
            ax.imshow(overlay(img, _wrap(lmap)),
                      aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name}: {caption}" if len(rows) > 1 else caption, fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path
