"""Build a d2ct config from a YAML file and ``KEY VALUE`` overrides."""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
from detectron2.config import CfgNode, get_cfg

from d2ct.errors import ConfigError

from .defaults import add_d2ct_config

logger = logging.getLogger(__name__)


def get_d2ct_cfg() -> CfgNode:
    """Detectron2's defaults plus the D2CT keys."""
    return add_d2ct_config(get_cfg())


def _check_yaml_mapping(path: str) -> None:
    """A config file (and each _BASE_ it names) must be a YAML mapping: an empty or malformed file
    is a ConfigError naming it, not a TypeError deep in yacs."""
    import yaml

    seen = set()
    todo = [os.path.abspath(path)]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(p, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: its _BASE_ {p} does not exist") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            what = "empty" if data is None else f"a {type(data).__name__}, not a mapping of config keys"
            raise ConfigError(f"{p}: the config file is {what}")
        base = data.get("_BASE_")
        if isinstance(base, str) and not base.startswith(("catalog://", "detectron2://")):
            todo.append(os.path.join(os.path.dirname(p), base))


def _type_mismatch(error: ValueError) -> str:
    """yacs' 'Type mismatch (A vs. B) with values (<whole section>) for config key: K' in one line."""
    text = str(error)
    key = text.rsplit("for config key:", 1)[-1].strip() if "for config key:" in text else None
    if text.startswith("Type mismatch") and key:
        kinds = text[text.index("(") + 1: text.index(")")].replace("<class '", "").replace("'>", "")
        return f"config key {key} has the wrong type ({kinds.replace(' vs. ', ' expected, got ')})"
    return text.splitlines()[0]


def setup_cfg(config_file: str | None, opts: Sequence[str] = (), *, freeze: bool = True,
              quiet: bool = False) -> CfgNode:
    """Merge ``config_file`` and ``opts`` into the d2ct defaults and adapt to this host.

    A config that asks for CUDA on a host without a GPU runs on the CPU (logged unless ``quiet``),
    and mixed precision, which Detectron2 supports on CUDA only, is switched off there.
    """
    log = logger.debug if quiet else logger.warning
    cfg = get_d2ct_cfg()
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file not found: {config_file}")
        _check_yaml_mapping(config_file)
        try:
            cfg.merge_from_file(config_file)
        except FileNotFoundError as e:  # a _BASE_ that does not exist
            raise ConfigError(f"{config_file}: {e}") from e
        except AssertionError as e:
            raise ConfigError(f"{config_file}: {e}") from e
        except KeyError as e:
            raise ConfigError(f"{config_file}: unknown config key {e}") from e
        except ValueError as e:  # yacs: a value of the wrong type; its message dumps whole sections
            raise ConfigError(f"{config_file}: {_type_mismatch(e)}") from None
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
        try:
            cfg.merge_from_list(list(opts))
        except (KeyError, AssertionError, ValueError) as e:
            raise ConfigError(f"bad override {list(opts)}: {e}") from e
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        log("MODEL.DEVICE=%s but no CUDA GPU is available: running on the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        log("SOLVER.AMP.ENABLED needs CUDA: mixed precision is off on the CPU")
        cfg.SOLVER.AMP.ENABLED = False
    if cfg.D2CT.BEST_METRIC and "/" not in cfg.D2CT.BEST_METRIC:
        raise ConfigError(f"D2CT.BEST_METRIC must look like 'segm/AP' or 'ct/ARI', got {cfg.D2CT.BEST_METRIC!r}")
    from d2ct.modeling import apply_pseudo_negatives, check_model_noise  # registers d2ct's model parts

    apply_pseudo_negatives(cfg)
    check_model_noise(cfg)
    from d2ct.engine.mean_teacher import check_mean_teacher

    check_mean_teacher(cfg)
    if freeze:
        cfg.freeze()
    return cfg
