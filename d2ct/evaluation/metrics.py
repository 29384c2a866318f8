"""Per-image scores of a predicted label map against the truth (no I/O, no pandas): what the
reports, the Detectron2 evaluator, the pseudo-label quality check and the threshold choice share."""
from __future__ import annotations

import numpy as np

from d2ct.errors import DataError
from d2ct.evaluation.ari import adjusted_rand_index
from d2ct.evaluation.dice import match_structures

__all__ = ["score_image", "group_bootstrap"]


def score_image(true: np.ndarray, pred: np.ndarray) -> dict:
    """Per-image scores: ARI, ARI_fg, Dice, Dice_all, Recall50, Precision50, n_true, n_pred, tp50."""
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise DataError(f"true label map is {true.shape} but the prediction is {pred.shape}")
    out = {
        "ARI": adjusted_rand_index(true, pred),
        "ARI_fg": adjusted_rand_index(true, pred, exclude_background=True),
    }
    out.update(match_structures(true, pred).as_dict())
    return out


def group_bootstrap(diff, groups, n: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-slice differences and its 95% interval, resampling whole groups (patients): slices
    of one patient are not independent, so resampling slices would make the interval too narrow.
    With every slice its own group this is the plain bootstrap over slices."""
    diff = np.asarray(diff, float)
    if diff.size == 0 or len(groups) != diff.size:
        raise ValueError(f"{diff.size} differences but {len(groups)} group labels")
    ids = sorted(set(groups))
    index = {g: i for i, g in enumerate(ids)}
    of = np.array([index[g] for g in groups])
    sums = np.bincount(of, weights=diff, minlength=len(ids))
    counts = np.bincount(of, minlength=len(ids))
    picks = np.random.default_rng(seed).integers(0, len(ids), size=(n, len(ids)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)
