"""Per-image scores of a predicted label map against the truth (no I/O, no pandas): what the
reports, the Detectron2 evaluator, the pseudo-label quality check and the threshold choice share."""
from __future__ import annotations

import numpy as np

from d2ct.errors import DataError
from d2ct.evaluation.ari import adjusted_rand_index
from d2ct.evaluation.dice import match_structures

__all__ = ["score_image"]


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
