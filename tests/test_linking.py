"""Linking per-slice label maps into 3-D structures: hand-made cases and the 3-D phantom."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from d2ct.errors import ConfigError, DataError
from d2ct.postprocess.linking import LinkOptions, link_slices

H = W = 40


def disk(cy, cx, r):
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def box(r0, r1, c0, c1):
    m = np.zeros((H, W), bool)
    m[r0:r1, c0:c1] = True
    return m


def stack(slices):
    """slices: list of [(mask, label), ...] per slice -> (Z, H, W) uint8."""
    out = np.zeros((len(slices), H, W), np.uint8)
    for z, items in enumerate(slices):
        for m, lab in items:
            out[z][m] = lab
    return out


def scramble(truth, seed=0):
    """Renumber every slice's labels with a random permutation (what a 2-D model does)."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(truth)
    for z in range(truth.shape[0]):
        perm = np.zeros(256, np.uint8)
        perm[1:] = rng.permutation(255) + 1
        out[z] = perm[truth[z]]
    return out


def same_partition(a, b):
    return adjusted_rand_score(a.ravel(), b.ravel()) == 1.0


OPTS = LinkOptions(min_slices=1)


def test_shifting_structure_and_static_one_keep_one_label_each():
    # a disk moving 2 px per slice, a box that stays; labels scrambled per slice
    truth = stack([[(disk(12, 8 + 2 * z, 5), 1), (box(28, 36, 5, 35), 2)] for z in range(10)])
    res = link_slices(scramble(truth), OPTS)
    assert same_partition(truth, res.labels)
    assert [s.label for s in res.structures] == [1, 2]
    # numbered largest first: the box (8 x 30 x 10 voxels) is 1
    assert (res.labels[:, 30, 20] == 1).all() and res.structures[0].voxels == 8 * 30 * 10
    assert {(s.z_first, s.z_last, s.n_slices) for s in res.structures} == {(0, 9, 10)}


def test_structure_missing_on_one_slice_keeps_its_identity_within_max_gap():
    slices = [[(disk(20, 20, 6), 1), (box(2, 6, 2, 38), 2)] for _ in range(7)]
    slices[3] = [(box(2, 6, 2, 38), 2)]  # the disk is not detected on slice 3
    truth = stack(slices)
    res = link_slices(scramble(truth, 1), OPTS)
    assert same_partition(truth, res.labels)
    disk_label = res.labels[0, 20, 20]
    assert res.labels[6, 20, 20] == disk_label
    s = next(s for s in res.structures if s.label == disk_label)
    assert (s.z_first, s.z_last, s.n_slices) == (0, 6, 6)
    assert res.stats["matched_across_gap"] == 1
    # without gaps allowed it becomes two structures
    res0 = link_slices(scramble(truth, 1), LinkOptions(min_slices=1, max_gap=0))
    assert len(res0.structures) == 3 and res0.labels[0, 20, 20] != res0.labels[6, 20, 20]
    # a two-slice gap is too long for max_gap=1
    slices[4] = [(box(2, 6, 2, 38), 2)]
    res2 = link_slices(scramble(stack(slices), 2), OPTS)
    assert res2.labels[0, 20, 20] != res2.labels[6, 20, 20]


def test_two_structures_that_merge_rule():
    # two tubes (Y shape): separate on slices 0-3, one instance from slice 4 up; the left one is larger
    sep = [[(disk(20, 11, 6), 1), (disk(20, 30, 4), 2)] for _ in range(4)]
    merged = [[(disk(20, 11, 6) | disk(20, 30, 4) | box(17, 23, 11, 30), 3)] for _ in range(4)]
    truth = stack(sep + merged)
    res = link_slices(scramble(truth, 3), OPTS)
    big, small = res.labels[0, 20, 11], res.labels[0, 20, 30]
    assert big != small
    # stated rule: the merged instance continues the predecessor it overlaps most (IoU); the other ends
    assert (res.labels[4:, 20, 20] == big).all() and (res.labels[4:, 20, 30] == big).all()
    s_small = next(s for s in res.structures if s.label == small)
    assert (s_small.z_first, s_small.z_last) == (0, 3)
    assert len(res.structures) == 2


def test_touching_structures_take_their_identity_back_after_a_one_slice_merge():
    a, b = disk(20, 12, 6), disk(20, 28, 6)
    slices = [[(a, 1), (b, 2)] for _ in range(3)] + [[(a | b | box(17, 23, 12, 28), 1)]] + \
             [[(a, 1), (b, 2)] for _ in range(3)]
    res = link_slices(scramble(stack(slices), 4), OPTS)
    assert res.labels[0, 20, 12] == res.labels[6, 20, 12]
    assert res.labels[0, 20, 28] == res.labels[6, 20, 28]
    assert res.labels[0, 20, 12] != res.labels[0, 20, 28]
    assert len(res.structures) == 2


def test_split_pieces_join_but_an_enclosed_new_structure_does_not():
    whole = box(10, 30, 5, 35)
    left, right = box(10, 30, 5, 18), box(10, 30, 22, 35)
    slices = [[(whole, 1)] for _ in range(3)] + [[(left, 1), (right, 2)] for _ in range(3)]
    res = link_slices(scramble(stack(slices), 5), OPTS)
    assert len(res.structures) == 1 and res.structures[0].n_splits == 3
    assert res.labels[5, 20, 10] == res.labels[5, 20, 30] == res.labels[0, 20, 20]
    # with joining off, the smaller piece starts a structure of its own
    res_off = link_slices(scramble(stack(slices), 5), LinkOptions(min_slices=1, split_overlap=0.0))
    assert len(res_off.structures) == 2
    # a lesion appearing inside an organ (enclosed) is its own structure
    lesion = disk(20, 20, 4)
    slices = [[(whole, 1)] for _ in range(3)] + [[(whole & ~lesion, 1), (lesion, 2)] for _ in range(3)]
    truth = stack(slices)
    res = link_slices(scramble(truth, 6), OPTS)
    assert same_partition(truth, res.labels) and len(res.structures) == 2


def test_shrinking_tip_continues_by_containment():
    # a large organ whose last slices are a small tip inside its footprint (IoU < min_iou)
    slices = [[(disk(20, 20, 14), 1)] for _ in range(4)] + [[(disk(22, 22, 3), 1)]]
    truth = stack(slices)
    res = link_slices(scramble(truth, 7), OPTS)
    assert len(res.structures) == 1 and res.stats["continued_by_containment"] == 1


def test_speckle_dropped_and_volume_in_ml():
    slices = [[(disk(20, 20, 8), 1)] for _ in range(5)]
    slices[2].append((box(2, 4, 2, 4), 2))  # 4 voxels on one slice
    truth = stack(slices)
    res = link_slices(truth, LinkOptions(min_slices=2), spacing=(2.0, 0.5, 0.5))
    assert len(res.structures) == 1 and res.n_dropped == 1 and res.dropped_voxels == 4
    assert res.labels[2, 3, 3] == 0
    vox = int((truth == 1).sum())
    assert res.structures[0].volume_ml == pytest.approx(vox * 0.5 / 1000)
    # minimum volume (voxels of 0.5 mm^3): just below the disk's keeps it and drops the 4-voxel box
    res = link_slices(truth, LinkOptions(min_slices=1, min_volume_ml=vox * 0.5 / 1000 - 1e-6), spacing=(2.0, 0.5, 0.5))
    assert len(res.structures) == 1 and res.structures[0].voxels == vox
    res = link_slices(truth, LinkOptions(min_slices=1, min_volume_ml=vox * 0.5 / 1000 + 1e-6), spacing=(2.0, 0.5, 0.5))
    assert res.structures == [] and res.n_dropped == 2
    res = link_slices(truth, LinkOptions(min_slices=1, min_voxels=5))
    assert len(res.structures) == 1 and res.structures[0].voxels == vox
    # a one-slice volume keeps its structures although min_slices is 2
    assert len(link_slices(truth[:1], LinkOptions(min_slices=2)).structures) == 1


def test_order_top_to_bottom_and_scores():
    # big structure low in the volume, small one high
    slices = [[(disk(20, 20, 10), 1)] for _ in range(3)] + [[(disk(5, 5, 3), 1)] for _ in range(3)]
    truth = stack(slices)
    res = link_slices(truth, LinkOptions(min_slices=1, order="superior"))
    assert res.labels[5, 5, 5] == 1 and res.labels[0, 20, 20] == 2
    res = link_slices(truth, LinkOptions(min_slices=1, order="volume"))
    assert res.labels[0, 20, 20] == 1
    scores = [{1: 0.9}] * 3 + [{1: 0.5}] * 3
    res = link_slices(truth, OPTS, scores=scores)
    assert res.structures[0].mean_score == pytest.approx(0.9)
    assert res.structures[1].mean_score == pytest.approx(0.5)


def test_bad_input_and_options():
    with pytest.raises(DataError, match="Z, H, W"):
        link_slices(np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="integers"):
        link_slices(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(DataError, match="score tables"):
        link_slices(np.zeros((2, 4, 4), np.uint8), scores=[{}])
    with pytest.raises(ConfigError, match="order"):
        link_slices(np.zeros((2, 4, 4), np.uint8), LinkOptions(order="random"))
    with pytest.raises(ConfigError, match="min_iou"):
        link_slices(np.zeros((2, 4, 4), np.uint8), LinkOptions(min_iou=0.0))
    with pytest.raises(ConfigError, match="max_gap"):
        LinkOptions(max_gap=-1).validate()
    empty = link_slices(np.zeros((3, 4, 4), np.uint8))
    assert empty.structures == [] and not empty.labels.any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phantom_labels_renumbered_per_slice_are_restored(seed):
    """The 3-D phantom's own labels, renumbered at random on every slice: linking must give back
    one label per organ (the same partition of the volume)."""
    from d2ct.data.phantom import generate_volume

    _, truth, info = generate_volume(seed, 96, 30)
    assert len(info["structures"]) >= 15
    res = link_slices(scramble(truth, seed), LinkOptions(min_slices=1), spacing=info["spacing"])
    assert len(res.structures) == len(np.unique(truth)) - 1
    assert same_partition(truth, res.labels)
    # with the default speckle filter nothing real is lost either (every phantom organ spans > 1 slice)
    res = link_slices(scramble(truth, seed + 10), spacing=info["spacing"])
    assert same_partition(truth, res.labels)


def test_label_maps_with_scores_gives_each_id_its_instance_score():
    from d2ct.engine.predictor import InstancePrediction
    from d2ct.postprocess.linking import label_maps_with_scores
    from d2ct.postprocess.submission import PostprocessOptions, label_maps_from_predictions

    soft = np.zeros((4, H, W), np.uint8)
    soft[0][box(0, 10, 0, 10)] = 255  # score 0.3: below the threshold
    soft[1][box(20, 30, 20, 30)] = 255  # 0.9 -> id 1
    soft[2][box(20, 30, 25, 35)] = 255  # 0.8 -> id 2, loses the overlap to the 0.9 one
    soft[3][box(22, 28, 22, 28)] = 255  # 0.7: entirely under the 0.9 one, keeps no pixel
    pred = InstancePrediction("a", H, W, np.array([0.3, 0.9, 0.8, 0.7], np.float32), soft)
    empty = InstancePrediction("b", H, W)
    opts = PostprocessOptions(score_threshold=0.5, min_area=1, fallback_top_k=0)
    maps, scores = label_maps_with_scores([pred, empty], opts)
    np.testing.assert_array_equal(maps, label_maps_from_predictions([pred, empty], opts))
    assert scores[0] == {1: pytest.approx(0.9), 2: pytest.approx(0.8)} and scores[1] == {}
    assert maps[0][25, 22] == 1 and maps[0][25, 33] == 2
