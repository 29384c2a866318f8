"""Detectron2 ``DatasetEvaluator`` for class-agnostic CT segmentation.

For every image, :class:`CTSegmentationEvaluator` takes the model's ``instances`` and

* keeps all predicted masks with their scores (RLE) for the class-agnostic COCO mask AP
  (:func:`d2ct.evaluation.coco_ap.coco_ap`, pycocotools ``COCOeval(iouType="segm")``, at most
  ``max_dets`` instances per image by score; ground truth = the data set's annotations);
* flattens them into one label map with :func:`d2ct.postprocess.flatten.instances_to_label_map`
  (``score_threshold``, ``min_area``, ``fallback_top_k``: what a submission would contain) and
  scores that map against the truth label map rebuilt from the dataset dict's annotations (each
  annotation's mask painted with its ``label_value``, in annotation order; annotations without
  ``label_value`` get 1, 2, ...): ARI over all pixels, ARI on truth foreground, Dice, recall and
  precision at IoU 0.5 (:func:`d2ct.evaluation.metrics.score_image`).

The truth is looked up by ``image_id`` in ``DatasetCatalog.get(dataset_name)`` (Detectron2's test
mapper drops the annotations from the model inputs).  Works under distributed inference: the
per-image records are gathered to the main process (``detectron2.utils.comm.gather``); the other
processes return ``{}``.

``evaluate()`` returns ``OrderedDict(segm={AP, AP50, AP75, APs, APm, APl}, ct={ARI, ARI_fg, Dice,
Dice_all, Recall50, Precision50, n_images})`` (floats; AP on 0-100, the others on 0-1), the shape
``print_csv_format`` and ``EvalHook`` expect (flattened keys ``segm/AP``, ``ct/ARI``...).  With
``output_dir`` it also writes ``ct_per_image.csv`` and ``ct_summary.json`` there.
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from d2ct.errors import DataError
from d2ct.evaluation.coco_ap import AP_KEYS, coco_ap
from d2ct.evaluation.metrics import score_image
from d2ct.evaluation.report import PER_IMAGE_COLUMNS, summarize
from d2ct.utils.fileio import atomic_write, atomic_write_json
from d2ct.utils.masks import encode_masks

try:  # Detectron2 is a hard dependency of the trainer, not of the metric code
    from detectron2.evaluation import DatasetEvaluator
except ImportError:  # pragma: no cover
    DatasetEvaluator = object  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

__all__ = ["CTSegmentationEvaluator", "annotation_mask", "truth_label_map", "CT_KEYS"]

CT_KEYS = ("ARI", "ARI_fg", "Dice", "Dice_all", "Recall50", "Precision50")


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """Binary (H, W) mask of one Detectron2 annotation: RLE dict (counts str/bytes, or an
    uncompressed list) or polygons."""
    segm = ann.get("segmentation")
    if segm is None:
        raise DataError(f"annotation without 'segmentation': {sorted(ann)}")
    if isinstance(segm, dict):
        if isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, *segm["size"])
        else:
            rle = dict(segm)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
        if tuple(rle["size"]) != (height, width):
            raise DataError(f"annotation mask is {tuple(rle['size'])} but the image is {(height, width)}")
    elif isinstance(segm, list):
        if not segm:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    else:
        raise DataError(f"unsupported annotation segmentation type {type(segm).__name__}")
    return mask_utils.decode(rle).astype(bool)


def truth_label_map(record: dict) -> np.ndarray:
    """uint8 (H, W) label map of a dataset dict: each annotation painted with its ``label_value``."""
    h, w = int(record["height"]), int(record["width"])
    out = np.zeros((h, w), dtype=np.uint8)
    for i, ann in enumerate(record.get("annotations", ()) or ()):
        value = int(ann.get("label_value", i + 1))
        if not 1 <= value <= 255:
            raise DataError(f"{record.get('file_name', record.get('image_id'))}: label_value {value} is not in 1..255")
        out[annotation_mask(ann, h, w)] = value
    return out


class CTSegmentationEvaluator(DatasetEvaluator):
    """COCO mask AP (class-agnostic) + ARI / ARI_fg / Dice / recall of the flattened label maps."""

    def __init__(
        self,
        dataset_name: str,
        output_dir: str | os.PathLike | None = None,
        score_threshold: float = 0.5,
        min_area: int = 0,
        fallback_top_k: int = 3,
        *,
        distributed: bool = True,
        max_dets: int = 100,
    ) -> None:
        self._dataset_name = dataset_name
        self._output_dir = Path(output_dir) if output_dir else None
        self._score_threshold = float(score_threshold)
        self._min_area = int(min_area)
        self._fallback_top_k = int(fallback_top_k)
        self._distributed = distributed
        self._max_dets = int(max_dets)
        self._by_id: dict | None = None
        self._records: list[dict] = []

    # ------------------------------------------------------------------------------- helpers
    def _truth_record(self, inp: dict) -> dict:
        if self._by_id is None:
            from detectron2.data import DatasetCatalog

            self._by_id = {d["image_id"]: d for d in DatasetCatalog.get(self._dataset_name)}
        image_id = inp.get("image_id")
        rec = self._by_id.get(image_id)
        if rec is None:
            if "annotations" in inp:  # a mapper that kept them
                return inp
            raise DataError(f"{self._dataset_name}: no dataset dict with image_id {image_id!r} "
                            f"({inp.get('file_name', '?')})")
        return rec

    # ---------------------------------------------------------------------------- interface
    def reset(self) -> None:
        self._records = []

    def process(self, inputs, outputs) -> None:
        from d2ct.postprocess.flatten import instances_from_detectron2, instances_to_label_map

        for inp, out in zip(inputs, outputs):
            rec = self._truth_record(inp)
            h, w = int(rec["height"]), int(rec["width"])
            truth = truth_label_map(rec)
            if "instances" not in out:
                raise DataError(f"{self._dataset_name}: model output has no 'instances' (keys {sorted(out)})")
            masks, scores = instances_from_detectron2(out["instances"].to("cpu"))
            if masks.shape[1:] != (h, w):
                raise DataError(
                    f"{rec.get('file_name', rec['image_id'])}: predicted masks are {masks.shape[1:]} "
                    f"but the image is {(h, w)}"
                )
            pred_map = instances_to_label_map(
                masks, scores, shape=(h, w), score_threshold=self._score_threshold,
                min_area=self._min_area, fallback_top_k=self._fallback_top_k,
            )
            top = np.argsort(-scores, kind="stable")[: self._max_dets]
            gt_rles = [
                _str_counts(mask_utils.encode(np.asfortranarray(annotation_mask(a, h, w).astype(np.uint8))))
                for a in rec.get("annotations", ()) or ()
                if not a.get("iscrowd", 0)
            ]
            row = {"image_id": rec["image_id"], "name": str(rec.get("name", os.path.basename(str(rec.get("file_name", "")))))}
            row.update(score_image(truth, pred_map))
            self._records.append({
                "row": row,
                "shape": (h, w),
                "gt": gt_rles,
                "pred": list(zip(encode_masks(masks[top]), scores[top].astype(float).tolist())),
            })

    def evaluate(self):
        records = self._records
        if self._distributed:
            from detectron2.utils import comm

            comm.synchronize()
            gathered = comm.gather(records, dst=0)
            if not comm.is_main_process():
                return {}
            records = list(itertools.chain(*gathered))
        if not records:
            logger.warning("CTSegmentationEvaluator on %s: no predictions to evaluate", self._dataset_name)
            return {}
        # one record per image, in image_id order (DDP samplers may repeat images)
        uniq = {}
        for r in records:
            uniq.setdefault(r["row"]["image_id"], r)
        records = [uniq[k] for k in sorted(uniq, key=lambda x: (str(type(x)), x))]
        ap = coco_ap([r["gt"] for r in records], [r["pred"] for r in records], [r["shape"] for r in records],
                     max_dets=self._max_dets)
        per_image = pd.DataFrame([r["row"] for r in records], columns=["image_id", *PER_IMAGE_COLUMNS])
        summary = summarize(per_image)
        ct = {k: float(summary[k]) for k in CT_KEYS}
        ct["n_images"] = float(summary["n_images"])
        results = OrderedDict()
        results["segm"] = {k: float(ap[k]) for k in AP_KEYS}
        results["ct"] = ct
        if self._output_dir is not None:
            self._output_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(self._output_dir / "ct_per_image.csv", "w", encoding="utf-8", newline="") as f:
                per_image.to_csv(f, index=False)
            doc = {
                "dataset": self._dataset_name,
                "score_threshold": self._score_threshold,
                "min_area": self._min_area,
                "fallback_top_k": self._fallback_top_k,
                "results": {k: {kk: (None if np.isnan(vv) else vv) for kk, vv in v.items()} for k, v in results.items()},
            }
            atomic_write_json(self._output_dir / "ct_summary.json", doc)
        logger.info("CT evaluation on %s: %s", self._dataset_name,
                    ", ".join(f"{k}={v:.0f}" if k == "n_images" else f"{k}={v:.4f}"
                              for k, v in itertools.chain(results["segm"].items(), ct.items())))
        return copy.deepcopy(results)


def _str_counts(rle: dict) -> dict:
    rle["counts"] = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    return rle
