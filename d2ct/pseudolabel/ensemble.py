"""Ensemble teacher: every radiologist's instances of a slice fused into one set of pseudo-labels.

Partition mode lets one model label each slice; consensus keeps what a vote of models agreed
on. Here every model (each optionally with its flip view already fused in, see
``d2ct.engine.predictor.fuse_views``) predicts every slice, and the instances are fused the way
Weighted Boxes Fusion (Solovyev et al. 2021) fuses boxes, with masks instead of boxes:

- instances are matched across models by mask IoU: visited from the highest weighted score
  down, each joins the cluster whose seed mask it overlaps most (IoU >= ``iou_threshold``) and
  which holds no instance of its model yet, or seeds a new cluster;
- the fused mask is a score-weighted mask vote: a pixel belongs to the structure when the
  members holding it carry at least ``vote`` of the members' total weight ``w_m * s_m``
  (``w_m`` the model's normalised validation mask AP, ``s_m`` its score);
- the fused score is the AP-weighted mean of every model's score for the structure, a model
  that did not see it counting 0: ``sum_members(w_m * s_m) / sum_all(w_m)``. A structure all
  models saw keeps about their mean score; one that only one model saw keeps that model's
  score times its weight share, so agreement, not one model's confidence, ranks the structures.

The fused scores then go through the same threshold (and optional ignore regions below it) as
any model's scores (``d2ct.pseudolabel.run.resolve_overlaps``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from d2ct.errors import ConfigError


@dataclass
class EnsembleOptions:
    """How instances are fused (see the module docs).

    threshold: fused score a structure needs to become a pseudo-label; None: the radiologists'
        thresholds averaged with their weights (a structure every model saw above its own
        threshold passes; one fewer models saw needs the others' confidence to compensate).
    """

    iou_threshold: float = 0.5
    vote: float = 0.5
    min_score: float = 0.05
    threshold: float | None = None

    def check(self) -> None:
        for name in ("iou_threshold", "vote", "min_score"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"ensemble option {name} must be in [0, 1], got {value!r}")
        if self.vote <= 0.0:
            raise ConfigError("ensemble option vote must be above 0 (0 would make every pixel a member's)")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--ensemble-threshold must be a score in [0, 1], got {self.threshold!r}")

    def resolved_threshold(self, thresholds: Sequence[float], weights: Sequence[float]) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        w = np.asarray(weights, np.float64)
        return float(np.dot(w, thresholds) / w.sum())


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), end-exclusive, of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _iou(a: np.ndarray, box_a: tuple, b: np.ndarray, box_b: tuple) -> float:
    """Mask IoU computed on the two boxes' union only (0 when the boxes do not meet)."""
    if box_a[1] <= box_b[0] or box_b[1] <= box_a[0] or box_a[3] <= box_b[2] or box_b[3] <= box_a[2]:
        return 0.0
    y0, y1 = min(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    x0, x1 = min(box_a[2], box_b[2]), max(box_a[3], box_b[3])
    ca, cb = a[y0:y1, x0:x1], b[y0:y1, x0:x1]
    union = np.logical_or(ca, cb).sum()
    return float(np.logical_and(ca, cb).sum() / union) if union else 0.0


def ensemble_instances(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    weights: Sequence[float],
    *,
    iou_threshold: float = 0.5,
    vote: float = 0.5,
    min_score: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse per-model instances of one slice.

    Args:
        predictions: per model, (scores (N,), binary masks (N, H, W)).
        weights: per model, e.g. normalised validation mask AP (any non-negative values; they
            are normalised here; all zero means equal weights).
        iou_threshold: mask IoU for two models' instances to be the same structure.
        vote: share of the members' weighted score a pixel needs to be in the fused mask.
        min_score: instances below this score take no part (noise a model itself rejects).

    Returns:
        (scores (K,), masks (K, H, W) bool, votes (K,) the number of models that saw each),
        sorted by descending fused score.
    """
    if len(predictions) != len(weights):
        raise ConfigError(f"ensemble: {len(predictions)} models' predictions but {len(weights)} weights")
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ConfigError(f"ensemble weights must be finite and non-negative, got {w.tolist()}")
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
    shape = next((m.shape[1:] for _, m in predictions if np.ndim(m) == 3), (0, 0))

    pool = []  # (weighted score, model, score, mask, box)
    for model, (scores, masks) in enumerate(predictions):
        for s, mask in zip(np.asarray(scores, np.float64), masks):
            mask = np.asarray(mask, bool)
            if s >= min_score and mask.any():
                pool.append((w[model] * s, model, float(s), mask, _bbox(mask)))
    # the most trusted instance first, so each cluster is seeded by it; ties keep model order
    pool.sort(key=lambda t: -t[0])

    seeds: list[tuple[np.ndarray, tuple]] = []  # per cluster: its seed's mask and box
    clusters: list[list[tuple]] = []  # per cluster: (model, score, mask, box)
    for _, model, score, mask, box in pool:
        best, best_iou = None, iou_threshold
        for ci, (seed, seed_box) in enumerate(seeds):
            if any(c[0] == model for c in clusters[ci]):  # one instance per model per cluster
                continue
            iou = _iou(seed, seed_box, mask, box)
            if iou >= best_iou and (best is None or iou > best_iou):
                best, best_iou = ci, iou
        if best is None:
            seeds.append((mask, box))
            clusters.append([(model, score, mask, box)])
        else:
            clusters[best].append((model, score, mask, box))

    out_scores, out_masks, out_votes = [], [], []
    for cluster in clusters:
        member_w = np.array([w[c[0]] * c[1] for c in cluster])
        # the vote inside the members' joint box only (a pixel outside it is in no member)
        y0, x0 = min(c[3][0] for c in cluster), min(c[3][2] for c in cluster)
        y1, x1 = max(c[3][1] for c in cluster), max(c[3][3] for c in cluster)
        stack = np.stack([c[2][y0:y1, x0:x1] for c in cluster]).astype(np.float32)
        share = np.tensordot(member_w / member_w.sum(), stack, axes=1) if member_w.sum() > 0 else stack.mean(0)
        inside = share >= vote - 1e-9
        if not inside.any():
            continue
        fused = np.zeros(shape, bool)
        fused[y0:y1, x0:x1] = inside
        out_scores.append(float(member_w.sum()))  # sum_members(w_m * s_m); the weights sum to 1
        out_masks.append(fused)
        out_votes.append(len(cluster))
    if not out_scores:
        return np.zeros(0, np.float32), np.zeros((0, *shape), bool), np.zeros(0, np.int32)
    order = np.argsort(-np.asarray(out_scores), kind="stable")
    return (np.asarray(out_scores, np.float32)[order], np.stack(out_masks)[order],
            np.asarray(out_votes, np.int32)[order])
