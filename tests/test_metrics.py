"""ARI (both variants), class-agnostic Dice matching and COCO mask AP on label maps."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import adjusted_rand_score

from d2ct.evaluation.ari import (
    adjusted_rand_index,
    ari_from_contingency,
    ari_per_image,
    contingency_table,
    mean_ari,
    pair_counts,
)
from d2ct.evaluation.coco_ap import coco_ap_from_label_maps, label_map_to_rles
from d2ct.utils.masks import encode_masks
from d2ct.evaluation.dice import dice_per_image, match_structures
from sklearn.metrics.cluster import pair_confusion_matrix


def sk_ari(t, p):
    return adjusted_rand_score(np.asarray(t).ravel(), np.asarray(p).ravel())


def sk_ari_fg(t, p):
    t = np.asarray(t).ravel()
    p = np.asarray(p).ravel()
    keep = t != 0
    return adjusted_rand_score(t[keep], p[keep])


# ----------------------------------------------------------------------------------------- ARI
def _blobs(rng, shape, k):
    """A label map of k rectangles on background, like a CT label map."""
    m = np.zeros(shape, np.uint8)
    for v in range(1, k + 1):
        r0, c0 = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        m[r0 : r0 + rng.integers(1, shape[0] // 2 + 2), c0 : c0 + rng.integers(1, shape[1] // 2 + 2)] = v
    return m


def test_ari_matches_sklearn_random_maps():
    rng = np.random.default_rng(0)
    for i in range(150):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        if i % 2:
            t = rng.integers(0, rng.integers(1, 8), shape).astype(np.uint8)
            p = rng.integers(0, rng.integers(1, 8), shape).astype(np.uint8)
        else:
            t, p = _blobs(rng, shape, int(rng.integers(0, 6))), _blobs(rng, shape, int(rng.integers(0, 9)))
        assert adjusted_rand_index(t, p) == pytest.approx(sk_ari(t, p), abs=1e-12)
        fg = adjusted_rand_index(t, p, exclude_background=True)
        if (t != 0).any():
            assert fg == pytest.approx(sk_ari_fg(t, p), abs=1e-12)
        else:
            assert math.isnan(fg)


@pytest.mark.parametrize(
    "case",
    ["all_background", "one_structure", "pred_empty", "permuted_ids", "single_pixel", "pred_split",
     "both_one_cluster_nonzero", "disagree", "full_range_labels"],
)
def test_ari_edge_cases_match_sklearn(case):
    rng = np.random.default_rng(1)
    t = np.zeros((16, 16), np.uint8)
    p = np.zeros((16, 16), np.uint8)
    if case == "one_structure":
        t[4:9, 4:9] = 3
        p[4:10, 3:9] = 1
    elif case == "pred_empty":
        t[2:5, 2:5] = 1
        t[10:14, 10:15] = 2
    elif case == "permuted_ids":
        t = _blobs(rng, (16, 16), 5)
        perm = np.arange(256, dtype=np.uint8)
        perm[1:6] = [4, 9, 200, 1, 17]
        p = perm[t]
        assert adjusted_rand_index(t, p) == 1.0
    elif case == "single_pixel":
        t = np.array([[5]], np.uint8)
        p = np.array([[0]], np.uint8)
    elif case == "pred_split":
        t[:, :8] = 1
        p = np.arange(256).reshape(16, 16).astype(np.uint8)
    elif case == "both_one_cluster_nonzero":
        t[:] = 7
        p[:] = 3
    elif case == "disagree":
        t[:, 8:] = 1
        p[8:, :] = 1
    elif case == "full_range_labels":
        t = np.arange(256, dtype=np.uint8).reshape(16, 16)
        p = t[::-1].copy()
    ours = adjusted_rand_index(t, p)
    assert ours == sk_ari(t, p)  # bit-for-bit: same integer sums, same formula
    if (t != 0).any():
        assert adjusted_rand_index(t, p, exclude_background=True) == pytest.approx(sk_ari_fg(t, p), abs=1e-12)


def test_ari_special_values():
    z = np.zeros((8, 8), np.uint8)
    assert adjusted_rand_index(z, z) == 1.0  # both one cluster
    t = z.copy()
    t[2:4, 2:4] = 1
    assert adjusted_rand_index(t, z) == 0.0  # prediction one cluster, truth two
    assert math.isnan(adjusted_rand_index(z, t, exclude_background=True))  # no foreground truth
    # truth foreground is one structure, prediction splits it -> 0 ; keeps it whole -> 1
    assert adjusted_rand_index(t, z, exclude_background=True) == 1.0
    p = t.copy()
    p[2, 2] = 9
    assert adjusted_rand_index(t, p, exclude_background=True) == 0.0


def test_ari_non_uint8_labels_and_pair_counts():
    rng = np.random.default_rng(2)
    t = rng.integers(-3, 400, (20, 20))
    p = rng.integers(0, 5, (20, 20)) * 1000
    assert adjusted_rand_index(t, p) == pytest.approx(sk_ari(t, p), abs=1e-12)
    assert adjusted_rand_index(t, p, exclude_background=True) == pytest.approx(sk_ari_fg(t, p), abs=1e-12)
    t8 = rng.integers(0, 6, (20, 20)).astype(np.uint8)
    p8 = rng.integers(0, 6, (20, 20)).astype(np.uint8)
    (tn, fp), (fn, tp) = pair_confusion_matrix(t8.ravel(), p8.ravel())
    assert pair_counts(contingency_table(t8, p8)) == (tn, fp, fn, tp)
    with pytest.raises(ValueError, match="shape"):
        adjusted_rand_index(t8, p8[:3])


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.uint8, (7, 9), elements=st.integers(0, 4)),
    arrays(np.uint8, (7, 9), elements=st.sampled_from([0, 1, 2, 255])),
)
def test_ari_property_matches_sklearn(t, p):
    assert adjusted_rand_index(t, p) == pytest.approx(sk_ari(t, p), abs=1e-12)
    assert ari_from_contingency(contingency_table(p, t)) == pytest.approx(sk_ari(p, t), abs=1e-12)


def test_ari_per_image_and_mean():
    rng = np.random.default_rng(3)
    T = np.stack([_blobs(rng, (24, 24), 3) for _ in range(6)])
    P = np.stack([_blobs(rng, (24, 24), 4) for _ in range(6)])
    T[0] = 0  # no foreground: ARI_fg undefined, skipped in the mean
    scores = ari_per_image(T, P)
    ref = [sk_ari(t, p) for t, p in zip(T, P)]
    np.testing.assert_allclose(scores, ref, atol=1e-12)
    fg = ari_per_image(T.reshape(6, -1), P.reshape(6, -1), exclude_background=True)
    assert math.isnan(fg[0])
    assert mean_ari(fg) == pytest.approx(np.mean([sk_ari_fg(t, p) for t, p in zip(T[1:], P[1:])]), abs=1e-12)
    assert math.isnan(mean_ari([float("nan")]))


# ---------------------------------------------------------------------------------------- Dice
def _brute_force_match(t, p):
    """Reference: best one-to-one assignment by exhaustive search over permutations (small cases)."""
    tl = [v for v in np.unique(t) if v]
    pl = [v for v in np.unique(p) if v]
    iou = np.zeros((len(tl), len(pl)))
    dice = np.zeros_like(iou)
    for i, a in enumerate(tl):
        for j, b in enumerate(pl):
            inter = np.sum((t == a) & (p == b))
            union = np.sum((t == a) | (p == b))
            iou[i, j] = inter / union
            dice[i, j] = 2 * inter / (np.sum(t == a) + np.sum(p == b))
    best, best_dice = -1.0, 0.0
    n = max(len(tl), len(pl))
    for perm in itertools.permutations(range(n), len(tl)) if len(tl) <= len(pl) else [None]:
        if perm is None:
            break
        pairs = [(i, j) for i, j in enumerate(perm) if j < len(pl)]
        s = sum(iou[i, j] for i, j in pairs)
        if s > best + 1e-12:
            best, best_dice = s, sum(dice[i, j] for i, j in pairs if iou[i, j] > 0)
    return best, best_dice / len(tl) if tl else float("nan")


def test_dice_matches_brute_force():
    rng = np.random.default_rng(4)
    for _ in range(40):
        t = _blobs(rng, (20, 20), int(rng.integers(1, 4)))
        p = _blobs(rng, (20, 20), int(rng.integers(3, 5)))
        res = match_structures(t, p)
        best_iou_sum, best_dice = _brute_force_match(t, p)
        if len(res.true_labels) <= len(res.pred_labels):
            assert res.pair_iou.sum() == pytest.approx(best_iou_sum, abs=1e-12)
            assert res.dice == pytest.approx(best_dice, abs=1e-12)


def test_dice_known_values():
    t = np.zeros((10, 10), np.uint8)
    t[0:4, 0:4] = 2  # 16 px
    t[6:10, 6:10] = 5  # 16 px
    p = np.zeros_like(t)
    p[0:4, 0:2] = 1  # half of structure 2: IoU 0.5, Dice 2/3
    p[8:10, 0:2] = 3  # extra prediction, matches nothing
    r = dice_per_image(t, p)
    assert r["Dice"] == pytest.approx((2 / 3) / 2)  # second true structure unmatched -> 0
    assert r["Dice_all"] == pytest.approx((2 / 3) / 3)  # and the extra prediction counts too
    assert r["Recall50"] == 0.5 and r["Precision50"] == 0.5 and r["tp50"] == 1
    assert (r["n_true"], r["n_pred"]) == (2, 2)
    # identical up to renaming -> perfect; empty prediction -> 0 Dice, precision undefined
    perm = np.zeros(256, np.uint8)
    perm[[2, 5]] = [9, 1]
    assert dice_per_image(t, perm[t]) | {} == {"Dice": 1.0, "Dice_all": 1.0, "Recall50": 1.0, "Precision50": 1.0,
                                               "n_true": 2, "n_pred": 2, "tp50": 2}
    e = dice_per_image(t, np.zeros_like(t))
    assert e["Dice"] == 0.0 and e["Recall50"] == 0.0 and math.isnan(e["Precision50"])
    assert math.isnan(dice_per_image(np.zeros_like(t), p)["Dice"])


def test_dice_hungarian_beats_greedy():
    # greedy by best IoU would pair true A with pred X and leave B unmatched; Hungarian pairs both
    t = np.zeros((1, 12), np.uint8)
    t[0, 0:6] = 1
    t[0, 6:12] = 2
    p = np.zeros_like(t)
    p[0, 0:9] = 1  # overlaps A (6) and B (3)
    p[0, 9:12] = 2  # overlaps B only
    res = match_structures(t, p)
    assert res.n_matched == 2
    assert {tuple(x) for x in res.pairs} == {(0, 0), (1, 1)}


# ------------------------------------------------------------------------------------- COCO AP
def test_coco_ap_perfect_partial_and_empty():
    t = np.zeros((64, 64), np.uint8)
    t[2:12, 2:12] = 4
    t[20:60, 20:60] = 1  # 1600 px: medium
    assert coco_ap_from_label_maps([t], [t])["AP"] == pytest.approx(100.0)
    assert coco_ap_from_label_maps([t], [t])["APl"] != coco_ap_from_label_maps([t], [t])["APl"]  # nan: no large
    p = t.copy()
    p[t == 1] = 0
    half = coco_ap_from_label_maps([t], [p])
    assert 0 < half["AP"] < 100 and half["APs"] == pytest.approx(100.0) and half["APm"] == 0.0
    none = coco_ap_from_label_maps([t], [np.zeros_like(t)])
    assert none["AP"] == 0.0
    # instances with scores: the wrong, high-scoring mask ranks first and lowers AP
    good = np.stack([t == 4, t == 1])
    wrong = np.zeros((1, 64, 64), bool)
    wrong[0, 40:50, 0:10] = True
    ap_hi = coco_ap_from_label_maps([t], pred_instances=[(np.concatenate([good, wrong]), np.array([0.9, 0.9, 0.1]))])
    ap_lo = coco_ap_from_label_maps([t], pred_instances=[(np.concatenate([good, wrong]), np.array([0.5, 0.5, 0.99]))])
    assert ap_hi["AP"] == pytest.approx(100.0) and ap_lo["AP"] < ap_hi["AP"]
    with pytest.raises(ValueError, match="shape"):
        coco_ap_from_label_maps([t], [t[:10]])


def test_rle_helpers_roundtrip():
    from pycocotools import mask as mask_utils

    t = np.zeros((9, 7), np.uint8)
    t[1:3, 1:5] = 8
    t[5:9, 2] = 3
    rles, values = label_map_to_rles(t)
    assert list(values) == [3, 8]
    for r, v in zip(rles, values):
        assert isinstance(r["counts"], str)
        dec = mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()})
        np.testing.assert_array_equal(dec, t == v)
    assert len(encode_masks(np.zeros((0, 9, 7), bool))) == 0
