"""The radiologists: trained models, their validation AP, and how the pool is shared between them."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from d2ct.errors import ConfigError
from d2ct.utils.fileio import read_json

logger = logging.getLogger(__name__)


@dataclass
class Radiologist:
    """One trained model: its config, checkpoint, validation mask AP and pseudo-label threshold."""

    name: str
    config: str
    weights: str
    ap: float
    threshold: float = 0.7
    opts: list[str] = field(default_factory=list)

    @classmethod
    def from_output_dir(cls, output_dir: str | os.PathLike, *, threshold: float = 0.7, ap: float | None = None,
                        name: str | None = None, checkpoint: str | None = None) -> "Radiologist":
        """A training output folder: config.yaml, model_best.pth (else model_final.pth) and model_best.json."""
        from d2ct.engine.predictor import load_trained

        out = Path(output_dir)
        _cfg, weights = load_trained(out, checkpoint)  # checks config.yaml and the checkpoint exist
        if ap is None:
            best = out / "model_best.json"
            if not best.exists():
                raise ConfigError(
                    f"{best} is missing: the validation AP weighs the radiologists. Train with a validation "
                    "split (DATASETS.TEST) or give the AP explicitly"
                )
            info = read_json(best)
            ap = info.get("scores", {}).get("segm/AP", info.get("value"))
            if ap is None:
                raise ConfigError(f"{best}: no 'segm/AP' score")
        return cls(name=name or out.name, config=str(out / "config.yaml"), weights=weights, ap=float(ap), threshold=threshold)


def normalised_weights(aps: Sequence[float]) -> np.ndarray:
    """Validation APs -> weights summing to 1 (the published method). All zero -> equal weights."""
    aps = np.asarray(aps, dtype=np.float64)
    if len(aps) == 0:
        raise ConfigError("no radiologists given")
    if np.any(~np.isfinite(aps)) or np.any(aps < 0):
        raise ConfigError(f"validation APs must be finite and non-negative, got {aps.tolist()}")
    total = aps.sum()
    if total == 0:
        logger.warning("every radiologist has AP 0: weighing them equally")
        return np.full(len(aps), 1.0 / len(aps))
    return aps / total


def group_sizes(n: int, weights: Sequence[float]) -> list[int]:
    """Split n items into sizes proportional to the weights (largest remainder; they sum to n)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = weights / weights.sum() * n
    sizes = np.floor(exact).astype(int)
    remainder = n - sizes.sum()
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[:remainder]] += 1
    return sizes.tolist()


def partition_pool(names: Sequence[str], weights: Sequence[float], seed: int = 0) -> list[list[str]]:
    """Shuffle the pool (seeded) and cut it into groups with sizes proportional to the weights.

    Each group keeps the pool's order inside it, so the output does not depend on the shuffle
    beyond group membership.
    """
    names = list(names)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    groups, start = [], 0
    for size in group_sizes(len(names), weights):
        chosen = sorted(order[start:start + size])
        groups.append([names[i] for i in chosen])
        start += size
    return groups
