"""Per-slice label maps of a CT volume -> the files a user opens: a NIfTI label volume on the
input's own grid (one label per 3-D structure, :mod:`d2ct.postprocess.linking`), its JSON
side-car and colour tables (ITK-SNAP, 3D Slicer), and an optional 3-plane overlay PNG."""
from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from d2ct.postprocess.linking import LinkOptions, link_slices

logger = logging.getLogger(__name__)

__all__ = ["write_volume_prediction", "link_slice_folder"]


def write_volume_prediction(label_maps: np.ndarray, volume, out: str | os.PathLike, *,
                            scores: Sequence[dict] | None = None, link: bool = True,
                            options: LinkOptions | None = None, viz: str | os.PathLike | None = None,
                            truth: np.ndarray | None = None, meta: dict | None = None) -> dict:
    """Write ``out`` (.nii/.nii.gz) and its side files from display-oriented (Z, H, W) label maps on
    the grid of ``volume`` (a :class:`d2ct.data.volumes.Volume`; resampled slices must be restored
    first). ``link``: one label per 3-D structure (else the per-slice numbers are kept, as a 2-D
    model gives them). ``scores``: per slice ``{label: score}`` (the side-car's mean scores).
    ``viz``: a folder (or a .png path) for the axial / coronal / sagittal overlay. ``truth``: a
    display-oriented label volume on the same grid: shown in the overlay, and its 3-D scores
    (:func:`d2ct.evaluation.volume_metrics.score_volume`) go into the side-car and the result.
    Returns ``{"paths": {...}, "n_structures": N, "stats": {...}, "scores": summary or None}``."""
    from d2ct.data.volumes import save_label_volume
    from d2ct.visualization.volume import three_plane_overlay, write_volume_outputs

    out = Path(out)
    maps = np.asarray(label_maps)
    opts = options or LinkOptions()
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    if link:
        res = link_slices(maps, opts, scores=scores, spacing=volume.spacing)
        labels = res.labels
        structures = [s.to_dict() for s in res.structures]
        info = {"linking": {**asdict(opts), "n_instances": res.n_instances, "n_dropped": res.n_dropped,
                            "dropped_voxels": res.dropped_voxels, **res.stats}}
    else:
        labels = maps
        structures = []
        for v in np.unique(maps[maps > 0]).tolist():  # per-slice labels: one entry per label value
            zs = np.flatnonzero((maps == v).reshape(maps.shape[0], -1).any(axis=1))
            vox = int(np.count_nonzero(maps == v))
            structures.append({"label": int(v), "voxels": vox, "z_first": int(zs[0]), "z_last": int(zs[-1]),
                               "n_slices": int(zs.size), "volume_ml": vox * voxel_ml, "mean_score": None,
                               "note": "per-slice label: not one structure"})
        info = {"linking": None}
    scores3d = None
    if truth is not None:
        from d2ct.evaluation.volume_metrics import score_volume

        scores3d = score_volume(truth, labels, spacing=volume.spacing).summary
        info["scores_3d"] = scores3d
    save_label_volume(labels, volume, out)
    paths = {"labels": out}
    side = write_volume_outputs(out, structures, source=str(volume.source), shape_zhw=list(volume.shape),
                                spacing_mm=[float(s) for s in volume.spacing],
                                display="slices inferior->superior, rows anterior->posterior, columns "
                                        "patient right->left (z_first / z_last are display slice indices)",
                                **info, **(meta or {}))
    paths.update(side)
    if viz:
        viz = Path(viz)
        png = viz if viz.suffix.lower() == ".png" else viz / (side["json"].stem + "_3plane.png")
        paths["viz"] = three_plane_overlay(volume.hu, labels, png, spacing=volume.spacing, truth=truth,
                                           title=f"{Path(str(volume.source)).name}: {len(structures)} structures")
    return {"paths": paths, "n_structures": len(structures), "stats": info["linking"], "scores": scores3d}


def link_slice_folder(label_maps: np.ndarray, scores: Sequence[dict] | None = None,
                      options: LinkOptions | None = None) -> np.ndarray:
    """Link the label maps of a folder of PNG slices that are one scan, in order (no spacing is
    known, so the minimum volume is not applied). The result must still fit the challenge's uint8."""
    res = link_slices(label_maps, options, scores=scores)
    if res.labels.dtype != np.uint8:
        from d2ct.errors import DataError

        raise DataError(f"linking the slices gave {len(res.structures)} structures; a challenge CSV holds 255 "
                        "at most (raise the minimum size or do not link)")
    logger.info("linked %d slice instances into %d structures (%d dropped as speckle)", res.n_instances,
                len(res.structures), res.n_dropped)
    return res.labels


def add_linking_arguments(parser) -> None:
    """The predict tool's options for volumes (linking, speckle, numbering) on an argparse parser."""
    d = LinkOptions()
    g = parser.add_argument_group("volume labels (one label per 3-D structure, see docs/volumes.md)")
    g.add_argument("--per-slice-labels", action="store_true",
                   help="volume input: keep each slice's own numbering instead of linking the slices")
    g.add_argument("--link-slices", action="store_true",
                   help="folder of PNG slices that are one scan, in name order: link them too")
    g.add_argument("--link-min-iou", type=float, default=d.min_iou,
                   help=f"IoU for an instance to continue a structure of the slice below (default {d.min_iou})")
    g.add_argument("--link-max-gap", type=int, default=d.max_gap,
                   help=f"slices a structure may be missing and keep its label (default {d.max_gap})")
    g.add_argument("--min-slices", type=int, default=d.min_slices,
                   help=f"drop structures on fewer slices (default {d.min_slices})")
    g.add_argument("--min-volume-ml", type=float, default=d.min_volume_ml,
                   help=f"volume input: drop structures smaller than this (default {d.min_volume_ml} ml)")
    g.add_argument("--label-order", choices=("volume", "superior"), default=d.order,
                   help="numbering: largest structure first (volume) or top to bottom (superior)")


def link_options_from_args(args) -> LinkOptions:
    """LinkOptions from the options of :func:`add_linking_arguments` (validated)."""
    return LinkOptions(min_iou=args.link_min_iou, max_gap=args.link_max_gap, min_slices=args.min_slices,
                       min_volume_ml=args.min_volume_ml, order=args.label_order).validate()
