"""A 2-D U-Net peer (MONAI): foreground and boundaries -> connected components -> label map.

The approach of a 2024 challenge report (U-Net, foreground vs background, then connected
components: 0.86 validation / 0.74 test ARI), as a yardstick for the Mask R-CNN method on the
same labelled slices and the same train/validation split (``d2ct.data.register.split_names``).

Each pixel is classified as background, structure interior or structure boundary (the pixels of
a structure that touch another label, background included; ``boundary=False`` drops that
class). Structures touching each other are then told apart: the interior's connected components
are the seeds, and a watershed on the boundary probability grows them over the whole
foreground. Training uses MONAI's ``UNet`` and ``DiceCELoss``, for a number of iterations or a
wall time, whichever ends first; the checkpoint with the best validation ARI (all pixels) is kept.

Outputs (``train_unet``): ``model_best.pt`` / ``model_final.pt`` (state dict and options),
``metrics.json`` (loss and validation ARI over time).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from d2ct.errors import ConfigError, DataError
from d2ct.utils.fileio import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2


@dataclass
class UNetOptions:
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    num_res_units: int = 2
    dropout: float = 0.0
    boundary: bool = True  # a third class for the pixels between structures
    max_iter: int = 2000
    max_seconds: float = 0.0  # wall-time budget for training; 0: none
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-5
    eval_period: int = 200  # validation ARI every this many iterations (and at the end)
    min_area: int = 5  # smaller components are dropped
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        if self.max_iter < 1:
            raise ConfigError(f"U-Net: max_iter must be at least 1, got {self.max_iter}")
        if self.batch_size < 1 or self.eval_period < 1:
            raise ConfigError("U-Net: batch_size and eval_period must be at least 1")
        if len(self.channels) < 2:
            raise ConfigError(f"U-Net: give at least two channel widths, got {self.channels}")

    @property
    def classes(self) -> int:
        return 3 if self.boundary else 2

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.channels) - 1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"U-Net: device {device} asked for but no CUDA GPU is available")
    return torch.device(device)


def build_unet(options: UNetOptions) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=options.classes, channels=tuple(options.channels),
                strides=(2,) * (len(options.channels) - 1), num_res_units=options.num_res_units,
                dropout=options.dropout)


# ------------------------------------------------------------------------------------------------
# targets and label maps
# ------------------------------------------------------------------------------------------------
def pixel_classes(label_map: np.ndarray, boundary: bool = True) -> np.ndarray:
    """(H, W) int64 training target: 0 background, 1 structure, 2 boundary (a structure's pixels
    touching another label, background included)."""
    from skimage.segmentation import find_boundaries

    target = (label_map > 0).astype(np.int64)
    if boundary:
        target[find_boundaries(label_map, connectivity=1, mode="inner") & (label_map > 0)] = BOUNDARY
    return target


def label_map_from_probabilities(probs: np.ndarray, min_area: int = 5) -> np.ndarray:
    """(C, H, W) class probabilities -> uint8 label map, structures numbered 1..K by size.

    The interior's connected components are the seeds; with a boundary class a watershed on the
    boundary probability grows them over the foreground (interior or boundary), so touching
    structures stay apart. Components under ``min_area`` pixels are dropped; past 255 structures
    the smallest go (uint8 labels)."""
    from skimage.measure import label as connected
    from skimage.segmentation import watershed

    cls = probs.argmax(0)
    foreground = cls != BACKGROUND
    seeds = connected(cls == INTERIOR, connectivity=1)
    if probs.shape[0] > 2 and seeds.max() > 0:
        labels = watershed(probs[BOUNDARY], markers=seeds, mask=foreground)
    else:
        labels = connected(foreground, connectivity=1)
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    keep = [(a, i) for i, a in zip(ids, areas) if a >= min_area]
    keep.sort(key=lambda t: (-t[0], t[1]))
    out = np.zeros(labels.shape, np.uint8)
    for new, (_, old) in enumerate(keep[:255], start=1):
        out[labels == old] = new
    return out


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def _to_float(image: np.ndarray) -> np.ndarray:
    from d2ct.engine.mapper import slice_to_uint8

    return slice_to_uint8(image).astype(np.float32) / 255.0


def load_slices(dataset, names: Sequence[str], with_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, H, W) float32 images in [0, 1] and (N, H, W) uint8 label maps (None without labels)."""
    from d2ct.data.images import read_slice

    if not names:
        raise DataError(f"{dataset.root}: no slices to load")
    images = np.stack([_to_float(read_slice(dataset.image_path(n))) for n in names])
    if not with_labels:
        return images, None
    labels = []
    for n in names:
        y = dataset.label_map(n)
        if y is None:
            raise DataError(f"{dataset.root}: slice {n} has no label map")
        labels.append(y)
    return images, np.stack(labels)


def _pad(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return (F.pad(x, (0, pw, 0, ph)) if ph or pw else x), (h, w)


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, images: np.ndarray, options: UNetOptions,
                          device: torch.device, batch_size: int = 8) -> list[np.ndarray]:
    """Softmax probabilities (C, H, W) per image."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size, None]).to(device)
        x, (h, w) = _pad(x, options.multiple)
        probs = torch.softmax(model(x).float(), dim=1)[..., :h, :w]
        out += list(probs.cpu().numpy())
    return out


def predict_label_maps(model: torch.nn.Module, images: np.ndarray, options: UNetOptions,
                       device: torch.device) -> np.ndarray:
    return np.stack([label_map_from_probabilities(p, options.min_area)
                     for p in predict_probabilities(model, images, options, device, options.batch_size)])


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def _val_ari(model, images, truth, options, device) -> float:
    from d2ct.evaluation.ari import adjusted_rand_index

    maps = predict_label_maps(model, images, options, device)
    return float(np.mean([adjusted_rand_index(t, p) for t, p in zip(truth, maps)]))


def _save(path: Path, model: torch.nn.Module, options: UNetOptions, extra: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "options": dataclasses.asdict(options), **extra}, tmp)


def train_unet(train_images: np.ndarray, train_labels: np.ndarray, out_dir: str | Path, options: UNetOptions,
               val_images: np.ndarray | None = None, val_labels: np.ndarray | None = None) -> dict:
    """Train on (N, H, W) images in [0, 1] and label maps; returns a summary (also in metrics.json)."""
    from monai.losses import DiceCELoss

    options.check()
    if len(train_images) != len(train_labels) or not len(train_images):
        raise DataError(f"U-Net: {len(train_images)} training images and {len(train_labels)} label maps")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    device = resolve_device(options.device)
    model = build_unet(options).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    start = time.time()

    def progress(step: int) -> float:
        """How far training is, 0-1: by iterations, or by wall time when a budget of seconds ends it
        first (so a run stopped by --seconds still ends its cosine near zero)."""
        done = step / options.max_iter
        if options.max_seconds:
            done = max(done, (time.time() - start) / options.max_seconds)
        return min(done, 1.0)

    scheduler = torch.optim.lr_scheduler.LambdaLR(  # cosine to 0 over the budget
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * progress(step))))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    targets = np.stack([pixel_classes(y, options.boundary) for y in train_labels])
    x_all = torch.from_numpy(train_images[:, None])
    y_all = torch.from_numpy(targets[:, None])

    history, best = [], {"ARI": -math.inf, "iteration": None}
    last_loss, first_loss, it = float("nan"), float("nan"), 0
    logger.info("U-Net: %d training slices, %d validation slices, %s, up to %d iterations%s", len(train_images),
                0 if val_images is None else len(val_images), device, options.max_iter,
                f" or {options.max_seconds:.0f} s" if options.max_seconds else "")
    while it < options.max_iter:
        model.train()
        idx = rng.choice(len(x_all), size=options.batch_size, replace=len(x_all) < options.batch_size)
        x, y = x_all[idx], y_all[idx]
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)  # left/right flips, as the Mask R-CNN models get
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.where(flip[:, None, None, None], y.flip(-1), y)
        x, _ = _pad(x.to(device), options.multiple)
        y, _ = _pad(y.to(device), options.multiple)
        loss = loss_fn(model(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"U-Net: loss is {loss.item()} at iteration {it}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        it += 1
        last_loss = float(loss.item())
        if it == 1:
            first_loss = last_loss
        out_of_time = bool(options.max_seconds) and time.time() - start >= options.max_seconds
        if it % options.eval_period == 0 or it == options.max_iter or out_of_time:
            row = {"iteration": it, "seconds": round(time.time() - start, 1), "loss": last_loss,
                   "lr": optimizer.param_groups[0]["lr"]}  # the next step's
            if val_images is not None and len(val_images):
                row["val_ARI"] = _val_ari(model, val_images, val_labels, options, device)
                if row["val_ARI"] > best["ARI"]:
                    best = {"ARI": row["val_ARI"], "iteration": it}
                    _save(out / "model_best.pt", model, options, {"iteration": it, "val_ARI": row["val_ARI"]})
            history.append(row)
            logger.info("U-Net iteration %d: loss %.4f%s", it, last_loss,
                        f", validation ARI {row['val_ARI']:.4f}" if "val_ARI" in row else "")
            atomic_write_json(out / "metrics.json", {"history": history, "best": best})
        if out_of_time:
            logger.info("U-Net: wall time of %.0f s reached at iteration %d", options.max_seconds, it)
            break
    _save(out / "model_final.pt", model, options, {"iteration": it})
    if best["iteration"] is None:  # no validation split: the final model is the best one
        _save(out / "model_best.pt", model, options, {"iteration": it})
    summary = {"history": history, "best": best, "iterations": it, "seconds": round(time.time() - start, 1),
               "first_loss": first_loss, "final_loss": last_loss, "device": str(device), "options": dataclasses.asdict(options)}
    atomic_write_json(out / "metrics.json", summary)
    return summary


def load_unet(path: str | Path, device: str = "auto") -> tuple[torch.nn.Module, UNetOptions, torch.device]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"U-Net checkpoint not found: {path}")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    fields = {f.name for f in dataclasses.fields(UNetOptions)}
    options = UNetOptions(**{k: (tuple(v) if k == "channels" else v) for k, v in saved["options"].items() if k in fields})
    dev = resolve_device(device)
    model = build_unet(options)
    model.load_state_dict(saved["state_dict"])
    return model.to(dev), options, dev


# ------------------------------------------------------------------------------------------------
# the whole peer on a data set folder
# ------------------------------------------------------------------------------------------------
def run_unet_peer(data_root: str | Path, out_dir: str | Path, options: UNetOptions, *, val_fraction: float = 0.2,
                  split_seed: int = 0, group_by: str | None = None, manifest: str | None = None,
                  predict_split: str = "auto", limit: int = 0) -> dict:
    """Train on the labelled training split of a challenge-layout folder (the split the Mask R-CNN
    models use with the same ``val_fraction`` / ``split_seed`` / ``group_by``), keep the best
    checkpoint by validation ARI, predict ``predict_split`` (auto: test when it exists, else val)
    and write ``submission.csv`` in the challenge layout; when that split has labels, score it with
    d2ct's evaluation (``evaluate/summary.json``). ``limit``: at most this many training slices
    (0: all; for quick checks). Returns a summary."""
    from d2ct.data.challenge import ChallengeDataset
    from d2ct.data.register import split_names
    from d2ct.evaluation.report import evaluate_label_maps, write_report
    from d2ct.postprocess.submission import write_submission

    out = Path(out_dir)
    dataset = ChallengeDataset.open(data_root)
    split = dict(val_fraction=val_fraction, seed=split_seed, group_by=group_by, manifest=manifest)
    _, train_names = split_names(dataset, "train", **split)
    _, val_names = split_names(dataset, "val", **split)
    train_names = train_names[: limit or None]
    if not train_names:
        raise DataError(f"{data_root}: no labelled training slices")
    x_train, y_train = load_slices(dataset, train_names)
    x_val, y_val = load_slices(dataset, val_names) if val_names else (None, None)
    summary = train_unet(x_train, y_train, out, options, x_val, y_val)

    if predict_split == "auto":
        predict_split = "test" if dataset.test_split() is not None else "val"
    pred_ds, names = split_names(dataset, predict_split, **split)
    if pred_ds is None or not names:
        raise DataError(f"{data_root}: the {predict_split} split is empty: nothing to predict")
    images, truth = load_slices(pred_ds, names, with_labels=pred_ds.labels_path is not None)
    model, opts, device = load_unet(out / "model_best.pt", options.device)
    maps = predict_label_maps(model, images, opts, device)
    write_submission(out / "submission.csv", names, maps)
    summary.update(predicted_split=predict_split, predicted=len(names), submission=str(out / "submission.csv"))
    if truth is not None:
        result = evaluate_label_maps(names, truth, maps)
        write_report(result, out / "evaluate", title=f"U-Net peer ({predict_split})")
        summary["scores"] = result.summary
    atomic_write_json(out / "run.json", {k: v for k, v in summary.items() if k != "history"})
    return summary
