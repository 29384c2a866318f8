"""Label maps <-> single-class COCO instances with RLE masks.

The challenge numbers the structures of each slice 1..K in an arbitrary order, so d2ct treats every
structure as an instance of one class, "structure" (detectron2 contiguous id 0, COCO category id 1).
A label map becomes one instance per non-zero label value (or per connected component of it), each
with a compressed RLE mask (pycocotools, counts as ``str`` so the dicts serialise to JSON), its box
(XYWH_ABS), its pixel area and the original label number (``label_value``), so that
:func:`d2ct.postprocess.flatten.instances_to_label_map` can rebuild the map exactly.

- :func:`label_map_to_instances`: one label map -> instance annotations
- :func:`dataset_dicts`: a :class:`~d2ct.data.challenge.ChallengeDataset` -> Detectron2 dataset dicts
  (parallel over images)
- :func:`to_coco_json` / :func:`load_coco_dicts`: Detectron2 dicts <-> standard COCO JSON
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pycocotools.mask as mask_util
from scipy import ndimage

from detectron2.structures import BoxMode

from d2ct.errors import DataError
from d2ct.utils.cli import init_pool_worker
from d2ct.utils.masks import encode_masks

logger = logging.getLogger(__name__)

__all__ = [
    "CATEGORY_NAME",
    "COCO_CATEGORY_ID",
    "label_map_to_instances",
    "dataset_dicts",
    "to_coco_json",
    "load_coco_dicts",
]

CATEGORY_NAME = "structure"
# COCO category ids start at 1 (0 is reserved by many COCO tools); detectron2 uses contiguous ids from
# 0. The single class "structure" is COCO id 1 in JSON files and category_id 0 in detectron2 dicts:
# to_coco_json adds 1, load_coco_dicts subtracts 1 (detectron2's own load_coco_json does the same
# mapping through metadata.thing_dataset_id_to_contiguous_id = {1: 0}).
COCO_CATEGORY_ID = 1

# Below this many images dataset_dicts stays in one process (starting workers costs more than it saves).
_PARALLEL_MIN_IMAGES = 64


# --------------------------------------------------------------------------------------------------
# one label map
# --------------------------------------------------------------------------------------------------
def _check_label_map(label_map: np.ndarray) -> np.ndarray:
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise DataError(f"label map must be 2-D (H, W), got shape {label_map.shape}")
    if label_map.dtype != np.uint8:
        if label_map.dtype.kind not in "iub":
            raise DataError(f"label map must hold integers, got dtype {label_map.dtype}")
        if label_map.size and (label_map.min() < 0 or label_map.max() > 255):
            raise DataError(
                f"label values must be 0..255, got {int(label_map.min())}..{int(label_map.max())}"
            )
        label_map = label_map.astype(np.uint8)
    return label_map


def _instances_from_stack(stack: np.ndarray, values: Sequence[int], min_area: int) -> list[dict]:
    """Annotations of the (K, H, W) bool stack, one per mask (label value ``values[k]``)."""
    rles = encode_masks(stack)
    if not rles:
        return []
    areas = mask_util.area(rles)
    boxes = mask_util.toBbox(rles)
    out = []
    for rle, area, box, value in zip(rles, areas, boxes, values):
        area = int(area)
        if area < min_area or area == 0:
            continue
        out.append(
            {
                "segmentation": rle,
                "bbox": [float(v) for v in box],
                "area": area,
                "label_value": int(value),
                "category_id": 0,
                "iscrowd": 0,
                "bbox_mode": BoxMode.XYWH_ABS,
            }
        )
    return out


def label_map_to_instances(
    label_map: np.ndarray,
    *,
    split_components: bool = False,
    min_area: int = 0,
    connectivity: int = 2,
) -> list[dict]:
    """Instances of one label map: one per non-zero label value (ascending), or, with
    ``split_components``, one per connected component of each value (``connectivity`` 1 = 4-neighbours,
    2 = 8-neighbours; components in scipy scan order). Instances with fewer than ``min_area`` pixels
    are dropped. Each instance is a detectron2 annotation dict: ``segmentation`` (compressed RLE,
    counts str), ``bbox`` [x, y, w, h], ``area``, ``label_value``, ``category_id`` 0, ``iscrowd`` 0,
    ``bbox_mode`` XYWH_ABS."""
    label_map = _check_label_map(label_map)
    if connectivity not in (1, 2):
        raise DataError(f"connectivity must be 1 (4-neighbours) or 2 (8-neighbours), got {connectivity}")
    min_area = int(min_area)
    counts = np.bincount(label_map.ravel(), minlength=256)
    counts[0] = 0
    values = np.flatnonzero(counts >= max(min_area, 1))  # a component is never larger than its label
    if values.size == 0:
        return []
    # Work on the transposed map (W, H), made contiguous once: comparing it against each value gives a
    # C-contiguous (K, W, H) stack; its (K, H, W) view is what encode_masks takes, and it encodes it
    # in one pycocotools call without another copy.
    if not split_components:
        lt = np.ascontiguousarray(label_map.T)
        stack = np.equal(lt[None, :, :], values.astype(np.uint8)[:, None, None], order="C")
        return _instances_from_stack(stack.transpose(0, 2, 1), values.tolist(), min_area)

    # Components: label each value inside its bounding box (find_objects), in the map's own row-major
    # orientation so components come in scan order, and paint them into one component-id map.
    structure = ndimage.generate_binary_structure(2, connectivity)
    boxes = ndimage.find_objects(label_map)
    comp_map = np.zeros(label_map.shape, dtype=np.int32)
    comp_values: list[int] = []
    for value in values.tolist():
        box = boxes[value - 1]
        mask = label_map[box] == value
        comps, n = ndimage.label(mask, structure=structure)
        if n > 1:
            sizes = np.bincount(comps.ravel(), minlength=n + 1)
            keep = np.flatnonzero(sizes[1:] >= max(min_area, 1)) + 1
            if keep.size == 0:
                continue
            remap = np.zeros(n + 1, dtype=np.int32)
            remap[keep] = np.arange(len(comp_values) + 1, len(comp_values) + 1 + keep.size, dtype=np.int32)
            comps = remap[comps]
            comp_values.extend([value] * keep.size)
        else:
            comps = comps.astype(np.int32) * (len(comp_values) + 1)
            comp_values.append(value)
        region = comp_map[box]
        region[mask] = comps[mask]
    if not comp_values:
        return []
    comp_t = np.ascontiguousarray(comp_map.T)
    ids = np.arange(1, len(comp_values) + 1, dtype=np.int32)
    stack = np.equal(comp_t[None, :, :], ids[:, None, None], order="C")
    return _instances_from_stack(stack.transpose(0, 2, 1), comp_values, min_area)


# --------------------------------------------------------------------------------------------------
# a data set
# --------------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _worker_init(dataset, options) -> None:
    _WORKER["dataset"] = dataset
    _WORKER["options"] = options


def _image_dict(dataset, name: str, image_id: int, options: dict) -> dict:
    height, width = dataset.shape
    record = {
        "file_name": str(dataset.image_path(name)),
        "height": int(height),
        "width": int(width),
        "image_id": int(image_id),
        "name": name,
    }
    if options["with_annotations"]:
        label_map = dataset.label_map(name)
        record["annotations"] = (
            []
            if label_map is None
            else label_map_to_instances(
                label_map, split_components=options["split_components"], min_area=options["min_area"]
            )
        )
    return record


def _worker_task(item: tuple[str, int]) -> dict:
    name, image_id = item
    return _image_dict(_WORKER["dataset"], name, image_id, _WORKER["options"])


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def dataset_dicts(
    dataset,
    names: Iterable[str] | None = None,
    *,
    split_components: bool = False,
    min_area: int = 0,
    with_annotations: bool = True,
    workers: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """Detectron2 dataset dicts for ``names`` (default: all) of a ChallengeDataset, in the given order.

    Each dict has ``file_name``, ``height``, ``width``, ``image_id`` (position of the image in
    ``dataset.names``), ``name`` and, when ``with_annotations``, ``annotations`` (see
    :func:`label_map_to_instances`; ``[]`` for unlabelled images). ``workers`` processes (default:
    the usable cores) share the work when there are at least 64 images; ``workers=1`` stays in this
    process. ``progress`` shows a tqdm bar."""
    all_names = list(dataset.names)
    index = {n: i for i, n in enumerate(all_names)}
    names = all_names if names is None else list(names)
    missing = [n for n in names if n not in index]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) not in data set {dataset.root}: {', '.join(map(str, missing[:5]))}"
        )
    items = [(n, index[n]) for n in names]
    options = {
        "split_components": bool(split_components),
        "min_area": int(min_area),
        "with_annotations": bool(with_annotations),
    }
    workers = _default_workers() if workers is None else int(workers)
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    workers = min(workers, max(1, len(items)))
    if mp.current_process().daemon:  # daemonic processes (e.g. DataLoader workers) cannot have children
        workers = 1

    bar = None
    if progress:
        from d2ct.utils.progress import progress_bar as tqdm  # line mode when stderr is not a terminal

        bar = tqdm(total=len(items), desc="label maps -> COCO", unit="img")
    try:
        if workers == 1 or len(items) < _PARALLEL_MIN_IMAGES or not with_annotations:
            out = []
            for name, image_id in items:
                out.append(_image_dict(dataset, name, image_id, options))
                if bar is not None:
                    bar.update()
            return out
        # fork shares the already loaded label table with the workers (copy-on-write) instead of
        # pickling it; elsewhere the data set is sent once to each worker by the initializer.
        if "fork" in mp.get_all_start_methods():
            ctx = mp.get_context("fork")
            _worker_init(dataset, options)
            init, initargs = None, ()
        else:  # pragma: no cover - macOS / Windows
            ctx = mp.get_context()
            init, initargs = _worker_init, (dataset, options)
        chunksize = max(1, min(32, len(items) // (workers * 8)))
        out = []
        try:
            with ctx.Pool(workers, initializer=init_pool_worker, initargs=(init, initargs)) as pool:
                for record in pool.imap(_worker_task, items, chunksize=chunksize):
                    out.append(record)
                    if bar is not None:
                        bar.update()
        finally:
            _WORKER.clear()
        return out
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------------------------------
# COCO JSON
# --------------------------------------------------------------------------------------------------
def _rle_counts_str(segm):
    if isinstance(segm, dict) and isinstance(segm.get("counts"), bytes):
        return {"size": list(segm["size"]), "counts": segm["counts"].decode("ascii")}
    return segm


def to_coco_json(
    dicts: Sequence[dict],
    *,
    description: str = "",
    image_root: str | os.PathLike | None = None,
) -> dict:
    """Standard COCO instances JSON from Detectron2 dicts: ``images`` (``id`` = the dict's
    ``image_id``, plus ``name``), ``annotations`` (ids from 1, ``category_id`` 1, RLE ``segmentation``,
    ``label_value`` and ``score`` kept when present) and ``categories`` ``[{"id": 1, "name":
    "structure"}]``. Images without annotations are listed with none. With ``image_root``, file names
    are written relative to it (else as in the dicts)."""
    images, annotations = [], []
    seen_ids: set[int] = set()
    ann_id = 0
    root = Path(image_root) if image_root is not None else None
    for record in dicts:
        image_id = int(record["image_id"])
        if image_id in seen_ids:
            raise DataError(f"duplicate image_id {image_id} in dataset dicts ({record.get('file_name')})")
        seen_ids.add(image_id)
        file_name = str(record["file_name"])
        if root is not None:
            file_name = os.path.relpath(file_name, root)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": int(record["height"]),
                "width": int(record["width"]),
                "name": record.get("name", Path(file_name).name),
            }
        )
        for ann in record.get("annotations", []):
            if int(ann.get("category_id", 0)) != 0:
                raise DataError(
                    f"annotation of {file_name} has category_id {ann.get('category_id')}; d2ct has one class (0)"
                )
            bbox = [float(v) for v in ann["bbox"]]
            mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
            if mode != BoxMode.XYWH_ABS:
                bbox = [float(v) for v in BoxMode.convert(bbox, BoxMode(mode), BoxMode.XYWH_ABS)]
            segm = _rle_counts_str(ann["segmentation"])
            area = ann.get("area")
            if area is None:
                area = float(mask_util.area(segm)) if isinstance(segm, dict) else bbox[2] * bbox[3]
            ann_id += 1
            out = {
                "id": ann_id,
                "image_id": image_id,
                "category_id": COCO_CATEGORY_ID,
                "segmentation": segm,
                "area": int(area) if float(area).is_integer() else float(area),
                "bbox": bbox,
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
            for key in ("label_value", "score"):
                if key in ann:
                    out[key] = ann[key] if key == "score" else int(ann[key])
            if "score" in out:
                out["score"] = float(out["score"])
            annotations.append(out)
    return {
        "info": {
            "description": description,
            "version": "1.0",
            "date_created": _dt.datetime.now().isoformat(timespec="seconds"),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": COCO_CATEGORY_ID, "name": CATEGORY_NAME, "supercategory": CATEGORY_NAME}],
    }


def load_coco_dicts(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[dict]:
    """Detectron2 dicts from a COCO JSON written by :func:`to_coco_json` (or any single-class COCO
    instances file): RLE kept (counts as str; uncompressed RLE is compressed, polygons kept),
    ``category_id`` 1 -> 0, ``label_value`` / ``score`` kept, images in ``id`` order, each with
    ``annotations`` (possibly empty). Relative file names are resolved against ``image_root``
    (default: the JSON file's folder). Raises DataError naming the file on unreadable or bad JSON."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"COCO JSON not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO file (no 'images' list)")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise DataError(f"{path}: 'annotations' is not a list")
    cat_ids = {c.get("id") for c in data.get("categories", []) if isinstance(c, dict)}
    if len(cat_ids) > 1:
        raise DataError(f"{path}: d2ct expects one category ('structure'), found ids {sorted(cat_ids)}")
    cat_id = next(iter(cat_ids)) if cat_ids else COCO_CATEGORY_ID
    root = Path(image_root) if image_root is not None else path.parent

    records: dict[int, dict] = {}
    for img in data["images"]:
        try:
            image_id = int(img["id"])
            file_name = str(img["file_name"])
            height, width = int(img["height"]), int(img["width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: image entry {img!r:.100} lacks id/file_name/height/width ({exc})") from None
        if image_id in records:
            raise DataError(f"{path}: duplicate image id {image_id}")
        full = Path(file_name)
        if not full.is_absolute():
            full = Path(os.path.normpath(root / full))
        records[image_id] = {
            "file_name": str(full),
            "height": height,
            "width": width,
            "image_id": image_id,
            "name": img.get("name", Path(file_name).name),
            "annotations": [],
        }
    for ann in anns:
        try:
            image_id = int(ann["image_id"])
            segm = ann["segmentation"]
            bbox = [float(v) for v in ann["bbox"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: annotation {ann.get('id', '?')} lacks image_id/segmentation/bbox ({exc})") from None
        record = records.get(image_id)
        if record is None:
            raise DataError(f"{path}: annotation {ann.get('id', '?')} refers to unknown image id {image_id}")
        if ann.get("category_id", cat_id) != cat_id:
            raise DataError(f"{path}: annotation {ann.get('id', '?')} has unknown category_id {ann['category_id']}")
        if isinstance(segm, dict):
            if isinstance(segm.get("counts"), list):  # uncompressed RLE -> compressed
                segm = mask_util.frPyObjects(segm, *segm["size"])
            segm = _rle_counts_str(segm)
            if list(segm["size"]) != [record["height"], record["width"]]:
                raise DataError(
                    f"{path}: annotation {ann.get('id', '?')} mask size {segm['size']} differs from its image "
                    f"({record['height']}, {record['width']})"
                )
        elif not isinstance(segm, list):
            raise DataError(f"{path}: annotation {ann.get('id', '?')} has an unreadable segmentation")
        out = {
            "segmentation": segm,
            "bbox": bbox,
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": 0,
            "iscrowd": int(ann.get("iscrowd", 0)),
        }
        if "area" in ann:
            out["area"] = ann["area"]
        if "label_value" in ann:
            out["label_value"] = int(ann["label_value"])
        if "score" in ann:
            out["score"] = float(ann["score"])
        record["annotations"].append(out)
    return [records[k] for k in sorted(records)]
