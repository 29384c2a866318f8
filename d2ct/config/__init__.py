"""Configuration: ``add_d2ct_config(cfg)`` adds the ``D2CT.*`` keys, ``setup_cfg`` builds a frozen config."""
from .defaults import add_d2ct_config
from .setup import get_d2ct_cfg, setup_cfg

__all__ = ["add_d2ct_config", "get_d2ct_cfg", "setup_cfg"]
