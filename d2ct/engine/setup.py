"""Command-line setup shared by the tools: argument parser, config, logging, data registration."""
from __future__ import annotations

import argparse
import logging
import os

from detectron2.engine import default_argument_parser as d2_argument_parser
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from d2ct.config import setup_cfg

logger = logging.getLogger(__name__)


def default_argument_parser(description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """Detectron2's parser (--config-file, --resume, --eval-only, --num-gpus, --num-machines,
    --machine-rank, --dist-url, trailing KEY VALUE overrides) plus ``--config`` as an alias."""
    parser = d2_argument_parser(epilog)
    if description:
        parser.description = description
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", dest="config_file", metavar="FILE", help="same as --config-file")
    for action in parser._actions:
        if action.dest == "num_gpus":
            action.help = "processes per machine: GPUs, or CPU processes (gloo) on a host without CUDA"
    return parser


def register_datasets_from_cfg(cfg) -> dict[str, str]:
    """Register the data set folder (D2CT.DATA_ROOT as D2CT.DATA_NAME) and any pseudo-label files."""
    from d2ct.data.register import register_challenge_dataset, register_coco_json

    d2 = cfg.D2CT
    names = register_challenge_dataset(
        d2.DATA_NAME, d2.DATA_ROOT, val_fraction=d2.VAL_FRACTION, seed=d2.SPLIT_SEED,
        group_by=d2.SPLIT_GROUP_BY or None, manifest=d2.MANIFEST or None,
        split_components=d2.SPLIT_COMPONENTS, min_area=d2.MIN_AREA, split_file=d2.SPLIT_FILE or None,
    )
    for i, path in enumerate(d2.PSEUDO_LABELS):
        name = f"{d2.DATA_NAME}_pseudo" + (str(i) if i else "")
        names[name] = register_coco_json(name, path)
    return names


def setup(args, *, register: bool = True, check_weights: bool = True):
    """Config from args, Detectron2's default_setup (output folder, logs, config dump, seeds),
    data registration and the pretrained-weights check. Returns the frozen config."""
    from d2ct.engine.weights import resolve_weights

    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    if check_weights and cfg.D2CT.CHECK_WEIGHTS and not getattr(args, "eval_only", False):
        resolve_weights(cfg, args.config_file)
    cfg.freeze()
    from d2ct.utils.fileio import check_writable

    check_writable(cfg.OUTPUT_DIR, kind="dir", option="OUTPUT_DIR")  # before the weights, data and training
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    default_setup(cfg, args)
    # d2ct's own messages go to the same console and log.txt as Detectron2's
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2ct", abbrev_name="d2ct")
    if register:
        register_datasets_from_cfg(cfg)
        check_dataset_names(cfg)
    return cfg


def check_dataset_names(cfg) -> None:
    """A ConfigError naming the option when DATASETS.TRAIN / TEST name a data set nobody registered
    (typically a config written for another D2CT.DATA_NAME), instead of Detectron2's KeyError."""
    from detectron2.data import DatasetCatalog

    from d2ct.errors import ConfigError

    registered = set(DatasetCatalog.list())
    for option in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[option]:
            if name not in registered:
                ours = sorted(n for n in registered if n.startswith(f"{cfg.D2CT.DATA_NAME}_"))
                raise ConfigError(
                    f"DATASETS.{option} names {name!r}, which is not registered; D2CT.DATA_NAME="
                    f"{cfg.D2CT.DATA_NAME!r} from D2CT.DATA_ROOT={cfg.D2CT.DATA_ROOT!r} gives "
                    f"{', '.join(ours) or 'nothing'} (pseudo-labels: D2CT.PSEUDO_LABELS)")
