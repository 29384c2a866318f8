"""What this host lends a process: CPU threads and CUDA devices."""
from __future__ import annotations

import os

# a file holding the CPU threads a training may use now (the pipeline raises it when others end)
THREADS_FILE_ENV = "D2CT_THREADS_FILE"


def cpu_threads() -> int:
    """The threads this process may use: OMP_NUM_THREADS when set, else the CPUs it may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The CUDA devices this process sees, named as CUDA_VISIBLE_DEVICES names them ([] without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return [d.strip() for d in env.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]
