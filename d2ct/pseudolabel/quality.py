"""How good pseudo-labels would be, measured where the truth is known.

The pool has no labels, so nothing says how many of its pseudo-labelled structures are real. The
same rules (one teacher above its score threshold, as in partition mode; or the consensus of
several) are applied here to the teachers' saved instances on labelled validation slices and the
result scored against their truth: how many slices a rule keeps, how many of the structures it
writes match a real one (precision at IoU 0.5), and how many real structures of a kept slice it
misses, which the final model is then taught as background (1 - recall at IoU 0.5).

The truth may be partial (OpenKBP contours at most 7 organs per patient), so precision here is a
lower bound: a real but uncontoured organ counts as invented.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_util

from d2ct.errors import DataError
from d2ct.postprocess.flatten import instances_to_label_map

from .consensus import consensus_instances
from .run import ConsensusOptions, _structures, resolve_overlaps

# name -> (RLEs, scores) of one model, as d2ct.postprocess.submission.load_instances reads them
Instances = Mapping[str, tuple[list[dict], np.ndarray]]


def _masks(rles: list[dict], shape: tuple[int, int]) -> np.ndarray:
    if not rles:
        return np.zeros((0, *shape), bool)
    with warnings.catch_warnings():  # pycocotools' Cython __array__ predates numpy 2's copy keyword
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        return np.moveaxis(mask_util.decode(rles), -1, 0).astype(bool)


def annotations_to_label_map(annotations: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """The label map a final model is trained on: the structures (not the ignore regions) of one
    pseudo-labelled slice, one id each."""
    structures = _structures(annotations)
    return instances_to_label_map([a["segmentation"] for a in structures], shape=shape)


def score_rule(label_maps: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> dict:
    """Precision, recall (IoU 0.5, pooled over structures) and mean ARI of the slices a rule keeps
    (those with at least one structure); ``kept`` counts them."""
    from d2ct.evaluation.report import score_image

    kept = [(y, p) for y, p in zip(truth, label_maps) if p.any()]
    scores = [score_image(y, p) for y, p in kept]
    n_pred = sum(s["n_pred"] for s in scores)
    n_true = sum(s["n_true"] for s in scores)
    tp = sum(s["tp50"] for s in scores)
    return {"slices": len(label_maps), "kept": len(kept), "structures": int(n_pred),
            "per_slice": n_pred / len(kept) if kept else 0.0, "truth_per_slice": n_true / len(kept) if kept else 0.0,
            "precision50": tp / n_pred if n_pred else None, "recall50": tp / n_true if n_true else None,
            "ARI": float(np.mean([s["ARI"] for s in scores])) if scores else None}


def pseudo_label_quality(teachers: Mapping[str, Instances], weights: Mapping[str, float], names: Sequence[str],
                         truth: Sequence[np.ndarray], thresholds: Sequence[float] | Mapping[str, Sequence[float]], *,
                         min_area: int = 5, consensus: ConsensusOptions | None = None) -> list[dict]:
    """One row per rule: each teacher at each of ``thresholds`` (partition mode's rule for the
    slices it labels; a mapping gives each teacher its own) and, with two teachers or more, their
    consensus (``consensus`` options, teachers weighted by ``weights``, e.g. their normalised
    validation mask AP)."""
    if len(names) != len(truth) or not names:
        raise DataError(f"pseudo_label_quality: {len(names)} slice names and {len(truth)} label maps")
    missing = [(t, n) for t, inst in teachers.items() for n in names if n not in inst]
    if missing:
        raise DataError(f"no saved instances of {missing[0][0]} for {len(missing)} slice(s), e.g. {missing[0][1]}")
    shape = tuple(truth[0].shape)
    masks = {t: {n: _masks(inst[n][0], shape) for n in names} for t, inst in teachers.items()}
    rows = []
    for teacher, inst in teachers.items():
        for threshold in (thresholds[teacher] if isinstance(thresholds, Mapping) else thresholds):
            maps = [annotations_to_label_map(resolve_overlaps(np.asarray(inst[n][1]), masks[teacher][n],
                                                              threshold=float(threshold), min_area=min_area), shape)
                    for n in names]
            rows.append({"rule": f"{teacher} >= {threshold:g}", **score_rule(maps, truth)})
    if len(teachers) >= 2:
        c = consensus or ConsensusOptions()
        w = [weights[t] for t in teachers]
        maps = []
        for n in names:
            scores, fused = consensus_instances([(np.asarray(inst[n][1]), masks[t][n]) for t, inst in teachers.items()],
                                                w, iou_threshold=c.iou_threshold, min_votes=c.min_votes,
                                                single_model_score=c.single_model_score, min_score=c.min_score)
            maps.append(annotations_to_label_map(resolve_overlaps(scores, fused, threshold=0.0, min_area=min_area),
                                                 shape))
        rows.append({"rule": f"consensus of {len(teachers)} ({c.min_votes} agree, or one >= {c.single_model_score:g})",
                     **score_rule(maps, truth)})
    return rows
