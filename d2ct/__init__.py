"""d2ct: class-agnostic segmentation of CT slices with Detectron2 Mask R-CNN and pseudo-labels.

Importing ``d2ct`` is cheap and needs only the standard library (the installer runs from
here before anything else exists). Stages live in sub-packages:

- ``d2ct.data``: challenge-layout I/O, COCO conversion, Detectron2 registration, phantom, volumes
- ``d2ct.config``: ``add_d2ct_config(cfg)`` (the ``D2CT.*`` keys) and ``setup_cfg``
- ``d2ct.modeling``: Detectron2 parts registered on import (pseudo-aware RPN and ROI heads)
- ``d2ct.engine``: trainer, hooks, CPU/GPU launcher, batch predictor
- ``d2ct.evaluation``: ARI, Dice, class-agnostic COCO AP, Detectron2 evaluator
- ``d2ct.baseline``: the organisers' watershed baseline
- ``d2ct.pseudolabel``: radiologist weighting, partition, consensus and ensemble pseudo-labelling
- ``d2ct.postprocess``: instances -> label maps
- ``d2ct.visualization``: overlays, grids, training curves
- ``d2ct.pipeline``: the whole method as resumable stages
- ``d2ct.peer``: the U-Net yardstick (MONAI), not a stage of the method
- ``d2ct.utils``: atomic file writes, mask IoU and RLE encoding, what the commands share
- ``d2ct.installer`` / ``d2ct.bundle``: the pinned environment, online or from an offline bundle

Each command's ``main`` lives in its stage (``d2ct.engine.train_net``, ``d2ct.pipeline.cli``, ...;
docs/ARCHITECTURE.md lists them): a console script (``d2ct-train``, ``d2ct-pipeline``, ...), a
``tools/`` shim and ``python -m <module>`` run the same code.
"""

__version__ = "0.1.0"

import warnings as _warnings

# Detectron2 0.6 triggers these on import with today's PyTorch and setuptools; they are harmless
# and would otherwise open every command's output.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
_warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning)
_warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release", category=UserWarning)
