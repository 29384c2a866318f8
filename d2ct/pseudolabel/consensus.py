"""Consensus pseudo-labels: keep the structures that several radiologists agree on.

Every model labels every image. Instances are clustered across models by mask IoU (each
cluster holds at most one instance per model); a cluster is kept when at least ``min_votes``
models agree, or when its single instance is very confident. Its mask is the AP-weighted vote
of the members (a pixel belongs to the structure when the members holding it carry at least
half of the cluster's weight) and its score the weighted mean of the members' scores.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from d2ct.utils.masks import mask_iou


def consensus_instances(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    weights: Sequence[float],
    *,
    iou_threshold: float = 0.5,
    min_votes: int = 2,
    single_model_score: float = 0.9,
    min_score: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """Fuse per-model instances of one image.

    Args:
        predictions: per model, (scores (N,), binary masks (N, H, W)).
        weights: per model, normalised validation AP.
        iou_threshold: mask IoU for two instances to be the same structure.
        min_votes: models that must agree for a structure to be kept.
        single_model_score: a structure seen by fewer models is kept if one scores at least this.
        min_score: instances below this score take no part at all.

    Returns:
        (scores (K,), masks (K, H, W) bool), sorted by descending score.
    """
    weights = np.asarray(weights, dtype=np.float64)
    members: list[list[tuple[int, float, np.ndarray]]] = []  # per cluster: (model, score, mask)
    # Visit instances from the most confident down, so each cluster is seeded by its best instance.
    pool = []
    for m, (scores, masks) in enumerate(predictions):
        for s, mask in zip(scores, masks):
            if s >= min_score and mask.any():
                pool.append((float(s), m, mask.astype(bool)))
    pool.sort(key=lambda t: -t[0])
    # every pairwise IoU of the pool in one matrix product, rather than pair by pair in the loop
    stack = np.stack([mask for _, _, mask in pool]) if pool else np.zeros((0, 1, 1), bool)
    ious = mask_iou(stack, stack)
    heads: list[int] = []  # per cluster: the pool index of its seed (its most confident instance)
    for i, (score, model, mask) in enumerate(pool):
        best, best_iou = None, iou_threshold
        for ci, cluster in enumerate(members):
            if any(mm == model for mm, _, _ in cluster):
                continue  # one instance per model per cluster
            iou = ious[heads[ci], i]
            if iou >= best_iou:
                best, best_iou = ci, iou
        if best is None:
            members.append([(model, score, mask)])
            heads.append(i)
        else:
            members[best].append((model, score, mask))

    out_scores, out_masks = [], []
    for cluster in members:
        votes = len(cluster)
        top = max(s for _, s, _ in cluster)
        if votes < min_votes and top < single_model_score:
            continue
        w = np.array([weights[m] for m, _, _ in cluster])
        if w.sum() <= 0:
            w = np.ones_like(w)
        stack = np.stack([mk for _, _, mk in cluster]).astype(np.float32)
        fused = np.tensordot(w / w.sum(), stack, axes=1) >= 0.5
        if not fused.any():
            continue
        out_scores.append(float(np.dot(w, [s for _, s, _ in cluster]) / w.sum()))
        out_masks.append(fused)
    if not out_scores:
        shape = predictions[0][1].shape[1:] if predictions and predictions[0][1].ndim == 3 else (0, 0)
        return np.zeros(0, np.float32), np.zeros((0, *shape), bool)
    order = np.argsort(-np.asarray(out_scores), kind="stable")
    return np.asarray(out_scores, np.float32)[order], np.stack(out_masks)[order]
