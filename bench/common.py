"""Shared benchmark helpers: median timings, machine description, markdown tables.

Each bench/bench_<area>.py exposes ``run(quick: bool = False) -> list[dict]`` (one dict per
table row) and prints its table when run as a script; bench/run_all.py collects them all.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable, Sequence


def median_time(fn: Callable[[], object], repeat: int = 3, warmup: int = 0) -> tuple[float, list[float]]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times; return (median seconds, all times)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
        "gpu": "none",
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"
