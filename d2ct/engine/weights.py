"""Pretrained backbone weights: fetch them when possible, say exactly what to do when not."""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from detectron2.utils.file_io import PathManager

from d2ct.errors import ConfigError, WeightsUnavailableError

logger = logging.getLogger(__name__)

REMOTE_PREFIXES = ("detectron2://", "http://", "https://", "catalog://")


def scratch_variant(config_file: str | None) -> str | None:
    """configs/radiologist_r50.yaml -> configs/scratch/radiologist_r50.yaml, when that file exists."""
    if not config_file:
        return None
    path = Path(config_file)
    candidate = path.parent / "scratch" / path.name
    return str(candidate) if candidate.exists() else None


def _advice(config_file: str | None, weights: str) -> str:
    scratch = scratch_variant(config_file)
    options = [
        f"download {weights} on a machine with internet access and pass its local path: "
        f"MODEL.WEIGHTS /path/to/{os.path.basename(weights)}",
    ]
    if scratch:
        options.append(f"train from scratch with {scratch} (GroupNorm, BACKBONE.FREEZE_AT=0, MODEL.WEIGHTS \"\")")
    else:
        options.append("train from scratch with a config under configs/scratch/ (GroupNorm, BACKBONE.FREEZE_AT=0, MODEL.WEIGHTS \"\")")
    return "; or ".join(options)


def resolve_weights(cfg, config_file: str | None = None, timeout_s: float = 60.0) -> str:
    """Check that MODEL.WEIGHTS can be loaded before any training starts; return its local path ('' = none).

    Remote weights are fetched (and cached) through Detectron2's PathManager; failure raises
    WeightsUnavailableError naming the from-scratch config and MODEL.WEIGHTS.
    """
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        if cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT > 0:
            raise ConfigError(
                "MODEL.WEIGHTS is empty but the backbone uses FrozenBN with BACKBONE.FREEZE_AT="
                f"{cfg.MODEL.BACKBONE.FREEZE_AT}: from random initialisation that diverges. Use a config "
                "under configs/scratch/ (GroupNorm, FREEZE_AT=0) or set MODEL.WEIGHTS."
            )
        return ""
    if weights.startswith(REMOTE_PREFIXES):
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout_s)
        try:
            local = PathManager.get_local_path(weights)
        except Exception as e:  # network errors come in many types (URLError, OSError, HTTPError...)
            raise WeightsUnavailableError(
                f"cannot fetch the pretrained weights MODEL.WEIGHTS={weights} ({type(e).__name__}: {e}). "
                + _advice(config_file, weights)
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
        logger.info("Pretrained weights %s -> %s", weights, local)
        return local
    if not os.path.exists(weights):
        raise WeightsUnavailableError(f"MODEL.WEIGHTS={weights}: no such file. " + _advice(config_file, weights))
    return weights
