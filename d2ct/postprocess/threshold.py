"""Choosing the score threshold that turns instances into label maps, on labelled slices.

The threshold trades structures missed against structures invented, and where the balance lies
differs from model to model (a model trained on fewer, cleaner pseudo-labels scores its instances
differently from one trained on the labelled slices alone). Scoring every model at one fixed
threshold can therefore rank them by calibration rather than by what they find; choosing each
model's threshold on the validation split, never on the test slices, compares them at their best.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from d2ct.errors import DataError

from .submission import PostprocessOptions, label_maps_from_instances

def threshold_scores(instances: dict, names: Sequence[str], truth: Sequence[np.ndarray],
                     options: PostprocessOptions, grid: Sequence[float]) -> dict[float, float]:
    """Mean per-slice ARI (all pixels) of the flattened instances at each threshold of ``grid``
    (``options`` gives the other flattening settings; the pipeline's grid: predict.threshold_grid)."""
    from d2ct.evaluation.metrics import score_image

    if len(names) != len(truth) or not names:
        raise DataError(f"threshold_scores: {len(names)} slice names and {len(truth)} label maps")
    scores = {}
    for t in grid:
        opts = dataclasses.replace(options, score_threshold=float(t))
        maps = label_maps_from_instances(instances, names, opts, shape=truth[0].shape)
        scores[float(t)] = float(np.mean([score_image(y, p)["ARI"] for y, p in zip(truth, maps)]))
    return scores


def best_threshold(scores: dict[float, float]) -> float:
    """The threshold with the highest ARI; on a tie the lowest such threshold (fewest slices emptied)."""
    if not scores:
        raise DataError("best_threshold: no thresholds were scored")
    top = max(scores.values())
    return min(t for t, v in scores.items() if v == top)
