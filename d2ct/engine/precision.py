"""bfloat16 autocast and channels-last memory format on the CPU (D2CT.CPU_BF16, D2CT.CHANNELS_LAST).

On a CPU with native bfloat16 dot products (x86 ``avx512_bf16`` or ``amx_bf16``), oneDNN runs the
convolutions and matrix products of a Mask R-CNN about twice as fast in bfloat16 as in float32, and
channels-last (NHWC) tensors spare it the layout conversions around each convolution. Elsewhere
bfloat16 is emulated and slower than float32, so :func:`cpu_bf16_supported` decides and the
code falls back to float32 with one log line.

What stays in float32 under autocast: the weights, the optimiser state and the gradients (autocast
casts on the fly, and bfloat16 has float32's exponent range, so no GradScaler is needed); the
losses (cross-entropy, smooth L1, binary cross-entropy: PyTorch's CPU autocast runs them in float32);
and, wrapped here (:func:`keep_heads_fp32`), the small last layers that produce the RPN objectness
and deltas, the class scores and box deltas, and the mask logits: bfloat16 keeps 8 significant bits,
which would tie the scores of neighbouring instances (0.5 and 0.502 become one number) and move
thresholds. GroupNorm takes bfloat16 in and out, but PyTorch's CPU kernel accumulates its mean and
variance in float32 (tests/test_bf16.py checks it against float32 on inputs with a large mean), so
only the output's rounding differs; ROIAlign (torchvision) computes in float32 and rounds its output.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform

import torch

logger = logging.getLogger(__name__)

ENV_OVERRIDE = "D2CT_CPU_BF16"  # "0" forces float32, "1" forces bfloat16 (tests, benchmarks)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def _cpuinfo_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_supported() -> bool:
    """True when this CPU computes bfloat16 natively (avx512_bf16 / amx_bf16 in /proc/cpuinfo).

    The environment variable D2CT_CPU_BF16=0/1 overrides the detection."""
    forced = os.environ.get(ENV_OVERRIDE, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return any(flag in _cpuinfo_flags() for flag in _BF16_FLAGS)


_fallback_logged = False


def use_cpu_bf16(cfg) -> bool:
    """Whether a model of ``cfg`` runs under bfloat16 autocast: D2CT.CPU_BF16 on, the model on the
    CPU, and the CPU supports it (otherwise float32, said once per process)."""
    global _fallback_logged
    if not cfg.D2CT.CPU_BF16 or not str(cfg.MODEL.DEVICE).startswith("cpu"):
        return False
    if cpu_bf16_supported():
        return True
    if not _fallback_logged:
        logger.info("D2CT.CPU_BF16: this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16 flag): "
                    "running in float32")
        _fallback_logged = True
    return False


def autocast(enabled: bool):
    """bfloat16 autocast on the CPU when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def _fp32_forward(forward):
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        if not torch.is_autocast_enabled("cpu"):
            return forward(*args, **kwargs)
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.autocast(device_type="cpu", enabled=False):
            return forward(*args, **kwargs)

    wrapped._d2ct_fp32 = True
    return wrapped


def keep_heads_fp32(model: torch.nn.Module) -> list[str]:
    """Run the layers that output scores, box deltas and mask logits in float32 under autocast:
    the RPN's objectness and anchor-delta convolutions, the box predictor (class scores, box
    deltas) and the mask predictor. Returns the names of the wrapped modules."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    wanted = []
    rpn_head = getattr(getattr(model, "proposal_generator", None), "rpn_head", None)
    if rpn_head is not None:
        wanted += [("proposal_generator.rpn_head.objectness_logits", getattr(rpn_head, "objectness_logits", None)),
                   ("proposal_generator.rpn_head.anchor_deltas", getattr(rpn_head, "anchor_deltas", None))]
    roi = getattr(model, "roi_heads", None)
    if roi is not None:
        wanted.append(("roi_heads.box_predictor", getattr(roi, "box_predictor", None)))
        wanted.append(("roi_heads.mask_head.predictor", getattr(getattr(roi, "mask_head", None), "predictor", None)))
    done = []
    for name, module in wanted:
        if module is None or getattr(module.forward, "_d2ct_fp32", False):
            continue
        module.forward = _fp32_forward(module.forward)
        done.append(name)
    return done


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Convert the 4-D weights (convolutions) to channels-last, in place; returns the model.

    A convolution whose weight is channels-last returns a channels-last output, so the whole
    backbone, FPN and heads then run in NHWC without touching Detectron2's code; the checkpoint's
    values are unchanged (only their strides)."""
    return model.to(memory_format=torch.channels_last)


def prepare_model(model: torch.nn.Module, cfg) -> bool:
    """Apply D2CT.CHANNELS_LAST and the float32 heads of D2CT.CPU_BF16 to a built model; returns
    whether bfloat16 autocast should be used around its forward passes."""
    bf16 = use_cpu_bf16(cfg)
    if cfg.D2CT.CHANNELS_LAST and str(cfg.MODEL.DEVICE).startswith("cpu"):
        to_channels_last(model)
    if bf16:
        keep_heads_fp32(model)
    return bf16
