"""Batched inference with soft masks, optional flip test-time augmentation, and sharding.

Detectron2's DefaultPredictor runs one image at a time and returns binary masks. Here the
model sees batches, masks are pasted as probabilities (so two views or several models can
be averaged before thresholding), and a list of images can be split across the processes of
a distributed launch with the results gathered, in input order, on the main process.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.layers import paste_masks_in_image
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from detectron2.utils import comm
from pycocotools import mask as mask_util
from scipy.optimize import linear_sum_assignment

from d2ct.errors import ConfigError
from d2ct.utils.masks import mask_iou
from d2ct.utils.progress import progress_bar as tqdm  # line mode when stderr is not a terminal

from .checkpoint import load_checkpoint
from .mapper import CTDatasetMapper, read_model_image

logger = logging.getLogger(__name__)


@dataclass
class InstancePrediction:
    """Instances of one image at its original size: scores (N,), soft masks (N, H, W) uint8 0..255."""

    name: str
    height: int
    width: int
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    soft_masks: np.ndarray | None = None  # uint8 probabilities x 255; None once compacted
    rles: list | None = None  # binary masks as RLE (after compact())

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def masks(self, threshold: float = 0.5) -> np.ndarray:
        """(N, H, W) bool."""
        if self.soft_masks is not None:
            return self.soft_masks >= int(round(threshold * 255))
        if not self.rles:
            return np.zeros((0, self.height, self.width), bool)
        return np.moveaxis(mask_util.decode(self.rles), 2, 0).astype(bool)

    def compact(self, threshold: float = 0.5) -> "InstancePrediction":
        """Replace the soft masks by RLEs of their binarisation (small enough to gather and store)."""
        if self.soft_masks is not None:
            binary = self.masks(threshold)
            rles = mask_util.encode(np.asfortranarray(np.moveaxis(binary, 0, 2).astype(np.uint8))) if len(binary) else []
            for r in rles:
                r["counts"] = r["counts"].decode("ascii")
            self.rles = list(rles)
            self.soft_masks = None
        return self


def _soft_instances(model, batched_inputs: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run the model; return per image (scores (N,), soft masks (N, H, W) uint8) at the original size."""
    results = model.inference(batched_inputs, do_postprocess=False)
    out = []
    for r, inp in zip(results, batched_inputs):
        h, w = inp["height"], inp["width"]
        boxes = Boxes(r.pred_boxes.tensor.clone())
        boxes.scale(w / r.image_size[1], h / r.image_size[0])
        boxes.clip((h, w))
        keep = boxes.nonempty()
        scores = r.scores[keep]
        if keep.sum() == 0:
            out.append((np.zeros(0, np.float32), np.zeros((0, h, w), np.uint8)))
            continue
        soft = paste_masks_in_image(r.pred_masks[keep][:, 0, :, :], boxes[keep], (h, w), threshold=-1)
        out.append((scores.float().cpu().numpy(), soft.cpu().numpy()))
    return out


def fuse_views(views: Sequence[tuple[np.ndarray, np.ndarray]], iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Fuse the instances of two views of one image (e.g. original and flipped back).

    Instances are matched one-to-one by mask IoU (Hungarian); a matched pair becomes one instance
    with the mean soft mask and the mean score. An instance seen in one view only keeps its mask
    and gets half its score (the other view gave it 0), so flip-consistent instances rank first.
    """
    (s1, m1), (s2, m2) = views
    if len(s1) == 0 or len(s2) == 0:
        scores = np.concatenate([s1, s2]) * 0.5
        masks = np.concatenate([m1, m2]) if len(s1) + len(s2) else m1
        return scores.astype(np.float32), masks
    iou = mask_iou(m1 >= 128, m2 >= 128)
    rows, cols = linear_sum_assignment(-iou)
    matched = [(r, c) for r, c in zip(rows, cols) if iou[r, c] >= iou_threshold]
    used1 = {r for r, _ in matched}
    used2 = {c for _, c in matched}
    scores, masks = [], []
    for r, c in matched:
        scores.append((s1[r] + s2[c]) / 2)
        masks.append(((m1[r].astype(np.uint16) + m2[c]) // 2).astype(np.uint8))
    for i in range(len(s1)):
        if i not in used1:
            scores.append(s1[i] / 2)
            masks.append(m1[i])
    for j in range(len(s2)):
        if j not in used2:
            scores.append(s2[j] / 2)
            masks.append(m2[j])
    order = np.argsort(-np.asarray(scores), kind="stable")
    return np.asarray(scores, np.float32)[order], np.stack(masks)[order]


def load_trained(output_dir: str | os.PathLike, checkpoint: str | None = None, opts: Sequence[str] = ()):
    """(cfg, weights path) of a tools/train_net.py output folder: its config.yaml and
    model_best.pth, else model_final.pth (or ``checkpoint``, relative to the folder)."""
    from d2ct.config import setup_cfg

    config = Path(output_dir) / "config.yaml"
    if not config.exists():
        raise ConfigError(f"{output_dir}: no config.yaml (is this a tools/train_net.py output folder?)")
    return setup_cfg(str(config), list(opts)), str(trained_weights(output_dir, checkpoint))


def trained_weights(output_dir: str | os.PathLike, checkpoint: str | None = None) -> Path:
    """The checkpoint :func:`load_trained` uses: ``checkpoint`` (relative to the folder or not),
    else model_best.pth, else model_final.pth."""
    out = Path(output_dir)
    if checkpoint:
        weights = Path(checkpoint) if Path(checkpoint).is_absolute() or Path(checkpoint).exists() else out / checkpoint
    else:
        weights = next((out / f for f in ("model_best.pth", "model_final.pth") if (out / f).exists()), None)
        if weights is None:
            raise ConfigError(f"{out}: no model_best.pth or model_final.pth (has training finished?)")
    if not weights.exists():
        raise ConfigError(f"checkpoint not found: {weights}")
    return weights


def prediction_source(weights: str | os.PathLike, flip_tta: bool, opts: Sequence[str] = ()) -> dict:
    """What a set of predictions was made with: the checkpoint (by content, so a retrained model
    in the same file is told apart), flip TTA and the config overrides. Saved with the instances,
    so whoever reuses them can tell when they are stale (:func:`source_changes`)."""
    with open(weights, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"weights": str(Path(weights).resolve()), "weights_sha256": digest, "flip_tta": bool(flip_tta),
            "opts": [str(o) for o in opts]}


def source_changes(saved: dict, wanted: dict) -> list[str]:
    """What differs between the source of saved instances and the one predicting now would have:
    a reason to predict again ("checkpoint", "flip_tta", "opts"; where the checkpoint lies does not
    matter, only its content)."""
    keys = {"weights_sha256": "checkpoint", "flip_tta": "flip_tta", "opts": "opts"}
    return [what for k, what in keys.items() if saved.get(k) != wanted.get(k)]


class BatchPredictor:
    """A trained Mask R-CNN applied to many slices.

    Args:
        cfg: a d2ct config (the one the model was trained with).
        weights: checkpoint path (defaults to cfg.MODEL.WEIGHTS).
        batch_size: images per forward pass.
        flip_tta: also predict the horizontally flipped slice and fuse the two (see fuse_views).
    """

    def __init__(self, cfg, weights: str | None = None, batch_size: int = 4, flip_tta: bool = False):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        self.weights_sha256 = load_checkpoint(self.model, weights or cfg.MODEL.WEIGHTS)  # damaged file: DataError
        self.mapper = CTDatasetMapper(self.cfg, is_train=False)
        self.batch_size = max(1, int(batch_size))
        self.flip_tta = flip_tta

    @torch.no_grad()
    def predict_images(self, named_images: Iterable[tuple[str, np.ndarray]], progress: bool = False,
                       total: int | None = None, desc: str = "predicting") -> list[InstancePrediction]:
        """Predict (name, (H, W, 3) uint8 image) pairs; returns one InstancePrediction each, in order."""
        out: list[InstancePrediction] = []
        batch: list[tuple[str, np.ndarray]] = []
        bar = tqdm(total=total, desc=desc, unit="slice", disable=not progress)

        def flush():
            if not batch:
                return
            inputs = [self._prepare(img) for _, img in batch]
            views = _soft_instances(self.model, inputs)
            if self.flip_tta:
                flipped = [self._prepare(np.ascontiguousarray(img[:, ::-1])) for _, img in batch]
                flipped_views = [(s, np.ascontiguousarray(m[:, :, ::-1])) for s, m in _soft_instances(self.model, flipped)]
                views = [fuse_views([a, b]) for a, b in zip(views, flipped_views)]
            for (name, img), (scores, soft) in zip(batch, views):
                out.append(InstancePrediction(name, img.shape[0], img.shape[1], scores, soft))
            bar.update(len(batch))
            batch.clear()

        for name, image in named_images:
            batch.append((name, image))
            if len(batch) >= self.batch_size:
                flush()
        flush()
        bar.close()
        return out

    def _prepare(self, image: np.ndarray) -> dict:
        """Resize as at test time and build the model input dict."""
        h, w = image.shape[:2]
        aug_input = T.AugInput(image)
        self.mapper.augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        return {"image": tensor, "height": h, "width": w}

    def predict_files(self, named_paths: Sequence[tuple[str, str]], progress: bool = False,
                      desc: str = "predicting", compact: bool = True) -> list[InstancePrediction]:
        """Predict image files; ``compact`` turns soft masks into RLEs as it goes (memory stays small)."""
        results = []
        for pred in self.predict_images(((n, read_model_image(p)) for n, p in named_paths), progress=progress,
                                        total=len(named_paths), desc=desc):
            results.append(pred.compact() if compact else pred)
        return results

    def predict_files_sharded(self, named_paths: Sequence[tuple[str, str]], progress: bool = True,
                              desc: str = "predicting") -> list[InstancePrediction] | None:
        """Split the files across the processes of a distributed launch; the main process gets all
        results in input order (others get None). With one process this is predict_files."""
        world, rank = comm.get_world_size(), comm.get_rank()
        mine = list(named_paths)[rank::world]
        local = self.predict_files(mine, progress=progress and comm.is_main_process(), desc=desc)
        if world == 1:
            return local
        gathered = comm.gather(local, dst=0)
        if not comm.is_main_process():
            return None
        by_name = {p.name: p for part in gathered for p in part}
        return [by_name[name] for name, _ in named_paths]
