"""Instances (masks + scores) -> one label map per slice.

The challenge wants one label map per image: 0 = background, each structure its own number. Mask R-CNN
predicts overlapping instance masks; :func:`instances_to_label_map` flattens them so that the
higher-scoring instance wins every overlapping pixel (adding ids together would invent structures),
drops instances below a score threshold (with a top-k fallback so a prediction is never empty when the
model saw something) and skips instances left with too few pixels of their own.

It is also the inverse of :func:`d2ct.data.coco.label_map_to_instances`: passing
``labels=[a["label_value"] for a in instances]`` rebuilds the original label map exactly.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import numpy as np
import pycocotools.mask as mask_util

from d2ct.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["MAX_INSTANCES", "instances_to_label_map", "instances_from_detectron2"]

MAX_INSTANCES = 255  # a uint8 label map holds ids 1..255


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor on any device
        return x.detach().cpu().numpy()
    return np.asarray(x)


class _MaskSource:
    """Per-instance access to the masks, cropped to each mask's bounding box: the flattening loop
    then touches only the pixels near each instance instead of whole images."""

    def __init__(self, masks: Any, shape: tuple[int, int] | None):
        self.rles: list[dict] | None = None
        self.arr: np.ndarray | None = None
        if hasattr(masks, "tensor") and not hasattr(masks, "detach"):  # detectron2 BitMasks
            masks = masks.tensor
        if isinstance(masks, (list, tuple)) and (len(masks) == 0 or isinstance(masks[0], dict)):
            self._init_rles(list(masks), shape)
            return
        arr = _to_numpy(masks)
        if arr.ndim != 3:
            raise DataError(f"instances_to_label_map: masks must be (N, H, W), got shape {arr.shape}")
        if shape is not None and tuple(arr.shape[1:]) != tuple(shape):
            raise DataError(f"instances_to_label_map: masks are {arr.shape[1:]} but shape={tuple(shape)}")
        if arr.dtype != bool:
            arr = arr >= 0.5 if arr.dtype.kind == "f" else arr != 0  # float: soft masks (probabilities)
        self.arr = arr
        self.n, self.shape = arr.shape[0], (int(arr.shape[1]), int(arr.shape[2]))

    def _init_rles(self, masks: list, shape) -> None:
        if not masks:
            if shape is None:
                raise DataError("instances_to_label_map: no masks and no shape= to size the label map")
            self.rles, self.n, self.shape = [], 0, (int(shape[0]), int(shape[1]))
            return
        rles = []
        for i, rle in enumerate(masks):
            if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
                raise DataError(f"instances_to_label_map: mask {i} is not an RLE dict with size and counts")
            if isinstance(rle["counts"], list):
                rle = mask_util.frPyObjects(rle, *rle["size"])
            elif isinstance(rle["counts"], str):
                rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            rles.append(rle)
        sizes = {tuple(int(v) for v in r["size"]) for r in rles}
        if len(sizes) != 1:
            raise DataError(f"instances_to_label_map: RLE masks of different sizes {sorted(sizes)}")
        size = sizes.pop()
        if shape is not None and tuple(shape) != size:
            raise DataError(f"instances_to_label_map: RLE size {size} differs from shape={tuple(shape)}")
        self.rles, self.n, self.shape = rles, len(rles), size
        self.boxes = mask_util.toBbox(rles).astype(np.int64)  # x, y, w, h

    def crop(self, i: int):
        """(box slices, bool mask inside the box) of instance i, or None when it is empty."""
        if self.arr is not None:
            m = self.arr[i]
            rows = np.flatnonzero(m.any(axis=1))
            if rows.size == 0:
                return None
            r0, r1 = rows[0], rows[-1] + 1
            cols = np.flatnonzero(m[r0:r1].any(axis=0))
            box = (slice(r0, r1), slice(cols[0], cols[-1] + 1))
            return box, m[box]
        x, y, w, h = self.boxes[i]
        if w == 0 or h == 0:
            return None
        with warnings.catch_warnings():  # pycocotools' Cython __array__ predates numpy 2's copy keyword
            warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
            m = mask_util.decode(self.rles[i])
        box = (slice(y, y + h), slice(x, x + w))
        return box, m[box].view(bool)


def instances_to_label_map(
    masks: Any,
    scores: Any = None,
    *,
    shape: tuple[int, int] | None = None,
    labels: Sequence[int] | None = None,
    score_threshold: float = 0.0,
    min_area: int = 0,
    fallback_top_k: int = 0,
) -> np.ndarray:
    """Flatten instance masks into one uint8 (H, W) label map (0 = background).

    ``masks``: (N, H, W) bool/uint8 (float: >= 0.5) numpy array or torch tensor, detectron2 BitMasks, or
    a list of RLE dicts (``shape`` then comes from their ``size``; pass ``shape`` for an empty list).
    Instances are taken in descending ``scores`` order (stable: equal scores, or ``scores=None``, keep
    the input order); each claims only pixels no earlier instance claimed, so the higher score wins an
    overlap. An instance whose claimable area is below ``min_area`` (or zero) is skipped and leaves its
    pixels to lower-scored instances. Output ids are 1..K in descending score order, or ``labels[i]``
    (1..255; repeats allowed, e.g. components of one structure) when given. Instances with a score
    below ``score_threshold`` are dropped, except that when none passes and ``fallback_top_k`` > 0 the
    ``fallback_top_k`` best are used (with ``scores=None`` nothing is dropped). Without ``labels``, at most 255 instances get an id: the rest
    (the lowest scored) are dropped with a warning."""
    source = _MaskSource(masks, shape)
    n = source.n
    out = np.zeros(source.shape, dtype=np.uint8)

    if scores is None:
        score_arr = None
    else:
        score_arr = _to_numpy(scores).astype(np.float64).reshape(-1)
        if score_arr.shape[0] != n:
            raise DataError(f"instances_to_label_map: {n} masks but {score_arr.shape[0]} scores")
        if np.isnan(score_arr).any():
            raise DataError("instances_to_label_map: scores contain NaN")
    if labels is not None:
        label_arr = np.asarray(labels).reshape(-1)
        if label_arr.shape[0] != n:
            raise DataError(f"instances_to_label_map: {n} masks but {label_arr.shape[0]} labels")
        if n and (label_arr.dtype.kind not in "iu" or label_arr.min() < 1 or label_arr.max() > 255):
            raise DataError("instances_to_label_map: labels must be integers 1..255 (0 is background)")
        label_arr = label_arr.astype(np.uint8)
    if n == 0:
        return out

    if score_arr is None:
        order = np.arange(n)
    else:
        order = np.argsort(-score_arr, kind="stable")
        passing = order[score_arr[order] >= score_threshold]
        if passing.size == 0 and fallback_top_k > 0:
            passing = order[: int(fallback_top_k)]
        order = passing

    free = np.ones(source.shape, dtype=bool)
    next_id = 0
    dropped = 0
    for i in order.tolist():
        cropped = source.crop(i)
        if cropped is None:
            continue
        box, m = cropped
        claim = m & free[box]
        area = int(np.count_nonzero(claim))
        if area == 0 or area < min_area:
            continue
        if labels is None:
            if next_id == MAX_INSTANCES:
                dropped += 1
                continue
            next_id += 1
            value = next_id
        else:
            value = label_arr[i]
        out[box][claim] = value
        free[box][claim] = False
    if dropped:
        logger.warning(
            "instances_to_label_map: %d instances kept, %d more dropped (a uint8 label map holds 255 ids)",
            MAX_INSTANCES,
            dropped,
        )
    return out


def instances_from_detectron2(instances: Any) -> tuple[np.ndarray, np.ndarray]:
    """detectron2 ``Instances`` (``pred_masks``, ``scores``) on any device -> (masks (N, H, W) bool,
    scores (N,) float32) numpy arrays. Missing ``scores`` count as 1.0."""
    if not hasattr(instances, "has") or not instances.has("pred_masks"):
        raise DataError("instances_from_detectron2: the Instances have no pred_masks (is MODEL.MASK_ON set?)")
    masks = instances.pred_masks
    if hasattr(masks, "tensor") and not hasattr(masks, "detach"):  # BitMasks
        masks = masks.tensor
    masks = _to_numpy(masks)
    if masks.ndim == 2 and len(instances) == 0:
        masks = masks.reshape(0, *instances.image_size)
    if masks.dtype != bool:
        masks = masks >= 0.5 if masks.dtype.kind == "f" else masks != 0
    if instances.has("scores"):
        scores = _to_numpy(instances.scores).astype(np.float32).reshape(-1)
    else:
        scores = np.ones(masks.shape[0], dtype=np.float32)
    return masks, scores
