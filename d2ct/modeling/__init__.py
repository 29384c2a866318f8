"""Detectron2 parts d2ct adds, registered in Detectron2's registries on import (as PointRend does)."""
from .pseudo_negatives import PseudoAwareROIHeads, PseudoAwareRPN, apply_pseudo_negatives  # noqa: F401
from .model_noise import apply_model_noise, check_model_noise  # noqa: F401
