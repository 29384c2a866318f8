"""Evaluate label maps (arrays or challenge CSVs) and write the report files.

:func:`evaluate_label_maps` scores every image (:func:`d2ct.evaluation.metrics.score_image`: ARI over all pixels, ARI
excluding truth background, Dice / recall / precision after one-to-one IoU matching) and, when
asked, the class-agnostic COCO mask AP over the whole set; :func:`evaluate_csv` does it for a truth
CSV and a prediction CSV in the challenge layout.  :func:`write_report` writes ``summary.json``,
``per_image.csv``, ``by_<column>.csv`` breakdowns over manifest columns and ``ari_hist.png``.

Summary keys (:func:`summarize`):

* ``ARI``: mean over images of the per-image ARI over all pixels (the organisers' score);
* ``ARI_fg``: mean over images with truth foreground of the ARI on truth-foreground pixels
  (the written rules); ``n_images_fg`` says how many images that is;
* ``Dice``, ``Dice_all``: means over images (see :mod:`d2ct.evaluation.dice`; images without a
  true structure are skipped);
* ``Recall50`` / ``Precision50``: pooled over the set (true structures found at IoU >= 0.5 over all
  true structures; same over all predicted structures);
* ``AP, AP50, AP75, APs, APm, APl``: COCO mask AP (0-100) when computed.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from d2ct.data.manifest import load_manifest  # noqa: F401  (re-exported: d2ct.evaluation.cli)
from d2ct.errors import ConfigError, DataError
from d2ct.evaluation.coco_ap import AP_KEYS, coco_ap, label_map_to_rles
from d2ct.evaluation.metrics import score_image
from d2ct.utils.fileio import atomic_path, atomic_write, atomic_write_json, natural_key

__all__ = [
    "PER_IMAGE_COLUMNS",
    "EvaluationResult",
    "score_image",
    "summarize",
    "evaluate_label_maps",
    "evaluate_csv",
    "infer_shape",
    "load_manifest",
    "breakdown",
    "format_summary",
    "plot_ari_histogram",
    "write_report",
]

PER_IMAGE_COLUMNS = ["name", "ARI", "ARI_fg", "Dice", "Dice_all", "Recall50", "Precision50", "n_true", "n_pred", "tp50"]


def _nanmean(x) -> float:
    a = np.asarray(x, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def summarize(per_image: pd.DataFrame, ap: dict | None = None) -> dict:
    """Set-level summary of a per-image score table (see the module docstring)."""
    n_true = int(per_image["n_true"].sum()) if len(per_image) else 0
    n_pred = int(per_image["n_pred"].sum()) if len(per_image) else 0
    tp = int(per_image["tp50"].sum()) if len(per_image) else 0
    s = {
        "n_images": int(len(per_image)),
        "ARI": _nanmean(per_image["ARI"]),
        "ARI_median": float(np.nanmedian(per_image["ARI"])) if per_image["ARI"].notna().any() else float("nan"),
        "ARI_fg": _nanmean(per_image["ARI_fg"]),
        "n_images_fg": int(per_image["ARI_fg"].notna().sum()),
        "Dice": _nanmean(per_image["Dice"]),
        "Dice_all": _nanmean(per_image["Dice_all"]),
        "Recall50": tp / n_true if n_true else float("nan"),
        "Precision50": tp / n_pred if n_pred else float("nan"),
        "n_true": n_true,
        "n_pred": n_pred,
    }
    if ap:
        s.update({k: ap[k] for k in AP_KEYS if k in ap})
    return s


@dataclass
class EvaluationResult:
    """Per-image scores (one row per image, :data:`PER_IMAGE_COLUMNS`) and the set summary."""

    per_image: pd.DataFrame
    summary: dict
    info: dict = field(default_factory=dict)

    def breakdown(self, manifest: pd.DataFrame, column: str) -> pd.DataFrame:
        return breakdown(self.per_image, manifest, column)


def evaluate_label_maps(
    names: Sequence[str],
    true_maps: Iterable[np.ndarray],
    pred_maps: Iterable[np.ndarray],
    *,
    with_ap: bool = True,
    progress: bool = False,
) -> EvaluationResult:
    """Score predicted label maps against true ones (same order as ``names``)."""
    from d2ct.utils.progress import progress_bar as tqdm  # line mode when stderr is not a terminal

    names = [str(n) for n in names]
    rows = []
    gt_rles, pred_rles, shapes = [], [], []
    it = zip(names, true_maps, pred_maps)
    for name, t, p in tqdm(it, total=len(names), desc="evaluate", disable=not progress, unit="img"):
        t = np.asarray(t)
        p = np.asarray(p)
        if t.shape != p.shape:
            raise DataError(f"image {name}: true label map is {t.shape} but the prediction is {p.shape}")
        row = {"name": name}
        row.update(score_image(t, p))
        rows.append(row)
        if with_ap:
            gt_rles.append(label_map_to_rles(t)[0])
            pred_rles.append([(r, 1.0) for r in label_map_to_rles(p)[0]])
            shapes.append(t.shape)
    if len(rows) != len(names):
        raise DataError(f"{len(names)} names but only {len(rows)} pairs of label maps")
    per_image = pd.DataFrame(rows, columns=PER_IMAGE_COLUMNS)
    ap = coco_ap(gt_rles, pred_rles, shapes) if with_ap and rows else None
    return EvaluationResult(per_image, summarize(per_image, ap))


def infer_shape(n_pixels: int, source: str = "labels CSV") -> tuple[int, int]:
    """Square (side, side) for ``n_pixels``; ConfigError when it is not a square number."""
    side = math.isqrt(int(n_pixels))
    if side * side != n_pixels or side == 0:
        raise ConfigError(f"{source}: {n_pixels} pixels per image is not a square; give the image size with --shape H W")
    return side, side


def evaluate_csv(
    truth_csv: str | os.PathLike,
    pred_csv: str | os.PathLike,
    *,
    shape: tuple[int, int] | None = None,
    annotated: str | os.PathLike | Sequence[str] | None = None,
    skip_empty: bool | None = None,
    names: Sequence[str] | None = None,
    with_ap: bool = True,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate a prediction CSV against a truth CSV (both in the challenge layout).

    Images scored: every truth column (or ``names``), restricted to ``annotated`` (a JSON file
    readable by :func:`d2ct.data.challenge.read_annotated`, or a list of names; every name must be
    a truth column) and, with ``skip_empty``, to columns whose truth is not all zero. ``skip_empty``
    None (the default): True without an annotated list, as everywhere else in d2ct an all-zero
    column is an unlabelled image (the pool of labels.csv.gz), not an image with no structure.
    Every scored image must be a column of the prediction. What was left out is counted in
    ``info`` (``skipped_unannotated``, ``skipped_empty``, ``ignored_pred_columns`` with the first
    name of each in ``*_first``) for the caller to say."""
    from d2ct.data.labels_csv import read_labels_csv

    truth = read_labels_csv(truth_csv)
    pred = read_labels_csv(pred_csv)
    if truth.n_pixels != pred.n_pixels:
        raise DataError(
            f"{pred_csv}: {pred.n_pixels} pixels per image but the truth {truth_csv} has {truth.n_pixels}"
        )
    if shape is None:
        shape = infer_shape(truth.n_pixels, str(truth_csv))
    shape = (int(shape[0]), int(shape[1]))
    if shape[0] * shape[1] != truth.n_pixels:
        raise ConfigError(f"--shape {shape[0]} {shape[1]} gives {shape[0] * shape[1]} pixels but {truth_csv} has {truth.n_pixels} per image")
    selected = list(truth.names) if names is None else [str(n) for n in names]
    missing_truth = [n for n in selected if n not in truth]
    if missing_truth:
        raise DataError(f"{truth_csv}: no column {missing_truth[0]!r} ({len(missing_truth)} requested image(s) missing)")
    info = {"truth_csv": str(truth_csv), "pred_csv": str(pred_csv), "shape": list(shape), "n_truth_columns": truth.n_images}
    if annotated is not None:
        where = f"a column of the truth {truth_csv}"
        if isinstance(annotated, (str, os.PathLike)):
            from d2ct.data.challenge import read_annotated

            ann = set(read_annotated(annotated, list(truth.names), where=where))
            info["annotated"] = str(annotated)
        else:
            ann = {str(a) for a in annotated}
            unknown = sorted(ann - set(truth.names), key=natural_key)
            if unknown:
                raise DataError(f"annotated image {unknown[0]!r} is not {where}"
                                + (f" ({len(unknown)} such names)" if len(unknown) > 1 else ""))
        dropped = [n for n in selected if n not in ann]
        selected = [n for n in selected if n in ann]
        info["skipped_unannotated"] = len(dropped)
        if dropped:
            info["skipped_unannotated_first"] = dropped[0]
    if skip_empty is None:
        skip_empty = annotated is None
    info["skip_empty"] = bool(skip_empty)
    if skip_empty:
        dropped = [n for n in selected if truth.is_empty(n)]
        selected = [n for n in selected if not truth.is_empty(n)]
        info["skipped_empty"] = len(dropped)
        if dropped:
            info["skipped_empty_first"] = dropped[0]
    if not selected:
        raise DataError(f"{truth_csv}: no image left to evaluate (every column is all zero, i.e. unlabelled, "
                        "or not in --annotated; --include-empty scores all-zero columns)")
    missing = [n for n in selected if n not in pred]
    if missing:
        raise DataError(
            f"{pred_csv}: no column for truth image {missing[0]!r} ({len(missing)} of {len(selected)} images missing)"
        )
    chosen = set(selected)
    ignored = [n for n in pred.names if n not in chosen]
    info["ignored_pred_columns"] = len(ignored)
    if ignored:
        info["ignored_pred_columns_first"] = ignored[0]
    selected = sorted(selected, key=natural_key)
    result = evaluate_label_maps(
        selected,
        (truth.label_map(n, shape) for n in selected),
        (pred.label_map(n, shape) for n in selected),
        with_ap=with_ap,
        progress=progress,
    )
    result.info.update(info)
    return result


# ----------------------------------------------------------------------------------- breakdowns
def breakdown(per_image: pd.DataFrame, manifest: pd.DataFrame, column: str) -> pd.DataFrame:
    """Summary per value of ``manifest[column]`` (images missing from the manifest go to '(missing)')."""
    if column not in manifest.columns:
        raise ConfigError(f"--group-by {column!r}: not a manifest column (have {', '.join(map(str, manifest.columns))})")
    groups = manifest[column].reindex(per_image["name"].values)
    groups = groups.astype(object).where(groups.notna(), "(missing)").astype(str).values
    rows = []
    for g in sorted(set(groups), key=natural_key):
        s = summarize(per_image[groups == g])
        rows.append({column: g, **{k: s[k] for k in ("n_images", "ARI", "ARI_fg", "Dice", "Recall50", "Precision50", "n_true", "n_pred")}})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- output
_SUMMARY_ORDER = ["n_images", "ARI", "ARI_median", "ARI_fg", "n_images_fg", "Dice", "Dice_all", "Recall50",
                  "Precision50", "n_true", "n_pred", *AP_KEYS]


def _fmt(v) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def format_summary(summary: dict, title: str = "evaluation") -> str:
    """A two-column text table of the summary."""
    keys = [k for k in _SUMMARY_ORDER if k in summary] + [k for k in summary if k not in _SUMMARY_ORDER]
    width = max(len(k) for k in keys)
    lines = [title, "-" * max(len(title), width + 12)]
    for k in keys:
        lines.append(f"{k:<{width}}  {_fmt(summary[k]):>10}")
    return "\n".join(lines)


def format_frame(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda x: f"{x:.4f}")


def plot_ari_histogram(per_image: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """Histogram of the per-image ARI (all pixels) and ARI_fg, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, col, label in zip(axes, ("ARI", "ARI_fg"), ("ARI, all pixels", "ARI, truth foreground only")):
        v = per_image[col].dropna().to_numpy()
        lo = min(-0.1, float(v.min())) if v.size else -0.1
        ax.hist(v, bins=np.linspace(lo, 1.0, 45), color="tab:blue", edgecolor="white")
        if v.size:
            ax.axvline(v.mean(), color="tab:red", lw=1.5, label=f"mean {v.mean():.3f}")
            ax.axvline(np.median(v), color="tab:orange", lw=1.5, ls="--", label=f"median {np.median(v):.3f}")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("images")
        ax.set_title(f"{label} ({v.size} images)", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(float(obj)) else float(obj)
    return obj


def write_report(
    result: EvaluationResult,
    out_dir: str | os.PathLike,
    *,
    manifest: pd.DataFrame | None = None,
    group_by: Sequence[str] = (),
    title: str = "",
) -> dict[str, Path]:
    """Write summary.json (NaN -> null), per_image.csv, by_<column>.csv and ari_hist.png; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    doc = {"summary": result.summary, "info": result.info}
    breakdowns = {}
    if group_by:
        if manifest is None:
            raise ConfigError("--group-by needs --manifest")
        for col in group_by:
            df = breakdown(result.per_image, manifest, col)
            p = out / f"by_{col}.csv"
            with atomic_write(p, "w", encoding="utf-8", newline="") as f:
                df.to_csv(f, index=False)
            paths[f"by_{col}"] = p
            breakdowns[col] = df.to_dict(orient="records")
    if breakdowns:
        doc["breakdown"] = breakdowns
    paths["summary"] = out / "summary.json"
    atomic_write_json(paths["summary"], _jsonable(doc))
    paths["per_image"] = out / "per_image.csv"
    with atomic_write(paths["per_image"], "w", encoding="utf-8", newline="") as f:
        result.per_image.to_csv(f, index=False)
    paths["histogram"] = plot_ari_histogram(result.per_image, out / "ari_hist.png", title=title)
    return paths
