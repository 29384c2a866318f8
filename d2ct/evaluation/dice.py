"""Class-agnostic Dice, recall and precision for label maps.

Structures are the non-zero label values of a map (label numbers are arbitrary, so they are
matched, not compared).  True and predicted structures are paired one-to-one with the Hungarian
algorithm (``scipy.optimize.linear_sum_assignment``) maximising the summed IoU; the IoU matrix
comes from one contingency table (see :func:`d2ct.evaluation.ari.contingency_table`).  Pairs with
IoU 0 are not matches.

Per image (:func:`match_structures` -> :class:`MatchResult`):

* ``dice``: mean over the **true** structures of the Dice of each with its matched prediction;
  an unmatched true structure counts as Dice 0.  Unmatched (extra) predictions do **not** lower
  ``dice``; they lower ``precision50`` and ``dice_all``.  ``nan`` when the truth has no structure.
* ``dice_all``: the same sum divided by ``n_matched + n_unmatched_true + n_unmatched_pred``, i.e.
  extra predictions also count as Dice 0 (an F1-like, symmetric version).  ``nan`` when both maps
  are empty.
* ``recall50``: fraction of true structures whose match has IoU >= 0.5 (``nan`` if no truth).
* ``precision50``: fraction of predicted structures whose match has IoU >= 0.5 (``nan`` if no
  prediction).  Because any IoU > 0.5 pair is mutually exclusive, the one-to-one matching does
  not change these two counts compared with greedy matching.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from d2ct.evaluation.ari import contingency_table
from d2ct.utils.masks import iou_from_overlaps

__all__ = ["MatchResult", "match_structures", "dice_per_image", "label_overlaps"]


@dataclass
class MatchResult:
    """Matching of one image's true and predicted structures."""

    true_labels: np.ndarray  # (n_true,) label values
    pred_labels: np.ndarray  # (n_pred,)
    iou: np.ndarray  # (n_true, n_pred)
    pairs: np.ndarray  # (n_matched, 2) indices into true_labels / pred_labels, IoU > 0
    pair_iou: np.ndarray  # (n_matched,)
    pair_dice: np.ndarray  # (n_matched,)
    iou_threshold: float = 0.5
    extra: dict = field(default_factory=dict)

    @property
    def n_true(self) -> int:
        return len(self.true_labels)

    @property
    def n_pred(self) -> int:
        return len(self.pred_labels)

    @property
    def n_matched(self) -> int:
        return len(self.pairs)

    @property
    def tp50(self) -> int:
        """Matches with IoU >= ``iou_threshold`` (true positives at that threshold)."""
        return int(np.count_nonzero(self.pair_iou >= self.iou_threshold))

    @property
    def dice(self) -> float:
        return float(self.pair_dice.sum() / self.n_true) if self.n_true else float("nan")

    @property
    def dice_all(self) -> float:
        denom = self.n_true + self.n_pred - self.n_matched
        return float(self.pair_dice.sum() / denom) if denom else float("nan")

    @property
    def recall50(self) -> float:
        return self.tp50 / self.n_true if self.n_true else float("nan")

    @property
    def precision50(self) -> float:
        return self.tp50 / self.n_pred if self.n_pred else float("nan")

    def as_dict(self) -> dict:
        return {
            "Dice": self.dice,
            "Dice_all": self.dice_all,
            "Recall50": self.recall50,
            "Precision50": self.precision50,
            "n_true": self.n_true,
            "n_pred": self.n_pred,
            "tp50": self.tp50,
        }


def label_overlaps(true: np.ndarray, pred: np.ndarray):
    """(true_labels, pred_labels, intersections, true_areas, pred_areas) of the non-zero labels of
    two label maps, from one contingency table (IoUs: :func:`d2ct.utils.masks.iou_from_overlaps`)."""
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"true and pred differ in shape: {true.shape} vs {pred.shape}")
    t = true.reshape(-1)
    p = pred.reshape(-1)
    table = contingency_table(t, p)
    if table.shape == (256, 256):
        t_labels = np.arange(256)
        p_labels = np.arange(256)
    else:
        t_labels = np.unique(t)
        p_labels = np.unique(p)
    t_area = table.sum(axis=1)
    p_area = table.sum(axis=0)
    t_keep = (t_labels != 0) & (t_area > 0)
    p_keep = (p_labels != 0) & (p_area > 0)
    inter = table[np.ix_(t_keep, p_keep)]
    return t_labels[t_keep], p_labels[p_keep], inter, t_area[t_keep], p_area[p_keep]


def match_structures(true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> MatchResult:
    """One-to-one IoU matching of the structures (non-zero labels) of two label maps."""
    t_labels, p_labels, inter, t_area, p_area = label_overlaps(true, pred)
    inter = inter.astype(np.float64)
    iou = iou_from_overlaps(inter, t_area, p_area)
    if iou.size and iou.max() > 0:
        rows, cols = linear_sum_assignment(iou, maximize=True)
        ok = iou[rows, cols] > 0
        rows, cols = rows[ok], cols[ok]
    else:
        rows = cols = np.zeros(0, dtype=np.intp)
    pair_iou = iou[rows, cols]
    pair_dice = 2.0 * inter[rows, cols] / (t_area[rows] + p_area[cols])
    return MatchResult(
        true_labels=t_labels,
        pred_labels=p_labels,
        iou=iou,
        pairs=np.stack([rows, cols], axis=1) if len(rows) else np.zeros((0, 2), dtype=np.intp),
        pair_iou=pair_iou,
        pair_dice=pair_dice,
        iou_threshold=iou_threshold,
    )


def dice_per_image(true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict:
    """``match_structures(...).as_dict()``: Dice, Dice_all, Recall50, Precision50, n_true, n_pred, tp50."""
    return match_structures(true, pred, iou_threshold).as_dict()
