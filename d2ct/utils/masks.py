"""Binary masks: IoU and COCO RLE encoding, in one place (used by data, evaluation, engine and
pseudolabel alike).

Stacks of masks are ``(N, H, W)`` throughout, as Detectron2 and numpy lay them out.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_util

__all__ = ["iou_from_overlaps", "mask_iou", "encode_mask", "encode_masks"]


def iou_from_overlaps(inter, area_a, area_b) -> np.ndarray:
    """IoU matrix (n, m) from the intersections ``inter`` (n, m) of n masks with m masks and their
    areas (n,) and (m,); 0 where both masks are empty."""
    inter = np.asarray(inter, dtype=np.float64)
    union = np.asarray(area_a, dtype=np.float64)[:, None] + np.asarray(area_b, dtype=np.float64)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (N, M) between two stacks of binary masks (N, H, W) and (M, H, W) (non-zero = in)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"mask stacks differ in size: {a.shape} vs {b.shape}")
    # float32 counts are exact up to 2**24 pixels per mask; the product gives every intersection
    a2 = (a if a.dtype == bool else a != 0).reshape(len(a), -1).astype(np.float32)
    b2 = (b if b.dtype == bool else b != 0).reshape(len(b), -1).astype(np.float32)
    return iou_from_overlaps(a2 @ b2.T, a2.sum(1), b2.sum(1))


def encode_mask(mask: np.ndarray) -> dict:
    """RLE of one binary (H, W) mask, counts as str (JSON-friendly, what Detectron2 stores)."""
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def encode_masks(masks: np.ndarray) -> list[dict]:
    """RLEs (counts as str) of an (N, H, W) stack of binary masks, with one pycocotools call.

    pycocotools encodes an (H, W, N) Fortran-ordered uint8 array. A bool/uint8 stack laid out as its
    transpose, e.g. ``stack.transpose(0, 2, 1)`` of a C-contiguous (N, W, H) array, is encoded
    without a copy (d2ct.data.coco builds its stacks so)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if len(masks) == 0:
        return []
    masks = masks.view(np.uint8) if masks.dtype == bool else masks.astype(np.uint8, copy=False)
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
