"""Per-slice label maps of a volume -> one label per 3-D structure (linking across slices).

A 2-D model numbers the structures of each slice arbitrarily (the liver is 3 on one slice and 7 on
the next). :func:`link_slices` gives every 3-D structure one label through the whole volume, as
TotalSegmentator or nnU-Net volumes are:

1. **Matching.** Slice by slice (inferior -> superior), the instances of slice ``z`` are matched to
   the *active* structures, those last seen on one of the ``max_gap + 1`` slices below (so a
   structure may be missing on ``max_gap`` slices and keep its identity). The cost is the IoU between
   the instance and the structure's mask on the slice where it was last seen; the assignment is
   one-to-one and maximises the summed IoU (Hungarian, ``scipy.optimize.linear_sum_assignment``);
   pairs below ``min_iou`` are not matches.
2. **Growing and shrinking ends.** An instance left unmatched whose overlap coefficient
   ``|A n B| / min(|A|, |B|)`` with a still unmatched active structure is >= ``min_contain``
   continues it (one-to-one, Hungarian again): the tip of an organ is much smaller than the slice
   before, so its IoU is low although it lies inside it.
3. **Splits** (stated rule): a structure that falls apart into several pieces keeps one label. An
   instance still unmatched that lies ``>= split_overlap`` of its own area inside the previous mask
   of a structure that was already matched on this slice joins that structure, provided it is a
   piece and not a new structure: at least ``split_min_share`` of that structure's area on this slice,
   and not enclosed by it (a lesion appearing inside an organ stays its own structure).
   ``split_overlap = 0`` turns joining off: the extra piece then starts a new structure. Caveat: a
   new structure as large as that, appearing beside a neighbour where the neighbour was on the slice
   before, is absorbed by the neighbour.
4. **Merges** (stated rule): when two structures touch and the model gives them one instance, the
   Hungarian step gives it to the structure it overlaps most; the other pauses and takes its identity
   back when it separates again within ``max_gap`` slices (it is still active), else it ends there.
   Labels are never merged retroactively.
5. **Speckle.** Structures with fewer than ``min_slices`` slices, fewer than ``min_voxels`` voxels
   or (with a voxel spacing) less than ``min_volume_ml`` are dropped (set to 0).
6. **Numbering.** The kept structures get 1..N: ``order="volume"`` largest first,
   ``order="superior"`` top to bottom (by their highest slice; display slices run inferior ->
   superior, so the highest index is the top).

Everything else is new: an instance that matches nothing starts a new structure.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from d2ct.errors import ConfigError, DataError
from d2ct.utils.masks import iou_from_overlaps

__all__ = ["LinkOptions", "LinkedStructure", "LinkResult", "link_slices", "label_maps_with_scores"]

ORDERS = ("volume", "superior")


@dataclass(frozen=True)
class LinkOptions:
    """Parameters of :func:`link_slices` (see the module docstring for the rules)."""

    min_iou: float = 0.2
    min_contain: float = 0.5
    split_overlap: float = 0.8
    split_min_share: float = 0.2
    max_gap: int = 1
    min_slices: int = 2
    min_voxels: int = 0
    min_volume_ml: float = 0.0
    order: str = "volume"

    def validate(self) -> "LinkOptions":
        for name in ("min_iou", "min_contain", "split_overlap", "split_min_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"linking option {name} must be in [0, 1], got {v}")
        if self.min_iou <= 0:
            raise ConfigError(f"linking option min_iou must be > 0 (0 would link structures that do not touch), "
                              f"got {self.min_iou}")
        for name in ("max_gap", "min_slices", "min_voxels"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"linking option {name} must be an integer >= 0, got {v!r}")
        if not self.min_volume_ml >= 0:
            raise ConfigError(f"linking option min_volume_ml must be >= 0, got {self.min_volume_ml}")
        if self.order not in ORDERS:
            raise ConfigError(f"linking option order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        return self


@dataclass
class LinkedStructure:
    """One 3-D structure of a linked volume."""

    label: int
    voxels: int
    z_first: int  # display slice indices (inferior -> superior), inclusive
    z_last: int
    n_slices: int  # slices where it is present (a gap is not counted)
    volume_ml: float | None = None  # with a voxel spacing
    mean_score: float | None = None  # voxel-weighted mean of its instances' scores, when scores were given
    n_splits: int = 0  # slices where several pieces were joined into it

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LinkResult:
    """Output of :func:`link_slices`."""

    labels: np.ndarray  # (Z, H, W) uint8 (uint16 above 255 structures)
    structures: list[LinkedStructure]
    n_instances: int  # slice instances looked at
    n_dropped: int  # structures dropped as speckle
    dropped_voxels: int
    stats: dict = field(default_factory=dict)  # matches, gap matches, ends, splits joined


class _Track:
    __slots__ = ("z_last", "labels_last", "area_last", "pieces", "n_splits")

    def __init__(self, z: int, label: int, area: int):
        self.z_last = z
        self.labels_last = [label]
        self.area_last = area
        self.pieces: list[tuple[int, int]] = [(z, label)]
        self.n_splits = 0


def _slice_labels(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(non-zero labels, their pixel counts) of one slice."""
    values, counts = np.unique(m, return_counts=True)
    keep = values != 0
    return values[keep], counts[keep]


def _joint(a: np.ndarray, b: np.ndarray, la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """Intersections (len(la), len(lb)) between the labels ``la`` of slice ``a`` and ``lb`` of ``b``."""
    if la.size == 0 or lb.size == 0:
        return np.zeros((la.size, lb.size), np.int64)
    fg = (a != 0) & (b != 0)
    ia = np.searchsorted(la, a[fg])
    ib = np.searchsorted(lb, b[fg])
    return np.bincount(ia * lb.size + ib, minlength=la.size * lb.size).reshape(la.size, lb.size)


def _is_split_piece(m: np.ndarray, piece: int, body: np.ndarray, piece_area: int, body_area: int,
                    min_share: float) -> bool:
    """Whether the instance ``piece`` looks like a piece broken off the structure whose instance(s) on
    this slice are ``body``, rather than a new structure: it is at least ``min_share`` of the body's
    area, and not enclosed by the body (a lesion inside an organ is a structure of its own)."""
    if piece_area < min_share * body_area:
        return False
    from scipy import ndimage

    is_body = np.isin(m, body)
    if not is_body.any():
        return True
    # fill the body's holes within its bounding box (grown to hold the piece): a piece lying in a
    # hole is enclosed by the body
    rows, cols = np.nonzero(is_body | (m == piece))
    win = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    inner = ndimage.binary_fill_holes(is_body[win])
    return not inner[m[win] == piece].mean() > 0.5


def link_slices(label_maps: np.ndarray, options: LinkOptions | None = None, *,
                scores: Sequence[dict] | None = None,
                spacing: tuple[float, float, float] | None = None) -> LinkResult:
    """Link per-slice label maps (Z, H, W) (any non-negative integers, 0 = background, numbers
    arbitrary per slice) into one label per 3-D structure; see the module docstring for the rules.

    ``scores``: per slice, ``{label: instance score}`` (gives each structure's mean score).
    ``spacing``: (slice, row, col) mm (gives volumes in ml and enables ``min_volume_ml``).
    """
    opts = (options or LinkOptions()).validate()
    maps = np.asarray(label_maps)
    if maps.ndim != 3:
        raise DataError(f"link_slices: label maps must be (Z, H, W), got shape {maps.shape}")
    if maps.dtype.kind not in "uib":
        raise DataError(f"link_slices: label maps must hold integers, got {maps.dtype}")
    if maps.size and maps.min() < 0:
        raise DataError("link_slices: label maps hold negative values")
    if scores is not None and len(scores) != maps.shape[0]:
        raise DataError(f"link_slices: {maps.shape[0]} slices but {len(scores)} score tables")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or not all(s > 0 for s in spacing):
            raise DataError(f"link_slices: spacing must be 3 positive mm values, got {spacing}")

    n_z = maps.shape[0]
    per_slice = [_slice_labels(maps[z]) for z in range(n_z)]
    tracks: list[_Track] = []
    stats = {"matched": 0, "matched_across_gap": 0, "continued_by_containment": 0, "splits_joined": 0,
             "started": 0}
    n_instances = 0
    for z in range(n_z):
        labs, areas = per_slice[z]
        n_instances += labs.size
        if labs.size == 0:
            continue
        active = [t for t in tracks if t.z_last >= z - 1 - opts.max_gap]
        assign = np.full(labs.size, -1)  # instance -> index into active
        inter = np.zeros((len(active), labs.size), np.int64)
        t_area = np.zeros(len(active), np.int64)
        if active:
            cache: dict[int, np.ndarray] = {}
            for k, t in enumerate(active):
                if t.z_last not in cache:
                    cache[t.z_last] = _joint(maps[t.z_last], maps[z], per_slice[t.z_last][0], labs)
                rows = np.searchsorted(per_slice[t.z_last][0], t.labels_last)
                inter[k] = cache[t.z_last][rows].sum(axis=0)
                t_area[k] = t.area_last
            iou = iou_from_overlaps(inter, t_area, areas)
            rows, cols = linear_sum_assignment(iou, maximize=True)
            ok = iou[rows, cols] >= opts.min_iou
            assign[cols[ok]] = rows[ok]
            # growing / shrinking ends: containment between leftovers and unmatched structures
            free_i = np.flatnonzero(assign < 0)
            used = set(assign[assign >= 0].tolist())
            free_t = np.array([k for k in range(len(active)) if k not in used], dtype=np.intp)
            if free_i.size and free_t.size:
                sub = inter[np.ix_(free_t, free_i)]
                small = np.minimum(t_area[free_t][:, None], areas[free_i][None, :])
                contain = np.where(small > 0, sub / np.maximum(small, 1), 0.0)
                r2, c2 = linear_sum_assignment(contain, maximize=True)
                ok2 = (contain[r2, c2] >= opts.min_contain) & (sub[r2, c2] > 0)
                assign[free_i[c2[ok2]]] = free_t[r2[ok2]]
                stats["continued_by_containment"] += int(ok2.sum())
        new_labels: dict[int, list[int]] = {}
        joined: set[int] = set()
        matched = sorted(set(assign[assign >= 0].tolist()))
        for i in np.flatnonzero(assign < 0) if opts.split_overlap > 0 and matched else []:
            frac = inter[matched, i] / max(int(areas[i]), 1)
            best = int(np.argmax(frac))
            k = matched[best]
            if frac[best] >= opts.split_overlap and _is_split_piece(maps[z], int(labs[i]), labs[assign == k],
                                                                    int(areas[i]), int(areas[assign == k].sum()),
                                                                    opts.split_min_share):
                assign[i] = k
                joined.add(k)
                stats["splits_joined"] += 1
        for i in range(labs.size):
            k = int(assign[i])
            if k < 0:
                tracks.append(_Track(z, int(labs[i]), int(areas[i])))
                stats["started"] += 1
                continue
            t = active[k]
            if t.z_last < z - 1:
                stats["matched_across_gap"] += 1
            else:
                stats["matched"] += 1
            new_labels.setdefault(k, []).append(i)
        for k, idx in new_labels.items():
            t = active[k]
            t.z_last = z
            t.labels_last = sorted(int(labs[i]) for i in idx)
            t.area_last = int(areas[idx].sum())
            t.pieces.extend((z, int(labs[i])) for i in idx)
            if k in joined:
                t.n_splits += 1

    # sizes, extents, scores
    area_of = [dict(zip(l.tolist(), a.tolist())) for l, a in per_slice]
    voxel_ml = float(np.prod(spacing)) / 1000.0 if spacing is not None else None
    infos = []
    for t in tracks:
        vox = sum(area_of[z][l] for z, l in t.pieces)
        zs = sorted({z for z, _ in t.pieces})
        score = None
        if scores is not None:
            w = [(area_of[z][l], scores[z].get(l)) for z, l in t.pieces]
            w = [(a, s) for a, s in w if s is not None]
            if w:
                score = float(sum(a * s for a, s in w) / sum(a for a, _ in w))
        infos.append((t, vox, zs, score))
    min_slices = min(opts.min_slices, n_z)
    keep, n_dropped, dropped_vox = [], 0, 0
    for t, vox, zs, score in infos:
        too_small = vox < opts.min_voxels or len(zs) < min_slices or (
            voxel_ml is not None and vox * voxel_ml < opts.min_volume_ml)
        if too_small:
            n_dropped += 1
            dropped_vox += vox
        else:
            keep.append((t, vox, zs, score))
    if opts.order == "volume":
        keep.sort(key=lambda r: (-r[1], r[2][0]))
    else:
        keep.sort(key=lambda r: (-r[2][-1], -r[1]))
    dtype = np.uint8 if len(keep) <= 255 else np.uint16
    if len(keep) > 65535:
        raise DataError(f"link_slices: {len(keep)} structures do not fit a uint16 label volume")
    out = np.zeros(maps.shape, dtype)
    luts: dict[int, dict[int, int]] = {}
    structures = []
    for new, (t, vox, zs, score) in enumerate(keep, start=1):
        for z, l in t.pieces:
            luts.setdefault(z, {})[l] = new
        structures.append(LinkedStructure(label=new, voxels=int(vox), z_first=zs[0], z_last=zs[-1],
                                          n_slices=len(zs), volume_ml=None if voxel_ml is None else vox * voxel_ml,
                                          mean_score=score, n_splits=t.n_splits))
    for z, lut in luts.items():
        src = np.fromiter(lut.keys(), dtype=np.int64)
        dst = np.fromiter(lut.values(), dtype=np.int64)
        m = maps[z]
        order = np.argsort(src)
        src_s, dst_s = src[order], dst[order]
        pos = np.minimum(np.searchsorted(src_s, m), src_s.size - 1)
        hit = src_s[pos] == m
        out[z][hit] = dst_s[pos[hit]]
    return LinkResult(labels=out, structures=structures, n_instances=n_instances, n_dropped=n_dropped,
                      dropped_voxels=int(dropped_vox), stats=stats)


def label_maps_with_scores(preds: Sequence, options) -> tuple[np.ndarray, list[dict[int, float]]]:
    """Flatten predictions as :func:`d2ct.postprocess.submission.label_maps_from_predictions` does
    (same threshold, fallback, minimum area, higher score wins) and also return, per slice, the score
    of each label id: ids are 1..K in descending score order of the instances that kept pixels."""
    from d2ct.postprocess.flatten import instances_to_label_map
    from d2ct.postprocess.submission import label_maps_from_predictions

    maps = label_maps_from_predictions(preds, options)
    tables: list[dict[int, float]] = []
    for p, m in zip(preds, maps):
        n = len(p)
        if n == 0 or not m.any():
            tables.append({})
            continue
        if n > 255:  # cannot replay with one id per instance in a uint8 map: no scores for this slice
            tables.append({})
            continue
        scores = np.asarray(p.scores, dtype=np.float64)
        # replay the flattening with id = instance index + 1: the same instances keep the same pixels
        idx = instances_to_label_map(p.masks(), scores, shape=(p.height, p.width),
                                     labels=np.arange(1, n + 1), score_threshold=options.score_threshold,
                                     min_area=options.min_area, fallback_top_k=options.fallback_top_k)
        kept = np.unique(idx[idx > 0]) - 1
        kept = kept[np.argsort(-scores[kept], kind="stable")]
        tables.append({k + 1: float(scores[i]) for k, i in enumerate(kept.tolist())})
    return maps, tables
