"""Shared fixtures: a tiny phantom data set and a tiny trained model (real training, CPU)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def default_sigint() -> None:
    """Popen's preexec_fn: the child starts with Ctrl-C's default disposition, as from a terminal. A
    shell's background job (``make test &``) ignores SIGINT, and an ignored signal stays ignored
    across exec, so Python would never raise KeyboardInterrupt and a Ctrl-C test would hang."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Overrides that make any d2ct config train in seconds on the CPU: tiny slices, 2 images per step.
TINY_OPTS = [
    "MODEL.DEVICE", "cpu",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "400",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "200", "MODEL.RPN.PRE_NMS_TOPK_TEST", "400",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
]


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int):
    """An (h, w) boolean mask with the rectangle [y0:y1, x0:x1] set."""
    import numpy as np

    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def run_tool(tool: str, *args, check: bool = True, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run tools/<tool> in a subprocess from the project root; output captured as text."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([PYTHON, str(ROOT / "tools" / tool), *[str(a) for a in args]], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """16 train slices (8 labelled, 8 unlabelled) and 3 labelled test slices, 96 x 96."""
    from d2ct.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("tiny_phantom") / "phantom"
    write_phantom_dataset(root, n_train=16, n_labelled=8, n_test=3, size=96, seed=3, progress=False)
    return root


def train_tiny(config: str, data_root: Path, out_dir: Path, *extra: str) -> Path:
    run_tool("train_net.py", "--config", config, *TINY_OPTS, "D2CT.DATA_ROOT", data_root, "OUTPUT_DIR", out_dir, *extra)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model(tiny_phantom, tmp_path_factory) -> Path:
    """A demo radiologist trained for 2 iterations, evaluated on the validation split."""
    out = tmp_path_factory.mktemp("tiny_model") / "r50"
    return train_tiny("configs/demo/radiologist_r50.yaml", tiny_phantom, out)
