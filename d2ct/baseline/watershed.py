"""The organisers' classical baseline: median denoising, Sobel gradient, markers, watershed.

Pipeline of :func:`segment_slice` (every step is a scikit-image call; parameters in
:class:`BaselineConfig`):

1. optional preprocessing on the image scaled to [0, 1]: CLAHE contrast enhancement
   (``exposure.equalize_adapthist``), then edge-preserving denoising, either a bilateral filter
   (``restoration.denoise_bilateral``) or total-variation Chambolle (``restoration.denoise_tv_chambolle``);
2. median denoising (``filters.rank.median`` over a disk) on the uint8 image;
3. markers: connected low-gradient regions, ``filters.rank.gradient(denoised, disk(marker_radius))
   < marker_threshold`` (the scikit-image "markers for watershed" recipe the organisers used),
   labelled with ``ndimage.label``; markers under ``min_marker_size`` pixels are dropped;
4. ``segmentation.watershed`` of the Sobel gradient (``filters.sobel``) from those markers;
5. background handling (``background``), then relabelling to uint8 (1..255).

Background handling, and why it matters.  The challenge score is the ARI over *all* pixels, and
the truth is mostly background (0): about 99.5 % of the pixels on the OpenKBP set, a large majority
on the 2024 abdominal set.  Raw watershed gives every pixel a region, so the air around the body
and the body itself are cut into arbitrary pieces that the truth calls one cluster (0).  Options:

* ``"none"``: keep every watershed region (the organisers' raw output);
* ``"largest"``: the largest region becomes 0 (on CT, the air outside the body);
* ``"border"``: every region touching the image border becomes 0 (air outside the body, and
  the couch when it reaches the edge); falls back to ``"largest"`` when nothing touches it;
* ``"dark"``: ``"border"`` plus every region whose median intensity is below ``dark_threshold``
  (air: outside, in the airways and lungs).

Independently, regions larger than ``max_region_area`` pixels (scaled for the image size, see
:func:`segment_slice`) become background too: labelled structures are small organs, while the
big regions are body background (fat, muscle, brain) that the annotators did not label.  That is
a prior of the OpenKBP set (only 7 small organ types labelled); it hurts on abdominal data with
large labelled organs, so it is off by default.  The presets use ``"border"``.

Tuning.  The scikit-image recipe the organisers used (marker disk 5, threshold 10, made for
512-pixel photographs) finds only 2-4 markers per 256-pixel OpenKBP slice.  The marker disk radius
and threshold were chosen on a tuning subset (every 4th of the 400 labelled OpenKBP images) from
the grid radius {2, 3, 5} x threshold {10, 20, 30, 50}, maximising the mean of ARI (all pixels) and
ARI_fg: radius 2, threshold 30 won for "baseline" and "clahe_tv"; for "clahe_bilateral" it came
within 0.003 of the best (radius 5, threshold 50, which has a third of the Dice), so one shared
setting was kept.  The all-pixel ARI alone keeps rising as
regions are merged into background (threshold 90 scores higher on it with half the Dice), so it
was not used on its own.  ``bench/bench_baseline.py --tune`` reruns the grid.

At most 255 regions fit a uint8 label map: the largest 255 (after background removal) keep a
label, smaller extra ones become 0.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage import exposure, filters, restoration, segmentation
from skimage.filters import rank
from skimage.morphology import disk

from d2ct.errors import ConfigError, DataError
from d2ct.utils.cli import init_pool_worker

__all__ = [
    "BaselineConfig",
    "PRESETS",
    "get_preset",
    "preprocess",
    "segment_slice",
    "relabel_uint8",
    "segment_files",
    "run_baseline",
    "compare_configs",
    "format_comparison",
]

BACKGROUND_MODES = ("none", "largest", "border", "dark")


@dataclass(frozen=True)
class BaselineConfig:
    """All parameters of the watershed baseline (defaults: the "baseline" preset: the organisers'
    pipeline with tuned marker parameters and the border regions as background)."""

    # preprocessing (on the image scaled to [0, 1])
    clahe: bool = False
    clahe_clip_limit: float = 0.01
    clahe_kernel_size: int | None = None  # None: 1/8 of the image side (scikit-image default)
    denoise: str = "none"  # "none" | "bilateral" | "tv"
    bilateral_sigma_color: float = 0.05
    bilateral_sigma_spatial: float = 2.0
    bilateral_win_size: int | None = None
    tv_weight: float = 0.05
    # median denoising, markers, gradient
    median_radius: int = 2
    marker_radius: int = 2  # scikit-image recipe / organisers: 5 (tuned, see the module docstring)
    marker_threshold: float = 30.0  # scikit-image recipe / organisers: 10 (tuned)
    min_marker_size: int = 0
    gradient: str = "sobel"  # "sobel" | "rank" (rank.gradient over disk(2), the skimage recipe)
    compactness: float = 0.0
    # background handling and output
    background: str = "border"
    dark_threshold: int = 40
    max_region_area: int | None = None  # at 256x256; scaled by (H*W)/65536 for other sizes
    max_labels: int = 255

    def __post_init__(self) -> None:
        if self.denoise not in ("none", "bilateral", "tv"):
            raise ConfigError(f"BaselineConfig.denoise must be 'none', 'bilateral' or 'tv', got {self.denoise!r}")
        if self.gradient not in ("sobel", "rank"):
            raise ConfigError(f"BaselineConfig.gradient must be 'sobel' or 'rank', got {self.gradient!r}")
        if self.background not in BACKGROUND_MODES:
            raise ConfigError(f"BaselineConfig.background must be one of {BACKGROUND_MODES}, got {self.background!r}")
        if not 1 <= self.max_labels <= 255:
            raise ConfigError(f"BaselineConfig.max_labels must be in 1..255, got {self.max_labels}")
        for name in ("median_radius", "marker_radius"):
            if getattr(self, name) < 1:
                raise ConfigError(f"BaselineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.tv_weight <= 0 or self.bilateral_sigma_spatial <= 0 or self.clahe_clip_limit <= 0:
            raise ConfigError("BaselineConfig: tv_weight, bilateral_sigma_spatial and clahe_clip_limit must be > 0")

    def replace(self, **changes) -> "BaselineConfig":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown BaselineConfig option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Named presets: the organisers' baseline and its two preprocessing variants.
PRESETS: dict[str, BaselineConfig] = {
    "baseline": BaselineConfig(),
    "clahe_bilateral": BaselineConfig(clahe=True, denoise="bilateral"),
    "clahe_tv": BaselineConfig(clahe=True, denoise="tv"),
}


def get_preset(name: str, **overrides) -> BaselineConfig:
    """A preset by name, with optional field overrides (``ConfigError`` on unknown names)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown baseline preset {name!r}; choose from {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg


def _to_unit_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if image.dtype == np.uint16:  # HU + 1024: the same window every other consumer uses
        from d2ct.data.images import slice_to_uint8

        return slice_to_uint8(image).astype(np.float64) / 255.0
    image = image.astype(np.float64)
    lo, hi = float(image.min()), float(image.max())
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def preprocess(image: np.ndarray, cfg: BaselineConfig) -> np.ndarray:
    """CLAHE / bilateral / TV as configured; returns uint8 (H, W) ready for the median filter."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise DataError(f"baseline expects a 2-D grayscale slice, got shape {image.shape}")
    if image.dtype == np.uint8 and not cfg.clahe and cfg.denoise == "none":
        # rank filters need a writeable, contiguous buffer (PIL-backed arrays are read-only)
        return image if image.flags.writeable and image.flags.c_contiguous else np.array(image, order="C")
    x = _to_unit_float(image)
    if cfg.clahe:
        x = exposure.equalize_adapthist(x, kernel_size=cfg.clahe_kernel_size, clip_limit=cfg.clahe_clip_limit)
    if cfg.denoise == "bilateral":
        x = restoration.denoise_bilateral(
            x, win_size=cfg.bilateral_win_size, sigma_color=cfg.bilateral_sigma_color,
            sigma_spatial=cfg.bilateral_sigma_spatial,
        )
    elif cfg.denoise == "tv":
        x = restoration.denoise_tv_chambolle(x, weight=cfg.tv_weight)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def relabel_uint8(regions: np.ndarray, background: np.ndarray | None = None, max_labels: int = 255) -> np.ndarray:
    """Relabel an integer region map to uint8 1..K by decreasing area (0 stays 0, ``background``
    ids become 0); regions beyond the ``max_labels`` largest become 0."""
    regions = np.asarray(regions)
    flat = regions.reshape(-1).astype(np.intp, copy=False)
    counts = np.bincount(flat)
    counts[0] = 0
    if background is not None and len(background):
        counts[np.asarray(background, dtype=np.intp)] = 0
    ids = np.nonzero(counts)[0]
    order = ids[np.argsort(-counts[ids], kind="stable")][:max_labels]
    lut = np.zeros(len(counts), dtype=np.uint8)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.uint8)
    return lut[regions]


def _background_ids(regions: np.ndarray, image: np.ndarray, cfg: BaselineConfig) -> np.ndarray:
    mode = cfg.background
    counts = np.bincount(regions.reshape(-1))
    counts[0] = 0
    bg: list[np.ndarray] = []
    if mode in ("largest",):
        bg.append(np.array([int(np.argmax(counts))]))
    elif mode in ("border", "dark"):
        edge = np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]])
        edge = np.unique(edge[edge > 0])
        bg.append(edge if len(edge) else np.array([int(np.argmax(counts))]))
        if mode == "dark":
            ids = np.arange(1, len(counts))
            present = ids[counts[1:] > 0]
            med = ndi.median(image, labels=regions, index=present)
            bg.append(present[np.asarray(med) < cfg.dark_threshold])
    if cfg.max_region_area is not None:
        limit = cfg.max_region_area * regions.size / 65536.0
        bg.append(np.nonzero(counts > limit)[0])
    return np.unique(np.concatenate(bg)) if bg else np.zeros(0, dtype=np.intp)


def segment_slice(image: np.ndarray, cfg: BaselineConfig | str = "baseline") -> np.ndarray:
    """Label map (uint8, same shape) of one CT slice with the watershed baseline."""
    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    pre = preprocess(image, cfg)
    denoised = rank.median(pre, disk(cfg.median_radius))
    markers_mask = rank.gradient(denoised, disk(cfg.marker_radius)) < cfg.marker_threshold
    markers, n = ndi.label(markers_mask)
    if cfg.min_marker_size > 0 and n:
        sizes = np.bincount(markers.reshape(-1))
        small = sizes < cfg.min_marker_size
        small[0] = False
        markers[small[markers]] = 0
        markers, n = ndi.label(markers > 0)
    if n == 0:  # flat image: one region, which is background
        return np.zeros(pre.shape, dtype=np.uint8)
    if cfg.gradient == "sobel":
        grad = filters.sobel(denoised.astype(np.float64) / 255.0)
    else:
        grad = rank.gradient(denoised, disk(2))
    regions = segmentation.watershed(grad, markers, compactness=cfg.compactness)
    bg = _background_ids(regions, denoised, cfg)
    return relabel_uint8(regions, bg, cfg.max_labels)


# ----------------------------------------------------------------------------------- batch runs
def _segment_path(args) -> np.ndarray:
    path, cfg = args
    from d2ct.data.images import read_slice

    return segment_slice(read_slice(path), cfg)


def segment_files(
    paths: Sequence[str | os.PathLike],
    cfg: BaselineConfig | str = "baseline",
    *,
    workers: int = 1,
    progress: bool = True,
    desc: str = "watershed",
) -> np.ndarray:
    """Segment image files in parallel (``workers`` processes); returns (n, H, W) uint8 in input order.

    All images must share one size (the challenge CSV has one pixel count per file)."""
    from d2ct.utils.progress import progress_bar as tqdm  # line mode when stderr is not a terminal

    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    paths = [str(p) for p in paths]
    jobs = [(p, cfg) for p in paths]
    out: list[np.ndarray] = []
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, unit="img")
    try:
        if workers <= 1 or len(jobs) <= 1:
            for j in jobs:
                out.append(_segment_path(j))
                bar.update()
        else:
            ctx = get_context("fork") if hasattr(os, "fork") else get_context()
            chunk = max(1, min(16, len(jobs) // (workers * 4)))
            with ctx.Pool(workers, initializer=init_pool_worker) as pool:
                for m in pool.imap(_segment_path, jobs, chunksize=chunk):
                    out.append(m)
                    bar.update()
    finally:
        bar.close()
    if not out:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    shapes = {m.shape for m in out}
    if len(shapes) > 1:
        raise DataError(f"images differ in size ({sorted(shapes)}); a labels CSV needs one size")
    return np.stack(out)


def run_baseline(
    image_dir: str | os.PathLike,
    out_csv: str | os.PathLike,
    cfg: BaselineConfig | str = "baseline",
    *,
    names: Iterable[str] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> tuple[list[str], np.ndarray]:
    """Segment every slice of ``image_dir`` (or only ``names``) and write the submission CSV
    (``write_labels_csv``; a ``.gz`` suffix compresses).  Returns (names, label maps)."""
    from d2ct.data.images import list_slices
    from d2ct.data.labels_csv import write_labels_csv

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"image folder {image_dir} does not exist")
    if names is None:
        files = [image_dir / n for n in list_slices(image_dir)]
    else:
        files = [image_dir / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{len(missing)} image(s) not found in {image_dir}, e.g. {missing[0]}")
    if not files:
        raise DataError(f"no slices found in {image_dir}")
    maps = segment_files(files, cfg, workers=workers, progress=progress)
    names = [f.name for f in files]
    write_labels_csv(out_csv, names, maps)
    return names, maps


# ------------------------------------------------------------------------------ comparisons
def compare_configs(
    data_root: str | os.PathLike,
    configs: dict[str, BaselineConfig],
    *,
    split: str = "labelled",
    names: Sequence[str] | None = None,
    limit: int | None = None,
    workers: int = 1,
    out_dir: str | os.PathLike | None = None,
    submission: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run each configuration on the labelled images of a challenge-layout folder and score it.

    ``split``: ``"labelled"`` (default), ``"all"`` (every training image; unlabelled ones have an
    all-zero truth) or ``"test"`` (``test-images/`` against ``test-labels.csv[.gz]``).  Returns one
    row per configuration: ``preset, n_images, ARI, ARI_fg, Dice, Recall50, Precision50, regions``
    (mean labels per image), ``seconds`` (wall time of the segmentation with ``workers`` processes),
    ``s_per_image``.  With ``out_dir``: ``<out_dir>/<name>/`` gets the evaluation report (summary.json,
    per_image.csv, ari_hist.png) and ``labels.csv.gz``, and ``compare.json`` / ``compare.md`` the table.
    ``submission`` (one configuration only) writes the predicted CSV there."""
    import time

    from d2ct.data.challenge import ChallengeDataset
    from d2ct.data.labels_csv import write_labels_csv
    from d2ct.evaluation.report import evaluate_label_maps, write_report
    from d2ct.utils.fileio import atomic_write_json, atomic_write_text

    if not configs:
        raise ConfigError("compare_configs: no configuration given")
    if submission is not None and len(configs) != 1:
        raise ConfigError("--out (one submission CSV) needs exactly one preset; use --out-dir with --compare-presets")
    ds = ChallengeDataset.open(data_root)
    if split == "test":
        ds = ds.test_split()
        if ds is None or ds.labels is None:
            raise DataError(f"{data_root}: --split test needs test-images/ and test-labels.csv[.gz]")
        selected = list(ds.names)
    elif split == "all":
        selected = list(ds.names)
    elif split == "labelled":
        selected = list(ds.labelled_names)
    else:
        raise ConfigError(f"split must be 'labelled', 'all' or 'test', got {split!r}")
    if ds.labels is None:
        raise DataError(f"{data_root}: no labels CSV to score against")
    if names is not None:
        missing = [n for n in names if n not in set(ds.names)]
        if missing:
            raise DataError(f"{data_root}: image {missing[0]!r} not found")
        selected = [str(n) for n in names]
    if limit is not None:
        if int(limit) < 1:
            raise ConfigError(f"limit (--limit) must be >= 1, got {limit}")
        selected = selected[: int(limit)]
    if not selected:
        raise DataError(f"{data_root}: no {split} images to segment")
    paths = [ds.image_path(n) for n in selected]
    truth = [ds.label_map(n) for n in selected]
    out = Path(out_dir) if out_dir else None
    rows = []
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        maps = segment_files(paths, cfg, workers=workers, progress=progress, desc=name)
        seconds = time.perf_counter() - t0
        res = evaluate_label_maps(selected, truth, maps, with_ap=False)
        s = res.summary
        rows.append({
            "preset": name, "n_images": s["n_images"], "ARI": s["ARI"], "ARI_fg": s["ARI_fg"], "Dice": s["Dice"],
            "Recall50": s["Recall50"], "Precision50": s["Precision50"],
            "regions": float(maps.reshape(len(maps), -1).max(axis=1).mean()),
            "seconds": seconds, "s_per_image": seconds / len(selected),
        })
        res.info.update({"data": str(data_root), "split": split, "config": cfg.as_dict(), "workers": workers})
        if out is not None:
            write_report(res, out / name, title=f"{Path(data_root).name}: {name}")
            write_labels_csv(out / name / "labels.csv.gz", selected, maps)
            atomic_write_json(out / name / "config.json", cfg.as_dict())
        if submission is not None:
            write_labels_csv(submission, selected, maps)
    if out is not None:
        atomic_write_json(out / "compare.json", {"data": str(data_root), "split": split, "workers": workers,
                                                 "rows": rows, "configs": {k: v.as_dict() for k, v in configs.items()}})
        atomic_write_text(out / "compare.md", format_comparison(rows) + "\n")
    return rows


def format_comparison(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`compare_configs` rows."""
    cols = ["preset", "n_images", "ARI", "ARI_fg", "Dice", "Recall50", "Precision50", "regions", "seconds", "s_per_image"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, float):
                v = f"{v:.1f}" if c in ("seconds", "regions") else f"{v:.4f}"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
