"""Model predictions -> one label map per slice -> a submission CSV or a NIfTI label volume."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from d2ct.data.images import list_slices
from d2ct.data.labels_csv import write_labels_csv
from d2ct.errors import DataError
from d2ct.utils.fileio import atomic_write_json, read_json

from .flatten import instances_to_label_map

logger = logging.getLogger(__name__)


@dataclass
class PostprocessOptions:
    """How instances become a label map. The fallback keeps a slice from staying empty when the
    model saw something below the threshold (the published run lost 102 of 500 test slices so)."""

    score_threshold: float = 0.5
    min_area: int = 5
    fallback_top_k: int = 3

    @classmethod
    def from_cfg(cls, cfg, **overrides) -> "PostprocessOptions":
        post = cfg.D2CT.POSTPROCESS
        opts = cls(post.SCORE_THRESHOLD, post.MIN_AREA, post.FALLBACK_TOP_K)
        for key, value in overrides.items():
            if value is not None:
                setattr(opts, key, value)
        return opts


def prediction_to_label_map(pred, options: PostprocessOptions) -> np.ndarray:
    """One InstancePrediction -> (H, W) uint8 label map (ids 1..K by descending score)."""
    if len(pred) == 0:
        return np.zeros((pred.height, pred.width), np.uint8)
    return instances_to_label_map(
        pred.masks(), pred.scores, shape=(pred.height, pred.width), score_threshold=options.score_threshold,
        min_area=options.min_area, fallback_top_k=options.fallback_top_k,
    )


def label_maps_from_predictions(preds: Sequence, options: PostprocessOptions) -> np.ndarray:
    """(N, H, W) uint8 label maps; every slice must have the same size (as in one submission)."""
    maps = [prediction_to_label_map(p, options) for p in preds]
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:
        raise DataError(f"slices of several sizes cannot share one submission CSV: {sorted(shapes)}")
    return np.stack(maps) if maps else np.zeros((0, 0, 0), np.uint8)


def label_maps_from_instances(instances: dict[str, tuple[list[dict], np.ndarray]], names: Sequence[str],
                              options: PostprocessOptions, shape: tuple[int, int] | None = None) -> np.ndarray:
    """(N, H, W) label maps of ``names`` from saved instances (:func:`load_instances`): flattening
    again at another threshold needs no model. ``shape`` (H, W) is needed only when no slice has
    an instance (the masks carry their size)."""
    missing = [n for n in names if n not in instances]
    if missing:
        raise DataError(f"no saved instances for {len(missing)} slice(s), e.g. {missing[0]}")
    sizes = {tuple(r["size"]) for n in names for r in instances[n][0][:1]} | ({tuple(shape)} if shape else set())
    if len(sizes) > 1:
        raise DataError(f"slices of several sizes cannot share one submission CSV: {sorted(sizes)}")
    if not sizes:  # no instance on any slice: nothing says how large they are
        raise DataError("no slice has a saved instance: the slice size is unknown")
    shape = sizes.pop()
    maps = [instances_to_label_map(instances[n][0], instances[n][1], shape=shape,
                                   score_threshold=options.score_threshold, min_area=options.min_area,
                                   fallback_top_k=options.fallback_top_k) for n in names]
    return np.stack(maps) if maps else np.zeros((0, *shape), np.uint8)


def find_slices(folder: str | os.PathLike) -> tuple[Path, list[str]]:
    """The PNG slices to predict: the folder itself, or the image folder of a challenge data set
    (test-images/, then images/, then train-images/)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of PNG slices")
    names = list_slices(folder)
    if names:
        return folder, names
    for sub in ("test-images", "images", "train-images"):
        if (folder / sub).is_dir() and list_slices(folder / sub):
            return folder / sub, list_slices(folder / sub)
    raise DataError(f"{folder}: no PNG slices in it (nor in test-images/, images/ or train-images/)")


def write_submission(path: str | os.PathLike, names: Sequence[str], label_maps: np.ndarray) -> Path:
    """The challenge layout: rows = pixels (index 'pixel' = row*W+col), one column per image."""
    write_labels_csv(path, list(names), label_maps)
    logger.info("submission: %d slices -> %s", len(names), path)
    return Path(path)


def save_instances(path: str | os.PathLike, preds: Sequence, source: dict | None = None) -> Path:
    """Every instance of every slice (score + RLE), before flattening: what mask AP is computed on.
    ``source``: what they were predicted with (``d2ct.engine.predictor.prediction_source``)."""
    data = {"source": source} if source is not None else {}
    data["images"] = [
        {"name": p.name, "height": p.height, "width": p.width, "scores": [float(s) for s in p.scores],
         "rles": p.compact().rles or []} for p in preds]
    atomic_write_json(path, data, indent=None)
    return Path(path)


def read_instances(path: str | os.PathLike) -> tuple[dict | None, dict[str, tuple[list[dict], np.ndarray]]]:
    """(source, name -> (RLEs, scores)) of a :func:`save_instances` file; source is None for a file
    saved without one (before d2ct recorded it). Raises DataError naming the file when it is missing,
    not JSON or not laid out as :func:`save_instances` writes it."""
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise DataError(f"instances file not found: {path}") from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not an instances file (expected an object with an 'images' list)")
    try:
        instances = {im["name"]: (im["rles"], np.asarray(im["scores"], np.float32)) for im in data["images"]}
    except KeyError as e:
        raise DataError(f"{path}: not an instances file (an image without {e})") from None
    except TypeError:
        raise DataError(f"{path}: not an instances file (an image entry is not an object with name, "
                        "rles and scores)") from None
    return data.get("source"), instances


def load_instances(path: str | os.PathLike) -> dict[str, tuple[list[dict], np.ndarray]]:
    """name -> (RLEs, scores) from :func:`save_instances` (:func:`read_instances`)."""
    return read_instances(path)[1]
