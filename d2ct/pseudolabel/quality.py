"""How good pseudo-labels would be, measured where the truth is known.

The pool has no labels, so nothing says how many of its pseudo-labelled structures are real. The
same rules (one teacher above its score threshold, as in partition mode; the consensus of
several; or their fused ensemble above a fused-score threshold) are applied here to the teachers' saved instances on labelled validation slices and the
result scored against their truth: how many slices a rule keeps, how many of the structures it
writes match a real one (precision at IoU 0.5), and how many real structures of a kept slice it
misses, which the final model is then taught as background (1 - recall at IoU 0.5).

The truth may be partial (OpenKBP contours at most 7 organs per patient), so precision here is a
lower bound: a real but uncontoured organ counts as invented.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from d2ct.engine.predictor import InstancePrediction
from d2ct.errors import DataError
from d2ct.postprocess.flatten import instances_to_label_map

from .consensus import consensus_instances
from .ensemble import EnsembleOptions, ensemble_instances
from .run import ConsensusOptions, _structures, resolve_overlaps

# name -> (RLEs, scores) of one model, as d2ct.postprocess.submission.load_instances reads them
Instances = Mapping[str, tuple[list[dict], np.ndarray]]


def annotations_to_label_map(annotations: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """The label map a final model is trained on: the structures (not the ignore regions) of one
    pseudo-labelled slice, one id each."""
    structures = _structures(annotations)
    return instances_to_label_map([a["segmentation"] for a in structures], shape=shape)


def _score_slice(truth: np.ndarray, label_map: np.ndarray) -> dict | None:
    """A kept slice's scores against its truth; None for a slice the rule leaves out."""
    from d2ct.evaluation.metrics import score_image

    return score_image(truth, label_map) if label_map.any() else None


def _summarise(per_slice: Sequence[dict | None]) -> dict:
    scores = [s for s in per_slice if s is not None]
    n_pred = sum(s["n_pred"] for s in scores)
    n_true = sum(s["n_true"] for s in scores)
    tp = sum(s["tp50"] for s in scores)
    kept = len(scores)
    return {"slices": len(per_slice), "kept": kept, "structures": int(n_pred),
            "per_slice": n_pred / kept if kept else 0.0, "truth_per_slice": n_true / kept if kept else 0.0,
            "precision50": tp / n_pred if n_pred else None, "recall50": tp / n_true if n_true else None,
            "ARI": float(np.mean([s["ARI"] for s in scores])) if scores else None}


def pseudo_label_quality(teachers: Mapping[str, Instances], weights: Mapping[str, float], names: Sequence[str],
                         truth: Sequence[np.ndarray], thresholds: Sequence[float] | Mapping[str, Sequence[float]], *,
                         min_area: int = 5, consensus: ConsensusOptions | None = None,
                         ensemble: EnsembleOptions | None = None) -> list[dict]:
    """One row per rule: each teacher at each of ``thresholds`` (partition mode's rule for the
    slices it labels; a mapping gives each teacher its own) and, with two teachers or more, their
    consensus (``consensus`` options, teachers weighted by ``weights``, e.g. their normalised
    validation mask AP) and, when ``ensemble`` is given, their fused ensemble (ensemble mode's
    rule) at :func:`ensemble_thresholds`. Slices are decoded and scored one at a time, so memory
    does not grow with their number."""
    if len(names) != len(truth) or not names:
        raise DataError(f"pseudo_label_quality: {len(names)} slice names and {len(truth)} label maps")
    missing = [(t, n) for t, inst in teachers.items() for n in names if n not in inst]
    if missing:
        raise DataError(f"no saved instances of {missing[0][0]} for {len(missing)} slice(s), e.g. {missing[0][1]}")
    rules = [(t, float(th)) for t in teachers
             for th in (thresholds[t] if isinstance(thresholds, Mapping) else thresholds)]
    c = consensus or ConsensusOptions()
    with_consensus = len(teachers) >= 2
    ens_thresholds = (ensemble_thresholds(ensemble, thresholds, [weights[t] for t in teachers], list(teachers))
                      if ensemble is not None and with_consensus else [])
    per_rule: list[list[dict | None]] = [[] for _ in range(len(rules) + with_consensus + len(ens_thresholds))]
    first_ens = len(rules) + with_consensus
    for name, y in zip(names, truth):
        shape = tuple(y.shape)
        masks = {t: InstancePrediction(name, *shape, rles=inst[name][0]).masks() for t, inst in teachers.items()}
        scores = {t: np.asarray(inst[name][1]) for t, inst in teachers.items()}
        for i, (t, th) in enumerate(rules):
            anns = resolve_overlaps(scores[t], masks[t], threshold=th, min_area=min_area)
            per_rule[i].append(_score_slice(y, annotations_to_label_map(anns, shape)))
        if with_consensus:
            fused_scores, fused = consensus_instances(
                [(scores[t], masks[t]) for t in teachers], [weights[t] for t in teachers],
                iou_threshold=c.iou_threshold, min_votes=c.min_votes, single_model_score=c.single_model_score,
                min_score=c.min_score)
            anns = resolve_overlaps(fused_scores, fused, threshold=0.0, min_area=min_area)
            per_rule[len(rules)].append(_score_slice(y, annotations_to_label_map(anns, shape)))
        if ens_thresholds:
            fused_scores, fused, _ = ensemble_instances(
                [(scores[t], masks[t]) for t in teachers], [weights[t] for t in teachers],
                iou_threshold=ensemble.iou_threshold, vote=ensemble.vote, min_score=ensemble.min_score)
            for k, th in enumerate(ens_thresholds):
                anns = resolve_overlaps(fused_scores, fused, threshold=th, min_area=min_area)
                per_rule[first_ens + k].append(_score_slice(y, annotations_to_label_map(anns, shape)))
    rows = [{"rule": f"{t} >= {th:g}", **_summarise(per_rule[i])} for i, (t, th) in enumerate(rules)]
    if with_consensus:
        rows.append({"rule": f"consensus of {len(teachers)} ({c.min_votes} agree, or one >= {c.single_model_score:g})",
                     **_summarise(per_rule[len(rules)])})
    rows += [{"rule": f"ensemble of {len(teachers)} >= {th:.3g}", **_summarise(per_rule[first_ens + k])}
             for k, th in enumerate(ens_thresholds)]
    return rows


def ensemble_thresholds(ensemble: EnsembleOptions, thresholds: Sequence[float] | Mapping[str, Sequence[float]],
                        weights: Sequence[float], teachers: Sequence[str]) -> list[float]:
    """The fused-score thresholds the ensemble row(s) use: ``ensemble.threshold`` when set; else,
    when each teacher has one threshold, their weighted mean (as ensemble mode does); else every
    threshold of the grid, as each teacher gets."""
    if ensemble.threshold is not None:
        return [float(ensemble.threshold)]
    if isinstance(thresholds, Mapping):
        per_teacher = [list(thresholds[t]) for t in teachers]
        if all(len(v) == 1 for v in per_teacher):
            return [ensemble.resolved_threshold([v[0] for v in per_teacher], weights)]
        return sorted({float(th) for v in per_teacher for th in v})
    return [float(th) for th in thresholds]
