"""Model noise for a student (Noisy Student, Xie et al. 2020): stochastic depth and dropout.

Noisy Student trains its student with stochastic depth (Huang et al. 2016) in the backbone and
dropout before the classifier, on top of strong augmentation; a student without them learns to copy
its teacher. Detectron2's Mask R-CNN has neither, so ``apply_model_noise(model, cfg)`` (called by
d2ct's Trainer when it builds the model) adds them to a built model:

- ``D2CT.MODEL_NOISE.DROP_PATH`` (stochastic depth): each residual block of the ResNet backbone
  skips its residual branch for a whole image with probability ``p_i`` while training (the block
  passes only its shortcut; kept branches are scaled by ``1 / (1 - p_i)``). ``p_i`` grows linearly
  with depth, from ``DROP_PATH / n`` at the first block to ``DROP_PATH`` at the last (the linear
  decay rule of Huang et al.; Noisy Student's 0.2 at the last block).
- ``D2CT.MODEL_NOISE.BOX_HEAD_DROPOUT``: dropout after each fully connected layer of the box head
  (Detectron2's ``FastRCNNConvFCHead``), before the class scores and box deltas.

Both act in training mode only; in eval mode (validation, prediction, an EMA teacher) the model is
the same function as without them. Parameter names do not change (the residual branch's last
convolution changes class, the box head's ReLUs become ReLU + Dropout), so a checkpoint trained with
noise loads into a model without it and the other way round: a noisy student warm-starts from a
radiologist, and its ``model_best.pth`` predicts through any d2ct or Detectron2 model.
"""
from __future__ import annotations

import torch
from detectron2.layers import Conv2d
from torch import nn
from torchvision.ops import stochastic_depth

from d2ct.errors import ConfigError


class DropPathConv2d(Conv2d):
    """The last convolution of a residual branch (with its norm), followed by stochastic depth.

    A block computes ``relu(branch(x) + shortcut(x))`` and ``branch`` ends with this convolution,
    so dropping its output for an image is dropping the block's residual branch for it (torchvision's
    ``stochastic_depth``, mode "row": one draw per image). Made from an existing ``Conv2d`` by
    changing its class (``residual_blocks`` below), which keeps its parameters and their names."""

    drop_prob: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return stochastic_depth(out, self.drop_prob, "row", self.training)


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ResNet blocks of a model's backbone, shallow to deep, as ``(name, block)``: the modules
    of ``backbone[.bottom_up].res2`` ... ``res5``."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    backbone = getattr(model, "backbone", None)
    resnet = getattr(backbone, "bottom_up", backbone)
    stages = getattr(resnet, "stage_names", None)
    if not stages:
        raise ConfigError("D2CT.MODEL_NOISE.DROP_PATH needs a ResNet backbone (Detectron2's ResNet, alone or "
                          f"under an FPN); this model's backbone is {type(backbone).__name__}")
    return [(f"{name}.{i}", block) for name in stages for i, block in enumerate(getattr(resnet, name))]


def _branch_end(block: nn.Module) -> str:
    """Name of the convolution that ends a block's residual branch: conv3 in a bottleneck block,
    conv2 in a basic block (ResNet-18/34)."""
    for name in ("conv3", "conv2"):
        if isinstance(getattr(block, name, None), Conv2d):
            return name
    raise ConfigError(f"D2CT.MODEL_NOISE.DROP_PATH: a backbone block of type {type(block).__name__} has no "
                      "conv3 or conv2 ending its residual branch")


def add_stochastic_depth(model: nn.Module, rate: float) -> list[float]:
    """Give every residual block of the backbone a drop probability growing linearly to ``rate`` at
    the deepest block, in place; returns the probabilities, shallow to deep."""
    blocks = residual_blocks(model)
    probs = [rate * (i + 1) / len(blocks) for i in range(len(blocks))]
    for (_, block), p in zip(blocks, probs):
        conv = getattr(block, _branch_end(block))
        conv.__class__ = DropPathConv2d
        conv.drop_prob = p
    return probs


def add_box_head_dropout(model: nn.Module, p: float) -> list[str]:
    """Dropout after each fully connected layer's ReLU in the box head, in place; returns the names
    of the layers changed (``roi_heads.box_head.fc_relu1`` ...)."""
    model = getattr(model, "module", model)
    head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    names = [n for n, m in (head.named_children() if head is not None else []) if n.startswith("fc_relu")]
    if not names:
        raise ConfigError("D2CT.MODEL_NOISE.BOX_HEAD_DROPOUT needs a box head with fully connected layers "
                          "(MODEL.ROI_BOX_HEAD.NAME FastRCNNConvFCHead with NUM_FC >= 1)")
    for name in names:
        # same place in the head's ordered children, no parameters: checkpoints are unchanged
        setattr(head, name, nn.Sequential(nn.ReLU(), nn.Dropout(p)))
    return [f"roi_heads.box_head.{n}" for n in names]


def check_model_noise(cfg) -> None:
    """Refuse out-of-range rates, naming the key."""
    for key in ("DROP_PATH", "BOX_HEAD_DROPOUT"):
        value = cfg.D2CT.MODEL_NOISE.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ConfigError(f"D2CT.MODEL_NOISE.{key} must be a probability in [0, 1), got {value!r}")


def apply_model_noise(model: nn.Module, cfg) -> dict:
    """Add the model noise ``cfg.D2CT.MODEL_NOISE`` asks for to a built model, in place; returns
    what was added (empty when both rates are 0, the default)."""
    check_model_noise(cfg)
    noise = cfg.D2CT.MODEL_NOISE
    added = {}
    if noise.DROP_PATH > 0:
        added["drop_path"] = add_stochastic_depth(model, float(noise.DROP_PATH))
    if noise.BOX_HEAD_DROPOUT > 0:
        added["box_head_dropout"] = add_box_head_dropout(model, float(noise.BOX_HEAD_DROPOUT))
    return added
