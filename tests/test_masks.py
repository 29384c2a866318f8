"""d2ct.utils.masks: the one mask IoU and the one RLE encoder, against pycocotools and brute force."""
from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest

from d2ct.utils.masks import encode_mask, encode_masks, iou_from_overlaps, mask_iou


def random_masks(rng, n, h, w):
    masks = np.zeros((n, h, w), bool)
    for k in range(n):
        if k % 4 == 3:
            continue  # some empty masks
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        masks[k, y:y + rng.integers(1, h - y), x:x + rng.integers(1, w - x)] = True
    return masks


def test_mask_iou_matches_brute_force_and_pycocotools():
    rng = np.random.default_rng(0)
    a, b = random_masks(rng, 7, 13, 21), random_masks(rng, 5, 13, 21)  # not square: axes matter
    iou = mask_iou(a, b)
    assert iou.shape == (7, 5)
    for i in range(7):
        for j in range(5):
            union = np.logical_or(a[i], b[j]).sum()
            expected = np.logical_and(a[i], b[j]).sum() / union if union else 0.0
            assert iou[i, j] == expected
    # pycocotools' own IoU of the RLEs (it gives 0 for two empty masks too)
    ref = mask_util.iou(encode_masks(a), encode_masks(b), [0] * 5)
    assert np.allclose(iou, ref)
    # any non-zero value is "in": uint8 255 masks give the same IoUs as bool
    assert np.array_equal(mask_iou(a.astype(np.uint8) * 255, b), iou)
    with pytest.raises(ValueError, match="differ in size"):
        mask_iou(a, b[:, :, :-1])


def test_iou_from_overlaps_empty_union_is_zero():
    iou = iou_from_overlaps(np.array([[0, 0]]), np.array([0]), np.array([0, 4]))
    assert iou.tolist() == [[0.0, 0.0]]
    assert iou_from_overlaps(np.array([[3]]), np.array([4]), np.array([5])).tolist() == [[0.5]]


def test_encode_masks_is_n_h_w_and_round_trips():
    rng = np.random.default_rng(1)
    masks = random_masks(rng, 6, 11, 17)
    rles = encode_masks(masks)
    assert [r["size"] for r in rles] == [[11, 17]] * 6 and all(isinstance(r["counts"], str) for r in rles)
    assert rles == [encode_mask(m) for m in masks]
    decoded = mask_util.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    assert np.array_equal(decoded.transpose(2, 0, 1), masks)
    # the layout d2ct.data.coco builds (a C-contiguous (N, W, H) stack seen as (N, H, W)) encodes the same
    khw_t = np.ascontiguousarray(masks.transpose(0, 2, 1))
    assert encode_masks(khw_t.transpose(0, 2, 1)) == rles
    assert encode_masks(masks.astype(np.uint8)) == rles
    assert encode_masks(np.zeros((0, 4, 5), bool)) == []
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        encode_masks(masks[0])
