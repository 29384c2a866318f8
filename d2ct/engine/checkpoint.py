"""Checkpoints that are never half-written, and a best-checkpoint hook that survives resumes."""
from __future__ import annotations

import json
import logging
import math
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import hooks

from d2ct.errors import DataError
from d2ct.utils.fileio import atomic_path, atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

BEST_PREFIX = "model_best"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, str]:
    """(content, SHA-256) of a d2ct/Detectron2 ``.pth`` checkpoint, read once and only as data
    (``weights_only=True``: tensors and plain containers; a pickle that would run code is refused).

    A file that cannot be read so (random bytes, truncated by a full disk or an interrupted copy,
    another format, or holding arbitrary objects) raises DataError naming it; there is no fallback
    to another checkpoint and no advice to load it unsafely."""
    import hashlib
    import io

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    digest = hashlib.sha256(raw).hexdigest()
    try:
        data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        first = (str(e).strip().splitlines() or [""])[0]
        if "weights_only" in str(e) or "Weights only load failed" in first:
            # torch's message suggests weights_only=False, i.e. running the file's code: never relay it
            reason = "it is not a plain-data PyTorch checkpoint (random or damaged bytes, or pickled objects)"
        else:
            reason = f"{type(e).__name__}: {first[:200]}"
        raise DataError(
            f"{path}: the checkpoint is damaged or not a d2ct checkpoint ({reason}); it was not loaded. "
            f"Restore it from a copy or train again ({len(raw)} bytes, sha256 {digest[:12]}...)"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("model", data), dict):  # e.g. a bare tensor
        raise DataError(f"{path}: not a d2ct checkpoint (expected a dict with a 'model' state dict, "
                        f"got {type(data).__name__}); it was not loaded")
    return data, digest


class VerifiedCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that reads ``.pth`` files through :func:`read_checkpoint` (one clear
    error for a damaged file) and keeps the SHA-256 of the last file it loaded in ``sha256``."""

    sha256: str | None = None

    def _load_file(self, filename: str):
        if filename.endswith((".pkl", ".pyth")):
            return super()._load_file(filename)  # Detectron2 model-zoo / pycls pretrained weights
        data, self.sha256 = read_checkpoint(filename)
        # as DetectionCheckpointer does for a bare state dict
        return data if "model" in data else {"model": data, "matching_heuristics": True}


def load_checkpoint(model, path: str | os.PathLike) -> str | None:
    """Load ``path`` into ``model`` (verified, weights only); return its SHA-256 (None for .pkl/.pyth)."""
    checkpointer = VerifiedCheckpointer(model)
    checkpointer.load(os.fspath(path))
    return checkpointer.sha256


class AtomicCheckpointer(VerifiedCheckpointer):
    """DetectionCheckpointer whose files appear only when complete (temp file + rename).

    ``model_best`` is not tagged as the last checkpoint: resuming must continue from the latest
    periodic checkpoint, not from whichever iteration happened to score best.
    """

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        with atomic_path(save_file) as tmp:
            torch.save(data, tmp)
        if not name.startswith(BEST_PREFIX):
            atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), basename)


def _flatten_results(results: dict) -> dict:
    flat = {}
    for task, metrics in (results or {}).items():
        if isinstance(metrics, dict):
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    flat[f"{task}/{key}"] = float(value)
    return flat


def iterations_trained(iteration: int, max_iter: int) -> int:
    """Iterations done when Detectron2 filed an evaluation under ``iteration``: periodic ones go
    under the last iteration's index (299 after 300), the final one under max_iter (1200 after 1200)."""
    return min(int(iteration) + 1, int(max_iter))


class BestCheckpointer(hooks.BestCheckpointer):
    """Keeps ``model_best.pth`` by the validation metric and writes ``model_best.json`` beside it.

    The JSON holds the metric, its value and iteration, and every validation score at that
    iteration; the pseudo-labelling stage weighs the radiologists by it. On resume the previous
    best is read back, so a worse score after a restart does not replace a better checkpoint.
    """

    def __init__(self, eval_period: int, checkpointer, val_metric: str, output_dir: str, extra: dict | None = None):
        super().__init__(eval_period, checkpointer, val_metric, mode="max", file_prefix=BEST_PREFIX)
        self._json_path = os.path.join(output_dir, f"{BEST_PREFIX}.json")
        self._extra = extra or {}

    def before_train(self):
        if os.path.exists(self._json_path) and os.path.exists(self._json_path[: -len(".json")] + ".pth"):
            try:
                previous = read_json(self._json_path)
                self.best_metric = float(previous["value"])
                self.best_iter = int(previous["iteration"])
                self._logger.info(
                    "Resuming best-checkpoint tracking: %s=%.4f at iteration %d",
                    self._val_metric, self.best_metric, self.best_iter,
                )
            except (KeyError, ValueError, json.JSONDecodeError) as e:
                self._logger.warning("Ignoring unreadable %s: %s", self._json_path, e)

    def _best_checking(self):
        latest = self.trainer.storage.latest().get(self._val_metric)
        if latest is None:
            self._logger.warning("Validation metric %s was not computed: no best checkpoint", self._val_metric)
            return
        value, iteration = latest
        if math.isnan(value) or math.isinf(value):
            return
        if self.best_metric is not None and not value > self.best_metric:
            self._logger.info(
                "%s=%.4f is not better than %.4f (iteration %d): model_best unchanged",
                self._val_metric, value, self.best_metric, self.best_iter,
            )
            return
        # Checkpoint first, JSON second: the JSON never names scores its checkpoint lacks.
        self._checkpointer.save(BEST_PREFIX, iteration=iteration)
        self.best_metric, self.best_iter = float(value), int(iteration)
        results = getattr(self.trainer, "_last_eval_results", None) or {}
        atomic_write_json(
            self._json_path,
            {
                "metric": self._val_metric,
                "value": self.best_metric,
                "iteration": self.best_iter,
                "iterations_trained": iterations_trained(self.best_iter, self.trainer.max_iter),
                "checkpoint": f"{BEST_PREFIX}.pth",
                "scores": _flatten_results(results),
                **self._extra,
            },
        )
        self._logger.info("New best %s=%.4f at iteration %d: saved %s.pth", self._val_metric, value, iteration, BEST_PREFIX)
