"""Training engine: Trainer, launcher (GPU/NCCL or CPU/gloo), checkpoints, weights check."""
from .launch import launch
from .setup import default_argument_parser, register_datasets_from_cfg, setup
from .trainer import Trainer

__all__ = ["Trainer", "default_argument_parser", "launch", "register_datasets_from_cfg", "setup"]
