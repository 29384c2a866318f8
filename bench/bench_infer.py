"""Benchmark: inference milliseconds per slice and pseudo-labelling images per second.

- Inference: the R50 radiologist (configs/scratch/radiologist_r50.yaml) through d2ct's
  BatchPredictor.predict_files (PNG read, test-time resize, model, soft-mask pasting at the
  slice's size, RLE compaction), batch 1 and 4, model input 256 and 512 px (INPUT.MIN_SIZE_TEST;
  the slices are 256 px phantom slices, upsampled for 512 as the project's configs do). Median of
  several runs after one warm-up batch.
- Pseudo-labelling: d2ct.pseudolabel.run.pseudo_label_pool in partition mode with the three
  radiologists (R50, R101, X101 at their configs' 512 px test size) on a pool of phantom slices,
  everything included (predictions, overlap resolution, COCO JSON, report and overlay pictures).
- Sizes: 32 slices / a pool of 24 / 3 runs on a GPU; 8 / 6 / 2 on a CPU (seconds per slice there).

The weights are random (no trained checkpoint is assumed): a trained model keeps fewer instances
than the 100-per-image cap that random scores reach, so mask pasting is a worst case here; the
instances per slice are shown. Usage::

    .venv/bin/python bench/bench_infer.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_info, markdown_table  # noqa: E402

R50 = "configs/scratch/radiologist_r50.yaml"
RADIOLOGISTS = {"r50": R50, "r101": "configs/scratch/radiologist_r101.yaml",
                "x101": "configs/scratch/radiologist_x101.yaml"}
COLUMNS = ["task", "model", "input_px", "batch", "device", "slices", "ms/slice", "img/s", "instances/slice", "runs"]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def save_random_model(config: str, out_dir: Path, opts: list[str]) -> tuple[str, str]:
    """A randomly initialised model of ``config`` as a training output folder would hold it:
    (config.yaml, model_final.pth)."""
    import torch
    from detectron2.modeling import build_model

    from d2ct.config import setup_cfg

    cfg = setup_cfg(str(ROOT / config), opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model_final.pth"
    torch.save({"model": model.state_dict()}, weights)
    cfg_path = out_dir / "config.yaml"
    cfg_path.write_text(cfg.dump())
    return str(cfg_path), str(weights)


def bench_predict(slices: list[tuple[str, str]], px: int, batch: int, repeat: int, tmp: Path) -> dict:
    from d2ct.config import setup_cfg
    from d2ct.engine.predictor import BatchPredictor

    device = _device()
    opts = ["MODEL.DEVICE", device, "INPUT.MIN_SIZE_TEST", str(px), "INPUT.MAX_SIZE_TEST", str(px)]
    cfg_path, weights = save_random_model(R50, tmp / f"r50_{px}", opts)
    predictor = BatchPredictor(setup_cfg(cfg_path), weights, batch_size=batch)
    predictor.predict_files(slices[:batch])  # warm-up
    times, preds = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        preds = predictor.predict_files(slices)
        times.append(time.perf_counter() - start)
    t = statistics.median(times)
    return {
        "task": "inference (BatchPredictor)",
        "model": "R50-FPN",
        "input_px": px,
        "batch": batch,
        "device": _device_name(device),
        "slices": len(slices),
        "ms/slice": 1000 * t / len(slices),
        "img/s": len(slices) / t,
        "instances/slice": sum(len(p) for p in preds) / len(preds),
        "runs": repeat,
    }


def bench_pseudolabel(pool: list[tuple[str, str, int]], repeat: int, tmp: Path) -> dict:
    from d2ct.pseudolabel.radiologists import Radiologist
    from d2ct.pseudolabel.run import pseudo_label_pool

    device = _device()
    models = []
    for i, (name, config) in enumerate(RADIOLOGISTS.items()):
        cfg_path, weights = save_random_model(config, tmp / f"pl_{name}", ["MODEL.DEVICE", device])
        models.append(Radiologist(name=name, config=cfg_path, weights=weights, ap=0.3 + 0.1 * i, threshold=0.5))
    times, stats = [], {}
    for r in range(repeat):
        start = time.perf_counter()
        stats = pseudo_label_pool(models, pool, tmp / f"pl_out_{r}", mode="partition", batch_size=4) or {}
        times.append(time.perf_counter() - start)
    t = statistics.median(times)
    return {
        "task": "pseudo-labelling (partition, 3 radiologists)",
        "model": "R50 + R101 + X101",
        "input_px": 512,
        "batch": 4,
        "device": _device_name(device),
        "slices": len(pool),
        "ms/slice": 1000 * t / len(pool),
        "img/s": len(pool) / t,
        "instances/slice": stats.get("instances", 0) / max(1, len(pool)),
        "runs": repeat,
    }


def run(quick: bool = False) -> list[dict]:
    import logging

    from d2ct.data.phantom import write_phantom_dataset

    logging.getLogger("d2ct").setLevel(logging.WARNING)
    # On a CPU a slice takes seconds with random weights (100 instances through the mask head):
    # the full run there uses fewer slices so that it ends in minutes rather than hours.
    on_gpu = _device() == "cuda"
    n_slices, n_pool, repeat = (8, 6, 2) if quick else ((32, 24, 3) if on_gpu else (8, 6, 2))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        tmp = Path(tmp)
        root = write_phantom_dataset(tmp / "phantom", n_train=n_pool, n_labelled=0, n_test=n_slices, size=256,
                                     seed=0, progress=False)
        slices = [(p.name, str(p)) for p in sorted((root / "test-images").glob("*.png"),
                                                   key=lambda p: int(p.stem))]
        for px in (256, 512):
            for batch in (1, 4):
                rows.append(bench_predict(slices, px, batch, repeat, tmp))
                print(f"  R50 {px}px batch {batch}: {rows[-1]['ms/slice']:.0f} ms/slice", file=sys.stderr, flush=True)
        pool = [(p.name, str(p), i) for i, p in enumerate(sorted((root / "train-images").glob("*.png"),
                                                                key=lambda p: int(p.stem)))]
        rows.append(bench_pseudolabel(pool, 1 if quick else 2, tmp))
        print(f"  pseudo-labelling: {rows[-1]['img/s']:.2f} img/s", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 slices, pool of 6, fewer runs (default 32, 24)")
    args = ap.parse_args(argv)
    rows = run(quick=args.quick)
    info = machine_info()
    print(f"# bench_infer ({'quick' if args.quick else 'full'}) on {info['cpu']}, {info['cores']} cores, "
          f"GPU {info['gpu']}, {info['date']}\n")
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
