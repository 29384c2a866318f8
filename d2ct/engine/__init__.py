"""Training engine: Trainer, launcher (GPU/NCCL or CPU/gloo), checkpoints, weights check."""
from .launch import launch, launch_cli
from .setup import default_argument_parser, register_datasets_from_cfg, setup
from .trainer import Trainer

__all__ = ["Trainer", "default_argument_parser", "launch", "launch_cli", "register_datasets_from_cfg", "setup"]
