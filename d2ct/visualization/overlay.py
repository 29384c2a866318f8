"""Overlays of label maps on CT slices, grids of them, and score histograms (PNG, Agg backend)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from d2ct.data.images import read_slice, slice_to_uint8  # noqa: E402
from d2ct.utils.fileio import atomic_path  # noqa: E402


def _palette(n: int = 256) -> np.ndarray:
    """Distinct colours for label ids 1..255 (0 stays transparent); the same id always gets the same colour."""
    base = np.concatenate([plt.get_cmap("tab20")(np.arange(20))[:, :3], plt.get_cmap("Set1")(np.arange(9))[:, :3]])
    rng = np.random.default_rng(7)
    colours = np.vstack([base, rng.uniform(0.2, 1.0, size=(n, 3))])[:n]
    colours[0] = 0
    return colours


PALETTE = _palette()


def _gray(image) -> np.ndarray:
    if isinstance(image, (str, Path)):
        image = read_slice(image)
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., 0]
    if image.dtype == np.uint16:  # HU + 1024: shown through the models' window
        image = slice_to_uint8(image)
    elif image.dtype != np.uint8:
        lo, hi = np.percentile(image, [1, 99])
        image = np.clip((image - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return image


def overlay(image, label_map: np.ndarray | None, alpha: float = 0.45, outline: bool = True) -> np.ndarray:
    """RGB float image: the slice in grey with each label filled in its colour and outlined."""
    gray = _gray(image).astype(np.float32) / 255.0
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if label_map is None:
        return rgb
    label_map = np.asarray(label_map)
    colours = PALETTE[np.minimum(label_map, 255)]
    fg = label_map > 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours[fg]
    if outline:
        edges = fg & (ndimage.grey_erosion(label_map, size=3) != ndimage.grey_dilation(label_map, size=3))
        rgb[edges] = colours[edges]
    return np.clip(rgb, 0, 1)


def _save(fig, path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def overlay_grid(items: Sequence[tuple], path, title: str = "", ncols: int = 4) -> Path:
    """items: (image or path, label map or None, caption) -> one PNG grid."""
    n = max(1, len(items))
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (image, label_map, caption) in zip(axes.ravel(), items):
        ax.imshow(overlay(image, label_map), interpolation="nearest")
        ax.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def comparison_grid(rows: Sequence[tuple], path, title: str = "") -> Path:
    """rows: (image or path, prediction, truth or None, caption) -> image | prediction | truth per row."""
    n = max(1, len(rows))
    has_truth = any(r[2] is not None for r in rows)
    ncols = 3 if has_truth else 2
    fig, axes = plt.subplots(n, ncols, figsize=(3.2 * ncols, 3.3 * n), squeeze=False)
    for i, (image, pred, truth, caption) in enumerate(rows):
        panels = [(overlay(image, None), caption), (overlay(image, pred), "prediction")]
        if has_truth:
            panels.append((overlay(image, truth), "truth" if truth is not None else "no truth"))
        for ax, (picture, name) in zip(axes[i], panels):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def score_histogram(scores: Sequence[float], path, title: str = "", bins: int = 20) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if len(scores):
        ax.hist(scores, bins=bins, range=(0, 1), color="#3b75af", edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no instances", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("instance score")
    ax.set_ylabel("instances")
    ax.set_title(title or "scores", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
