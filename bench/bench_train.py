"""Benchmark: training seconds per iteration and peak memory of each radiologist (R50, R101, X101).

For each from-scratch radiologist config (configs/scratch/radiologist_{r50,r101,x101}.yaml) at 256
and 512 px input, 2 images per iteration: the project's real training step (Trainer.build_model,
Trainer.build_optimizer with its gradient clipping, Detectron2's SimpleTrainer/AMPTrainer run_step)
on batches that d2ct's CTDatasetMapper makes from a phantom data set (write_phantom_dataset). Data
loading is excluded: the batches are mapped before the clock starts, so the figure is the model's.
Seconds per iteration are the median over several iterations after warm-up.

Each configuration runs in its own process, so its peak memory is its own: peak RSS (the process's
high-water mark, resource.getrusage) and, on a GPU, torch.cuda.max_memory_allocated. On a GPU,
Detectron2's published V100 figures are printed alongside (Mask R-CNN 3x, 8 V100s x 2 images =
16 images per iteration: R50 0.261, R101 0.340, X101-32x8d 0.690 s/iter); 2 images per GPU per
iteration is the same per-GPU load as here. Usage::

    .venv/bin/python bench/bench_train.py [--quick] [--models r50 r101] [--sizes 256] [--amp]

``--compare`` (CPU): the CPU-budget configs (configs/cpu/radiologist_{r50,r101,x101}.yaml) at 256 px,
today's float32 recipe (D2CT.CPU_BF16 False, D2CT.CHANNELS_LAST False) against the new defaults
(bfloat16 autocast + channels-last where the CPU has bfloat16), side by side: for each model one
process builds both from the same initial weights and alternates their steps on the same batches,
so the load of a shared machine falls on both alike; the ratio of the medians is the speed-up.
Memory: the rise in resident memory from just before a step to its peak (a thread samples the RSS
every 5 ms), the step's working memory; the largest over its steps::

    .venv/bin/python bench/bench_train.py --compare [--models r50] [--rounds 4]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_info, markdown_table  # noqa: E402

MODELS = {
    "r50": ("R50-FPN", "configs/scratch/radiologist_r50.yaml", 0.261),
    "r101": ("R101-FPN", "configs/scratch/radiologist_r101.yaml", 0.340),
    "x101": ("X101-32x8d-FPN", "configs/scratch/radiologist_x101.yaml", 0.690),
}
SIZES = (256, 512)
IMAGES_PER_ITER = 2
RESULT_TAG = "BENCH_TRAIN_RESULT "
COLUMNS = ["model", "input_px", "device", "img/iter", "s/iter", "img/s", "iters", "peak_RSS_GB", "peak_GPU_GB",
           "V100_s/iter (16 img)"]


def _peak_rss_gb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux
    except ImportError:  # not Linux: psutil's peak working set where it has one
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 1e9


def measure_one(model_key: str, px: int, data_root: Path, warmup: int, iters: int, amp: bool = False,
                device: str | None = None) -> dict:
    """One configuration in this process: time ``iters`` training steps after ``warmup``."""
    import itertools

    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.engine import AMPTrainer, SimpleTrainer
    from detectron2.utils.events import EventStorage

    from d2ct.config import setup_cfg
    from d2ct.data.register import register_challenge_dataset
    from d2ct.engine import Trainer
    from d2ct.engine.mapper import CTDatasetMapper

    name, config, _ = MODELS[model_key]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = setup_cfg(str(ROOT / config), [
        "MODEL.DEVICE", device,
        "INPUT.MIN_SIZE_TRAIN", f"({px},)", "INPUT.MAX_SIZE_TRAIN", str(px),
        "SOLVER.IMS_PER_BATCH", str(IMAGES_PER_ITER),
        "SOLVER.AMP.ENABLED", str(bool(amp and device == "cuda")),
        "DATALOADER.NUM_WORKERS", "0",
    ])
    torch.manual_seed(0)
    register_challenge_dataset("benchtrain", data_root, val_fraction=0.0)
    dicts = DatasetCatalog.get("benchtrain_train")
    mapper = CTDatasetMapper(cfg, is_train=True)
    n_batches = max(2, (warmup + iters + 1) // 2)
    mapped = [mapper(d) for d in itertools.islice(itertools.cycle(dicts), n_batches * IMAGES_PER_ITER)]
    batches = [mapped[i:i + IMAGES_PER_ITER] for i in range(0, len(mapped), IMAGES_PER_ITER)]

    model = Trainer.build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    step_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
    trainer = step_cls(model, itertools.cycle(batches), optimizer)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with EventStorage(0) as storage:
        trainer.storage = storage
        for i in range(warmup + iters):
            storage.iter = i
            start = time.perf_counter()
            trainer.run_step()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    row = {
        "model": name,
        "input_px": px,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "img/iter": IMAGES_PER_ITER,
        "s/iter": statistics.median(times),
        "img/s": IMAGES_PER_ITER / statistics.median(times),
        "iters": f"{iters} (+{warmup} warm-up)",
        "peak_RSS_GB": round(_peak_rss_gb(), 2),
        "times": [round(t, 4) for t in times],
    }
    if cuda:
        row["peak_GPU_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        row["V100_s/iter (16 img)"] = MODELS[model_key][2]
        row["amp"] = bool(cfg.SOLVER.AMP.ENABLED)
    return row


CPU_MODELS = {
    "r50": ("R50-FPN", "configs/cpu/radiologist_r50.yaml"),
    "r101": ("R101-FPN", "configs/cpu/radiologist_r101.yaml"),
    "x101": ("X101-32x8d-FPN", "configs/cpu/radiologist_x101.yaml"),
    # the demo's models (make demo), at their 160 px
    "demo_r50": ("demo R18", "configs/demo/radiologist_r50.yaml"),
    "demo_r101": ("demo R34", "configs/demo/radiologist_r101.yaml"),
    "demo_x101": ("demo R50-lite", "configs/demo/radiologist_x101.yaml"),
}
COMPARE_MODES = {"fp32 (today)": ["D2CT.CPU_BF16", "False", "D2CT.CHANNELS_LAST", "False"],
                 "new (bf16 + channels-last)": ["D2CT.CPU_BF16", "True", "D2CT.CHANNELS_LAST", "True"]}
COMPARE_COLUMNS = ["model", "input_px", "threads", "fp32 s/iter", "new s/iter", "speed-up", "fp32 step MB",
                   "new step MB", "bf16 active", "rounds"]


class RssPeak:
    """Peak resident memory (bytes) over a block, sampled by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval

    def __enter__(self):
        import threading

        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._proc.memory_info().rss)
                self._stop.wait(self._interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def rise_mb(self) -> float:
        return (self.peak - self.start) / 1e6


def compare_one(model_key: str, px: int, data_root: Path, rounds: int) -> dict:
    """Today's float32 step and the new one, alternately in this process, on the same batches."""
    import itertools

    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.utils.events import EventStorage

    from d2ct.config import setup_cfg
    from d2ct.data.register import register_challenge_dataset
    from d2ct.engine import Trainer, precision
    from d2ct.engine.mapper import CTDatasetMapper
    from d2ct.engine.trainer import build_step_trainer

    name, config = CPU_MODELS[model_key]
    common = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", f"({px},)", "INPUT.MAX_SIZE_TRAIN", str(2 * px),
              "SOLVER.IMS_PER_BATCH", str(IMAGES_PER_ITER), "DATALOADER.NUM_WORKERS", "0"]
    register_challenge_dataset("benchcmp", data_root, val_fraction=0.0)
    dicts = DatasetCatalog.get("benchcmp_train")
    cfgs = {mode: setup_cfg(str(ROOT / config), common + extra) for mode, extra in COMPARE_MODES.items()}
    mapper = CTDatasetMapper(cfgs["fp32 (today)"], is_train=True)
    torch.manual_seed(0)
    mapped = [mapper(d) for d in itertools.islice(itertools.cycle(dicts), (rounds + 1) * IMAGES_PER_ITER)]
    batches = [mapped[i:i + IMAGES_PER_ITER] for i in range(0, len(mapped), IMAGES_PER_ITER)]
    torch.manual_seed(0)
    state = Trainer.build_model(cfgs["fp32 (today)"]).state_dict()
    steps, times, mem = {}, {}, {}
    for mode, cfg in cfgs.items():
        model = Trainer.build_model(cfg)
        model.load_state_dict(state)
        steps[mode] = build_step_trainer(cfg, model, itertools.cycle(batches), Trainer.build_optimizer(cfg, model))
        times[mode], mem[mode] = [], []
    with EventStorage(0) as storage:
        for i in range(rounds + 1):  # round 0: warm-up
            for mode, step in steps.items():
                step.storage = storage
                storage.iter = i
                with RssPeak() as peak:
                    start = time.perf_counter()
                    step.run_step()
                    elapsed = time.perf_counter() - start
                if i:
                    times[mode].append(elapsed)
                    mem[mode].append(peak.rise_mb)
    old, new = (statistics.median(times[m]) for m in COMPARE_MODES)
    return {
        "model": name, "input_px": px, "threads": torch.get_num_threads(),
        "fp32 s/iter": old, "new s/iter": new, "speed-up": f"{old / new:.2f}x",
        "fp32 step MB": round(max(mem["fp32 (today)"])), "new step MB": round(max(mem["new (bf16 + channels-last)"])),
        "bf16 active": precision.use_cpu_bf16(cfgs["new (bf16 + channels-last)"]),
        "rounds": f"{rounds} (+1 warm-up)",
        "times": {m: [round(t, 3) for t in v] for m, v in times.items()},
    }


def run_compare(models: list[str] | None = None, rounds: int = 4, timeout: float = 3600) -> list[dict]:
    from d2ct.data.phantom import write_phantom_dataset

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_cmp_") as tmp:
        data_root = write_phantom_dataset(Path(tmp) / "phantom", n_train=8, n_labelled=8, n_test=0, size=256,
                                          seed=0, progress=False)
        for key in models or ["r50", "r101", "x101"]:
            px = 160 if key.startswith("demo") else 256
            cmd = [sys.executable, str(Path(__file__).resolve()), "--compare-child", key, "--data", str(data_root),
                   "--rounds", str(rounds), "--sizes", str(px)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
                found = [ln for ln in res.stdout.splitlines() if ln.startswith(RESULT_TAG)]
                row = json.loads(found[-1][len(RESULT_TAG):]) if found else {
                    "model": CPU_MODELS[key][0], "error": (res.stderr or res.stdout).strip()[-300:]}
            except subprocess.TimeoutExpired:
                row = {"model": CPU_MODELS[key][0], "error": f"timed out after {timeout:.0f} s"}
            print(f"  {row['model']}: {row.get('speed-up', row.get('error'))} {row.get('times', '')}",
                  file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def _child(model_key: str, px: int, data_root: Path, warmup: int, iters: int, amp: bool, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model_key, str(px), "--data", str(data_root),
           "--warmup", str(warmup), "--iters", str(iters)] + (["--amp"] if amp else [])
    name = MODELS[model_key][0]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": name, "input_px": px, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(res.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
    return {"model": name, "input_px": px, "error": f"exit {res.returncode}: {' | '.join(tail)[:300]}"}


def run(quick: bool = False, models: list[str] | None = None, sizes: list[int] | None = None,
        amp: bool = False, timeout: float = 1800) -> list[dict]:
    from d2ct.data.phantom import write_phantom_dataset

    warmup, iters = (1, 2) if quick else (2, 5)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        data_root = write_phantom_dataset(Path(tmp) / "phantom", n_train=8, n_labelled=8, n_test=0, size=256,
                                          seed=0, progress=False)
        for key in models or list(MODELS):
            for px in sizes or SIZES:
                row = _child(key, px, data_root, warmup, iters, amp, timeout)
                print(f"  {row['model']} {px}px: " + (f"{row['s/iter']:.3f} s/iter" if "s/iter" in row
                                                     else row.get("error", "")), file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed iterations (default 2 + 5)")
    ap.add_argument("--models", nargs="+", choices=list(CPU_MODELS), help="default: all three (r50 r101 x101)")
    ap.add_argument("--sizes", nargs="+", type=int, help="input sizes in px (default 256 512)")
    ap.add_argument("--amp", action="store_true", help="mixed precision (GPU only)")
    ap.add_argument("--compare", action="store_true",
                    help="CPU: today's float32 recipe vs bfloat16 + channels-last, side by side (configs/cpu)")
    ap.add_argument("--rounds", type=int, default=4, help="--compare: timed steps per mode")
    ap.add_argument("--compare-child", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "PX"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compare_child:
        row = compare_one(args.compare_child, (args.sizes or [256])[0], args.data, args.rounds)
        print(RESULT_TAG + json.dumps(row), flush=True)
        return 0
    if args.compare:
        rows = run_compare(args.models, args.rounds)
        info = machine_info()
        print(f"# bench_train --compare on {info['cpu']}, {info['cores']} cores, {info['date']}\n")
        print(markdown_table(rows, [c for c in COMPARE_COLUMNS + ["error"] if any(c in r for r in rows)]))
        return 0 if all("error" not in r for r in rows) else 1
    if args.child:
        row = measure_one(args.child[0], int(args.child[1]), args.data, args.warmup, args.iters, args.amp)
        print(RESULT_TAG + json.dumps(row), flush=True)
        return 0
    rows = run(quick=args.quick, models=args.models, sizes=args.sizes, amp=args.amp)
    info = machine_info()
    print(f"# bench_train ({'quick' if args.quick else 'full'}) on {info['cpu']}, {info['cores']} cores, "
          f"GPU {info['gpu']}, {info['date']}\n")
    print(markdown_table(rows, [c for c in COLUMNS + ["error"] if any(c in r for r in rows)]))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
