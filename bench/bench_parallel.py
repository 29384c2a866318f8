"""Benchmark: the radiologist stage with its trainings one after another against parallel_trainings at a time.

The pipeline's own radiologist stage (d2ct.pipeline.runner: the real ``train_net`` subprocesses,
checkpoints and final validation included) on a generated phantom at 256 px, each radiologist
trained for the same few iterations, once with ``parallel_trainings: 1`` (each training gets every
core), once with the trainings side by side (each an equal share of the cores, at least one
thread) and once more side by side with ``rebalance_threads`` (when one ends, those still running
take its threads). Each mode trains fresh models in its own folder; the table gives the stage's
wall time and the speed-ups over one at a time. The three radiologists' configs are those of a
pipeline config: the demo's (``configs/demo``) and the CPU budget ones of the OpenKBP runs
(``configs/cpu``). Usage::

    .venv/bin/python bench/bench_parallel.py [--quick] [--iters 50] [--parallel 3] [--configs cpu demo]

Run it on a quiet machine: another job on the cores slows the modes unequally.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table  # noqa: E402
from d2ct.utils.resources import cpu_threads  # noqa: E402

PIPELINES = {"demo": "configs/demo/pipeline.yaml", "cpu": "configs/cpu/pipeline_openkbp.yaml"}
CACHE = Path(tempfile.gettempdir()) / "d2ct_bench_parallel"


def stage_seconds(config: str, out: Path, phantom: dict, iters: int, parallel: int, rebalance: bool = False) -> float:
    """Wall seconds of the radiologist stage of ``config`` in a fresh ``out``, ``parallel`` at a time
    (``rebalance``: with rebalance_threads, the freed threads going to the trainings still running)."""
    import os

    from d2ct.pipeline.config import load_pipeline_config
    from d2ct.pipeline.runner import Pipeline

    shutil.rmtree(out, ignore_errors=True)
    phantom_yaml = "{" + ", ".join(f"{k}: {v}" for k, v in phantom.items()) + "}"
    cfg = load_pipeline_config(str(ROOT / config), [
        f"output_dir={out}", f"data.root={out.parent / 'phantom_{}'.format(phantom['size'])}",
        "data.name=phantom", f"data.phantom={phantom_yaml}", "data.group_by=null", "data.eval_split=auto",
        "baseline.enabled=false", f"parallel_trainings={parallel}", f"rebalance_threads={str(rebalance).lower()}",
        f"opts=[SOLVER.MAX_ITER, {iters}, SOLVER.CHECKPOINT_PERIOD, 100000, TEST.EVAL_PERIOD, 0]",
    ])
    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs' relative paths
    try:
        pipe = Pipeline(cfg)
        pipe.run(until="data")
        start = time.perf_counter()
        pipe.run(until="radiologists")
        return time.perf_counter() - start
    finally:
        os.chdir(cwd)


def run(quick: bool = False, iters: int | None = None, parallel: int = 3, configs=("demo", "cpu"),
        cache: Path = CACHE) -> list[dict]:
    iters = iters or (3 if quick else 50)
    configs = ("demo",) if quick else configs
    phantom = {"n_train": 16 if quick else 40, "n_labelled": 8 if quick else 20, "n_test": 2, "size": 256, "seed": 0}
    logging.getLogger("d2ct.pipeline").setLevel(logging.WARNING)
    rows = []
    for name in configs:
        one = stage_seconds(PIPELINES[name], cache / f"{name}_1", phantom, iters, 1)
        fixed = stage_seconds(PIPELINES[name], cache / f"{name}_{parallel}", phantom, iters, parallel)
        moving = stage_seconds(PIPELINES[name], cache / f"{name}_{parallel}_rebalance", phantom, iters, parallel, True)
        rows.append({"radiologists": f"{name} (`{PIPELINES[name]}`)", "iterations each": iters,
                     "one at a time s": round(one, 1), f"{parallel} at a time s": round(fixed, 1),
                     "speed-up": round(one / fixed, 2), "with rebalance_threads s": round(moving, 1),
                     "speed-up, rebalanced": round(one / moving, 2), "threads": cpu_threads()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the demo's radiologists, 3 iterations: checks that it runs")
    p.add_argument("--iters", type=int, help="iterations per radiologist (default 50; 3 with --quick)")
    p.add_argument("--parallel", type=int, default=3, help="trainings at a time in the second mode (default 3)")
    p.add_argument("--configs", nargs="+", choices=sorted(PIPELINES), default=["demo", "cpu"],
                   help="whose radiologists: the demo's, the CPU budget ones (default both)")
    p.add_argument("--cache", type=Path, default=CACHE, help="run folders (default: %(default)s)")
    args = p.parse_args()
    rows = run(args.quick, args.iters, args.parallel, tuple(args.configs), args.cache)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
