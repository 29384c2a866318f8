"""d2ct: class-agnostic segmentation of CT slices with Detectron2 Mask R-CNN and pseudo-labels.

Importing ``d2ct`` is cheap and needs only the standard library (the installer runs from
here before anything else exists). Stages live in sub-packages:

- ``d2ct.data``: challenge-layout I/O, COCO conversion, Detectron2 registration, phantom, volumes
- ``d2ct.config`` / ``d2ct.modeling``: ``add_d2ct_config(cfg)`` and the model parts
- ``d2ct.engine``: trainer, hooks, CPU/GPU launcher
- ``d2ct.evaluation``: ARI, Dice, class-agnostic COCO AP, Detectron2 evaluator
- ``d2ct.baseline``: the organisers' watershed baseline
- ``d2ct.pseudolabel``: radiologist weighting, partition and consensus pseudo-labelling
- ``d2ct.postprocess``: instances -> label maps
- ``d2ct.visualization``: overlays, grids, training curves
- ``d2ct.pipeline``: the whole method as resumable stages
"""

__version__ = "0.1.0"

import warnings as _warnings

# Detectron2 0.6 triggers these on import with today's PyTorch and setuptools; they are harmless
# and would otherwise open every command's output.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
_warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)
_warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
