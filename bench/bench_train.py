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
    ap.add_argument("--models", nargs="+", choices=list(MODELS), help="default: all three")
    ap.add_argument("--sizes", nargs="+", type=int, help="input sizes in px (default 256 512)")
    ap.add_argument("--amp", action="store_true", help="mixed precision (GPU only)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "PX"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
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
