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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from detectron2.utils import comm
from pycocotools import mask as mask_util
from scipy.optimize import linear_sum_assignment

from d2ct.errors import ConfigError
from d2ct.utils.masks import mask_iou
from d2ct.utils.progress import progress_bar as tqdm  # line mode when stderr is not a terminal

from . import precision
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


def paste_soft_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                     chunk: int = 32) -> torch.Tensor:
    """Paste (N, M, M) mask probabilities into (N, height, width) uint8 images (probability x 255,
    truncated, as Detectron2's ``paste_masks_in_image(..., threshold=-1)``), all masks of a chunk
    in one ``grid_sample`` over the region that bounds their boxes.

    Detectron2 pastes one mask at a time on the CPU (a Python loop of small grid_samples, each
    with its own index arithmetic); here the loop runs over chunks of ``chunk`` masks. Values are
    Detectron2's: the same sampling grid (pixel centres mapped to [-1, 1] within each box)."""
    n = masks.shape[0]
    out = torch.zeros((n, height, width), dtype=torch.uint8)
    if n == 0:
        return out
    masks = masks.float()[:, None]
    boxes = boxes.float()
    for start in range(0, n, chunk):
        m, b = masks[start:start + chunk], boxes[start:start + chunk]
        x0i = int(max(0, float(b[:, 0].min().floor()) - 1))
        y0i = int(max(0, float(b[:, 1].min().floor()) - 1))
        x1i = int(min(width, float(b[:, 2].max().ceil()) + 1))
        y1i = int(min(height, float(b[:, 3].max().ceil()) + 1))
        if x1i <= x0i or y1i <= y0i:
            continue
        x0, y0, x1, y1 = b[:, 0:1], b[:, 1:2], b[:, 2:3], b[:, 3:4]
        img_y = (torch.arange(y0i, y1i, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        img_x = (torch.arange(x0i, x1i, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        k, hh, ww = m.shape[0], img_y.shape[1], img_x.shape[1]
        grid = torch.stack([img_x[:, None, :].expand(k, hh, ww), img_y[:, :, None].expand(k, hh, ww)], dim=3)
        pasted = torch.nn.functional.grid_sample(m, grid, align_corners=False)[:, 0]
        out[start:start + k, y0i:y1i, x0i:x1i] = (pasted * 255).to(torch.uint8)
    return out


def _soft_instances(model, batched_inputs: list[dict], bf16: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run the model (under bfloat16 autocast when ``bf16``); return per image (scores (N,) float32,
    soft masks (N, H, W) uint8) at the original size."""
    with precision.autocast(bf16):
        results = model.inference(batched_inputs, do_postprocess=False)
    out = []
    for r, inp in zip(results, batched_inputs):
        h, w = inp["height"], inp["width"]
        boxes = Boxes(r.pred_boxes.tensor.float().clone())
        boxes.scale(w / r.image_size[1], h / r.image_size[0])
        boxes.clip((h, w))
        keep = boxes.nonempty()
        scores = r.scores[keep]
        if keep.sum() == 0:
            out.append((np.zeros(0, np.float32), np.zeros((0, h, w), np.uint8)))
            continue
        soft = paste_soft_masks(r.pred_masks[keep][:, 0, :, :], boxes[keep].tensor, h, w)
        out.append((scores.float().cpu().numpy(), soft.cpu().numpy()))
    return out


def install_score_floor(model, floor: float, keep_top_k: int) -> bool:
    """Run the mask head only on detections scored at least ``floor``, plus each image's
    ``keep_top_k`` best (so a fallback to the best instances below a threshold still finds them).
    Wraps ``model.roi_heads.forward_with_given_boxes`` (inference only); returns whether it did."""
    roi = getattr(model, "roi_heads", None)
    if floor <= 0 or roi is None or not hasattr(roi, "forward_with_given_boxes"):
        return False
    inner = roi.forward_with_given_boxes

    def forward_with_given_boxes(features, instances):
        kept = []
        for inst in instances:
            rank = torch.empty(len(inst), dtype=torch.long)
            rank[torch.argsort(inst.scores, descending=True, stable=True)] = torch.arange(len(inst))
            kept.append(inst[(inst.scores >= floor) | (rank < keep_top_k)])
        return inner(features, kept)

    roi.forward_with_given_boxes = forward_with_given_boxes
    return True


class ProgressLog:
    """Progress of a long prediction as log lines: done / total, slices per second and the time
    left, at most every ``interval`` seconds and once at the end (pipeline stages write their
    output to log files, where a tqdm bar is one unreadable line)."""

    def __init__(self, total: int | None, desc: str = "predicting", interval: float = 30.0,
                 clock=time.monotonic, log=None):
        self.total, self.desc, self.interval = total, desc, interval
        self._clock = clock
        self._log = log or logger.info
        self.start = self._last = clock()
        self.done = 0

    def line(self) -> str:
        elapsed = max(self._clock() - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total else "") + \
            f" slices, {rate:.2f} slices/s, {_duration(elapsed)} elapsed"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text

    def update(self, n: int) -> None:
        self.done += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            self._log(self.line())

    def close(self) -> None:
        if self.done:
            self._log(self.line())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


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

    From the config: bfloat16 autocast and channels-last on the CPU (D2CT.CPU_BF16,
    D2CT.CHANNELS_LAST; d2ct.engine.precision) and the mask head only on detections scored at
    least D2CT.PREDICT_SCORE_FLOOR or among each slice's D2CT.PREDICT_KEEP_TOP_K best.
    """

    def __init__(self, cfg, weights: str | None = None, batch_size: int = 4, flip_tta: bool = False):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        self.weights_sha256 = load_checkpoint(self.model, weights or cfg.MODEL.WEIGHTS)  # damaged file: DataError
        self.bf16 = precision.prepare_model(self.model, self.cfg)
        install_score_floor(self.model, float(self.cfg.D2CT.PREDICT_SCORE_FLOOR),
                            max(int(self.cfg.D2CT.PREDICT_KEEP_TOP_K), int(self.cfg.D2CT.POSTPROCESS.FALLBACK_TOP_K)))
        self.mapper = CTDatasetMapper(self.cfg, is_train=False)
        self.batch_size = max(1, int(batch_size))
        self.flip_tta = flip_tta
        logger.info("BatchPredictor: %s, batch %d%s, mask head on scores >= %g (and the %d best per slice)",
                    "bfloat16 autocast" if self.bf16 else "float32", self.batch_size,
                    ", channels-last" if self.cfg.D2CT.CHANNELS_LAST and str(self.cfg.MODEL.DEVICE).startswith("cpu")
                    else "", self.cfg.D2CT.PREDICT_SCORE_FLOOR,
                    max(int(self.cfg.D2CT.PREDICT_KEEP_TOP_K), int(self.cfg.D2CT.POSTPROCESS.FALLBACK_TOP_K)))

    @torch.no_grad()
    def predict_images(self, named_images: Iterable[tuple[str, np.ndarray]], progress: bool = False,
                       total: int | None = None, desc: str = "predicting") -> list[InstancePrediction]:
        """Predict (name, (H, W, 3) uint8 image) pairs; returns one InstancePrediction each, in order."""
        out: list[InstancePrediction] = []
        batch: list[tuple[str, np.ndarray]] = []
        bar = tqdm(total=total, desc=desc, unit="slice", disable=not progress)
        log = ProgressLog(total, desc) if progress else None

        def flush():
            if not batch:
                return
            inputs = [self._prepare(img) for _, img in batch]
            views = _soft_instances(self.model, inputs, self.bf16)
            if self.flip_tta:
                flipped = [self._prepare(np.ascontiguousarray(img[:, ::-1])) for _, img in batch]
                flipped_views = [(s, np.ascontiguousarray(m[:, :, ::-1]))
                                 for s, m in _soft_instances(self.model, flipped, self.bf16)]
                views = [fuse_views([a, b]) for a, b in zip(views, flipped_views)]
            for (name, img), (scores, soft) in zip(batch, views):
                out.append(InstancePrediction(name, img.shape[0], img.shape[1], scores, soft))
            bar.update(len(batch))
            if log is not None:
                log.update(len(batch))
            batch.clear()

        for name, image in named_images:
            batch.append((name, image))
            if len(batch) >= self.batch_size:
                flush()
        flush()
        bar.close()
        if log is not None:
            log.close()
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
