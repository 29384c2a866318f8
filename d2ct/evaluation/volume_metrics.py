"""3-D scores for label volumes (one label per 3-D structure, as :mod:`d2ct.postprocess.linking` writes).

* ``ARI_3d``: ``sklearn.metrics.adjusted_rand_score`` on the flattened volumes, all voxels (and
  ``ARI_3d_fg``: truth-foreground voxels only), from one contingency table
  (:func:`d2ct.evaluation.ari.adjusted_rand_index`): a structure numbered differently on two slices
  is penalised here, not by the per-slice ARI.
* ``Dice_3d`` etc.: true and predicted 3-D structures matched one-to-one by IoU (Hungarian,
  :func:`d2ct.evaluation.dice.match_structures` on the whole volume); per-structure Dice.
* Structure counts, each true structure in exactly one class, checked in this order:

  - **found**: matched with IoU >= ``iou_threshold`` (0.5);
  - **split**: >= 2 predicted structures each lie mostly (> 50 % of their voxels) inside it and each
    covers >= ``part_fraction`` (10 %) of it;
  - **merged**: one predicted structure holds >= ``part_fraction`` of it and of at least one other true
    structure, and lies mostly (> 50 %) inside the union of those true structures;
  - **missed**: everything else (nothing or too little predicted for it).

  ``false``: predicted structures not matched at IoU >= ``iou_threshold`` that are not part of a
  split or merge.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from d2ct.evaluation.ari import adjusted_rand_index
from d2ct.evaluation.dice import label_overlaps, match_structures

__all__ = ["VolumeScores", "score_volume", "format_volume_scores", "is_volume_path", "score_label_volumes",
           "write_volume_report"]


@dataclass
class VolumeScores:
    summary: dict
    per_structure: list[dict] = field(default_factory=list)  # one row per true structure


def score_volume(truth: np.ndarray, pred: np.ndarray, *, iou_threshold: float = 0.5, part_fraction: float = 0.1,
                 spacing: tuple[float, float, float] | None = None) -> VolumeScores:
    """3-D scores of a predicted label volume against the truth (same shape, any integer labels)."""
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction differ in shape: {truth.shape} vs {pred.shape}")
    ari = adjusted_rand_index(truth, pred)
    ari_fg = adjusted_rand_index(truth, pred, exclude_background=True)
    match = match_structures(truth, pred, iou_threshold)
    t_labels, p_labels, inter, t_area, p_area = label_overlaps(truth, pred)
    inter = inter.astype(np.int64)
    n_t, n_p = len(t_labels), len(p_labels)

    found = np.zeros(n_t, bool)
    matched_pred = np.zeros(n_p, bool)
    dice_of = np.zeros(n_t)
    iou_of = np.zeros(n_t)
    partner = np.full(n_t, -1)
    for (ti, pi), iou, dice in zip(match.pairs, match.pair_iou, match.pair_dice):
        dice_of[ti], iou_of[ti], partner[ti] = dice, iou, pi
        if iou >= iou_threshold:
            found[ti] = True
            matched_pred[pi] = True

    inside = inter / np.maximum(p_area, 1)[None, :] if n_t and n_p else np.zeros((n_t, n_p))  # share of pred in truth
    covers = inter / np.maximum(t_area, 1)[:, None] if n_t and n_p else np.zeros((n_t, n_p))  # share of truth in pred
    status = np.array(["missed"] * n_t, dtype=object)
    status[found] = "found"
    part_pred = np.zeros(n_p, bool)
    for ti in np.flatnonzero(~found):
        parts = np.flatnonzero((inside[ti] > 0.5) & (covers[ti] >= part_fraction))
        if parts.size >= 2:
            status[ti] = "split"
            part_pred[parts] = True
    for pi in range(n_p):
        holders = np.flatnonzero(covers[:, pi] >= part_fraction)
        if holders.size >= 2 and inside[holders, pi].sum() > 0.5:
            for ti in holders:
                if status[ti] == "missed":
                    status[ti] = "merged"
            if any(status[ti] == "merged" for ti in holders):
                part_pred[pi] = True
    n_false = int(np.count_nonzero(~matched_pred & ~part_pred))

    voxel_ml = float(np.prod(spacing)) / 1000.0 if spacing is not None else None
    z_range: dict[int, list[int]] = {}
    for z in range(truth.shape[0] if truth.ndim else 0):
        for v in np.unique(truth[z]).tolist():
            z_range.setdefault(int(v), [z, z])[1] = z
    per = []
    for ti in range(n_t):
        z0, z1 = z_range[int(t_labels[ti])]
        row = {"label": int(t_labels[ti]), "voxels": int(t_area[ti]), "z_first": z0, "z_last": z1,
               "status": str(status[ti]), "pred_label": int(p_labels[partner[ti]]) if partner[ti] >= 0 else 0,
               "iou": float(iou_of[ti]), "dice": float(dice_of[ti])}
        if voxel_ml is not None:
            row["volume_ml"] = float(t_area[ti] * voxel_ml)
        per.append(row)
    counts = {s: int(np.count_nonzero(status == s)) for s in ("found", "missed", "split", "merged")}
    summary = {
        "ARI_3d": ari, "ARI_3d_fg": ari_fg, "Dice_3d": match.dice, "Dice_3d_all": match.dice_all,
        "Recall50_3d": match.recall50, "Precision50_3d": match.precision50,
        "n_true": n_t, "n_pred": n_p, **counts, "false": n_false,
    }
    return VolumeScores(summary=summary, per_structure=per)


def format_volume_scores(scores: VolumeScores, title: str = "") -> str:
    s = scores.summary
    lines = [title] if title else []
    lines.append(f"ARI 3-D (all voxels)      {s['ARI_3d']:.4f}")
    lines.append(f"ARI 3-D (truth fg)        {s['ARI_3d_fg']:.4f}")
    lines.append(f"Dice 3-D (per structure)  {s['Dice_3d']:.4f}   (with extra predictions as 0: {s['Dice_3d_all']:.4f})")
    lines.append(f"structures: {s['n_true']} true, {s['n_pred']} predicted; found {s['found']}, missed {s['missed']}, "
                 f"split {s['split']}, merged {s['merged']}; {s['false']} predicted without a true structure")
    return "\n".join(lines)


def is_volume_path(path) -> bool:
    """A NIfTI file name (.nii / .nii.gz)."""
    return str(path).lower().endswith((".nii", ".nii.gz"))


def score_label_volumes(truth_path, pred_path, **kwargs) -> VolumeScores:
    """3-D scores of two NIfTI label volumes, which must lie on the same grid (shape, voxel size,
    orientation within a tolerance; the error names both files otherwise)."""
    from d2ct.data.volumes import load_label_volume, load_volume

    ref = load_volume(truth_path)
    truth = load_label_volume(truth_path, ref)
    pred = load_label_volume(pred_path, ref)
    return score_volume(truth, pred, spacing=ref.spacing, **kwargs)


def write_volume_report(scores: VolumeScores, out_dir, **meta) -> dict:
    """``summary.json`` (the summary and ``meta``) and ``per_structure.csv`` in ``out_dir``."""
    import csv
    import io
    from pathlib import Path

    from d2ct.utils.fileio import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out_dir / "summary.json", "per_structure": out_dir / "per_structure.csv"}
    atomic_write_json(paths["summary"], {**meta, **scores.summary})
    buf = io.StringIO(newline="")
    cols = list(scores.per_structure[0]) if scores.per_structure else ["label"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in scores.per_structure:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(paths["per_structure"], buf.getvalue())
    return paths


def evaluate_volume_cli(truth_path, pred_path, out_dir=None) -> int:
    """What ``tools/evaluate.py`` does for two NIfTI label volumes: print the 3-D scores, and with
    ``out_dir`` write ``summary.json`` and ``per_structure.csv``. Returns the exit status (0)."""
    from d2ct.errors import ConfigError

    if not (is_volume_path(truth_path) and is_volume_path(pred_path)):
        raise ConfigError(f"--truth {truth_path} and --pred {pred_path}: both must be NIfTI label volumes "
                          "(.nii/.nii.gz) or both label CSVs")
    scores = score_label_volumes(truth_path, pred_path)
    print(format_volume_scores(scores, title=f"{pred_path} vs {truth_path} (3-D)"))
    if out_dir:
        paths = write_volume_report(scores, out_dir, truth=str(truth_path), pred=str(pred_path))
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
