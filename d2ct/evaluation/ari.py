"""Adjusted Rand index for label maps, computed from one contingency table.

The challenge score (2023/2024 editions, the organisers' own script) is, for each image,
``sklearn.metrics.adjusted_rand_score(true.ravel(), pred.ravel())`` over **all** pixels,
background included, then the mean over images.  The written rules describe a variant that
ignores the pixels that are background (0) in the truth; both are provided here:

* :func:`adjusted_rand_index` / :func:`ari_per_image` with ``exclude_background=False``: the
  organisers' script;
* ``exclude_background=True`` ("ARI_fg"): only the pixels where ``true != 0``.

Implementation: for uint8-valued maps the contingency table is one ``np.bincount`` of the
pair index ``t * 256 + p`` (65,536 bins); wider label ranges are factorised first.  From the
table we take the same integer sums sklearn's ``pair_confusion_matrix`` takes
(``S = sum n_ij^2``, ``A = sum a_i^2``, ``B = sum b_j^2``, ``N``) and evaluate sklearn's formula
with Python integers, so the result is bit-for-bit sklearn's, including its special cases:

* ``fn == fp == 0`` (the two partitions are identical up to renaming, which includes both being
  a single cluster, a single pixel, and the empty input) -> ``1.0``;
* otherwise ``2 (tp tn - fn fp) / ((tp + fn)(fn + tn) + (tp + fp)(fp + tn))``; e.g. one partition a
  single cluster and the other not -> ``0.0``.

``exclude_background=True`` on an image whose truth has no foreground pixel is undefined; sklearn
would return 1.0 for the empty input, which would reward any prediction.  We return ``nan`` and
the means skip ``nan`` (:func:`mean_ari`), so such images simply do not count.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "contingency_table",
    "pair_counts",
    "ari_from_contingency",
    "adjusted_rand_index",
    "ari_per_image",
    "mean_ari",
]


def _as_flat_labels(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "uib":
        if a.dtype.kind == "f" and a.size and np.all(np.mod(a, 1) == 0):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{what}: label maps must hold integers, got dtype {a.dtype}")
    return a.reshape(-1)


def contingency_table(true: np.ndarray, pred: np.ndarray, *, dense_uint8: bool = True) -> np.ndarray:
    """Contingency table ``n[i, j]`` = number of pixels with true label i and predicted label j.

    For uint8-valued maps (the d2ct convention) and ``dense_uint8`` the table is (256, 256),
    indexed by the label values themselves.  Otherwise the labels of each map are factorised
    (``np.unique``) and the table is (n_true_labels, n_pred_labels) in sorted label order.
    """
    t = _as_flat_labels(true, "true")
    p = _as_flat_labels(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"true and pred differ in size: {np.asarray(true).shape} vs {np.asarray(pred).shape}")
    if dense_uint8 and _fits_uint8(t) and _fits_uint8(p):
        pair = t.astype(np.intp, copy=False) * 256
        pair += p
        return np.bincount(pair, minlength=65536).reshape(256, 256)
    tu, ti = np.unique(t, return_inverse=True)
    pu, pi = np.unique(p, return_inverse=True)
    pair = ti.reshape(-1).astype(np.intp) * len(pu) + pi.reshape(-1)
    return np.bincount(pair, minlength=len(tu) * len(pu)).reshape(len(tu), len(pu))


def _fits_uint8(a: np.ndarray) -> bool:
    if a.dtype == np.uint8 or a.dtype == np.bool_:
        return True
    if a.size == 0:
        return True
    return bool(a.min() >= 0 and a.max() <= 255)


def pair_counts(table: np.ndarray) -> tuple[int, int, int, int]:
    """sklearn's pair confusion matrix ``(tn, fp, fn, tp)`` (ordered pairs) from a contingency table."""
    table = np.asarray(table, dtype=np.int64)
    n = int(table.sum())
    s = int((table * table).sum())
    a = table.sum(axis=1)
    b = table.sum(axis=0)
    sa = int((a * a).sum())
    sb = int((b * b).sum())
    tp = s - n
    fp = sb - s
    fn = sa - s
    tn = n * n - fp - fn - s
    return tn, fp, fn, tp


def ari_from_contingency(table: np.ndarray) -> float:
    """Adjusted Rand index from a contingency table, with sklearn's formula and special cases."""
    tn, fp, fn, tp = pair_counts(table)
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def adjusted_rand_index(true: np.ndarray, pred: np.ndarray, *, exclude_background: bool = False) -> float:
    """ARI between two label maps of the same shape (any integer dtype).

    ``exclude_background=False`` equals ``sklearn.metrics.adjusted_rand_score(true.ravel(),
    pred.ravel())`` exactly.  ``exclude_background=True`` keeps only pixels with ``true != 0``
    and returns ``nan`` when there is none.
    """
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"true and pred differ in shape: {true.shape} vs {pred.shape}")
    t = _as_flat_labels(true, "true")
    p = _as_flat_labels(pred, "pred")
    if _fits_uint8(t) and _fits_uint8(p):
        table = contingency_table(t, p)
        if exclude_background:
            table = table[1:]  # drop the row of true label 0
    else:
        if exclude_background:
            keep = t != 0
            t, p = t[keep], p[keep]
        table = contingency_table(t, p, dense_uint8=False)
    if exclude_background and table.sum() == 0:
        return float("nan")
    return ari_from_contingency(table)


def ari_per_image(
    true_maps: Sequence[np.ndarray] | np.ndarray,
    pred_maps: Sequence[np.ndarray] | np.ndarray,
    *,
    exclude_background: bool = False,
) -> np.ndarray:
    """ARI of each image pair; ``true_maps`` / ``pred_maps`` are (n, H, W) arrays or sequences of maps
    (or (n, n_pixels) arrays such as ``LabelTable.values``)."""
    if len(true_maps) != len(pred_maps):
        raise ValueError(f"{len(true_maps)} true maps but {len(pred_maps)} predicted maps")
    return np.array(
        [adjusted_rand_index(t, p, exclude_background=exclude_background) for t, p in zip(true_maps, pred_maps)],
        dtype=np.float64,
    )


def mean_ari(scores: Iterable[float]) -> float:
    """Mean of per-image scores, skipping ``nan`` (images where the score is undefined); ``nan`` if none."""
    arr = np.asarray(list(scores), dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")
