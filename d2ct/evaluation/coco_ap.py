"""Class-agnostic COCO mask AP with pycocotools (``COCOeval(iouType="segm")``).

Every structure is one instance of the single category ``structure``.  Ground truth comes from
label maps (each non-zero label value one instance) or from Detectron2-style annotation dicts
(RLE ``segmentation``); predictions from label maps (each label one instance with score 1, or
a score per label) or from instance masks with scores.

Returns Detectron2's key names on its 0-100 scale: ``AP, AP50, AP75, APs, APm, APl``; a value
pycocotools cannot compute (``-1``, e.g. no small ground-truth structure for ``APs``) becomes
``nan``.  With no prediction at all the APs are 0 (or ``nan`` where there is no ground truth).

Note on label-map predictions without scores: all instances tie at score 1, so COCOeval ranks
them in input order; with more than ``max_dets`` instances in an image only the first
``max_dets`` count.  Pass scores (or raise ``max_dets``) when that matters.
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from d2ct.utils.masks import encode_mask, encode_masks

__all__ = [
    "AP_KEYS",
    "label_map_to_rles",
    "coco_ap",
    "coco_ap_from_label_maps",
]

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def label_map_to_rles(label_map: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """(RLEs, label values) of the non-zero labels of a label map, in increasing label order."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label_map.shape}")
    values = np.unique(label_map)
    values = values[values != 0]
    rles = [encode_mask(label_map == v) for v in values]
    return rles, values


def _rle_area_bbox(rle: dict) -> tuple[float, list[float]]:
    r = dict(rle)
    if isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode("ascii")
    return float(mask_utils.area(r)), [float(x) for x in mask_utils.toBbox(r)]


def coco_ap(
    gt: Sequence[Sequence[dict]],
    predictions: Sequence[Sequence[tuple[dict, float]]],
    image_shapes: Sequence[tuple[int, int]],
    *,
    max_dets: int = 100,
    return_eval: bool = False,
):
    """Class-agnostic mask AP.

    gt: per image, a list of RLE dicts (one per true instance).
    predictions: per image, a list of ``(rle, score)``.
    image_shapes: per image, (H, W).
    Returns ``{AP, AP50, AP75, APs, APm, APl}`` (0-100, ``nan`` where undefined); with
    ``return_eval`` also the ``COCOeval`` object (``None`` when nothing was evaluated).
    """
    if not (len(gt) == len(predictions) == len(image_shapes)):
        raise ValueError(
            f"gt ({len(gt)}), predictions ({len(predictions)}) and image_shapes ({len(image_shapes)}) differ in length"
        )
    images, anns, results = [], [], []
    for i, ((h, w), g, pr) in enumerate(zip(image_shapes, gt, predictions)):
        images.append({"id": i, "height": int(h), "width": int(w)})
        for rle in g:
            area, bbox = _rle_area_bbox(rle)
            anns.append(
                {"id": len(anns) + 1, "image_id": i, "category_id": 1, "segmentation": rle,
                 "area": area, "bbox": bbox, "iscrowd": 0}
            )
        for rle, score in pr:
            results.append({"image_id": i, "category_id": 1, "segmentation": rle, "score": float(score)})
    nan = float("nan")
    if not anns:
        out = {k: nan for k in AP_KEYS}
        return (out, None) if return_eval else out
    if not results:
        out = {k: 0.0 for k in AP_KEYS}
        areas = np.array([a["area"] for a in anns])
        rng_ok = {"APs": (areas < 32**2).any(), "APm": ((areas >= 32**2) & (areas < 96**2)).any(), "APl": (areas >= 96**2).any()}
        out.update({k: (0.0 if ok else nan) for k, ok in rng_ok.items()})
        return (out, None) if return_eval else out
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "structure"}]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.params.maxDets = [1, 10, int(max_dets)]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {k: (float(v) * 100.0 if v >= 0 else nan) for k, v in zip(AP_KEYS, ev.stats[:6])}
    return (out, ev) if return_eval else out


def coco_ap_from_label_maps(
    true_maps: Iterable[np.ndarray],
    pred_maps: Iterable[np.ndarray] | None = None,
    *,
    pred_scores: Sequence[Mapping[int, float]] | None = None,
    pred_instances: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    max_dets: int = 100,
) -> dict:
    """Class-agnostic mask AP between true label maps and either predicted label maps
    (each label one instance; score 1, or ``pred_scores[i][label]``) or ``pred_instances``
    (per image ``(masks (N, H, W) bool, scores (N,))``)."""
    true_maps = list(true_maps)
    if (pred_maps is None) == (pred_instances is None):
        raise ValueError("give exactly one of pred_maps and pred_instances")
    gt, preds, shapes = [], [], []
    if pred_maps is not None:
        pred_maps = list(pred_maps)
        if len(pred_maps) != len(true_maps):
            raise ValueError(f"{len(true_maps)} true maps but {len(pred_maps)} predicted maps")
        for i, (t, p) in enumerate(zip(true_maps, pred_maps)):
            t, p = np.asarray(t), np.asarray(p)
            if t.shape != p.shape:
                raise ValueError(f"image {i}: true shape {t.shape} differs from predicted shape {p.shape}")
            g, _ = label_map_to_rles(t)
            rles, values = label_map_to_rles(p)
            scores = pred_scores[i] if pred_scores is not None else {}
            preds.append([(r, float(scores.get(int(v), 1.0))) for r, v in zip(rles, values)])
            gt.append(g)
            shapes.append(t.shape)
    else:
        if len(pred_instances) != len(true_maps):
            raise ValueError(f"{len(true_maps)} true maps but {len(pred_instances)} instance predictions")
        for i, (t, (masks, scores)) in enumerate(zip(true_maps, pred_instances)):
            t = np.asarray(t)
            masks = np.asarray(masks)
            if len(masks) and masks.shape[1:] != t.shape:
                raise ValueError(f"image {i}: true shape {t.shape} differs from mask shape {masks.shape[1:]}")
            g, _ = label_map_to_rles(t)
            gt.append(g)
            preds.append(list(zip(encode_masks(masks.reshape(-1, *t.shape)), np.asarray(scores, dtype=float))))
            shapes.append(t.shape)
    return coco_ap(gt, preds, shapes, max_dets=max_dets)
