#!/usr/bin/env python
"""Training seconds per iteration of each radiologist on real slices, with the real Trainer.

Runs tools/train_net.py for a few iterations per config (from-scratch GroupNorm configs, no
validation) and reads the per-iteration times Detectron2 logs in metrics.json (median after
warm-up), plus peak GPU memory from the log. Prints a markdown table next to Detectron2's
published V100 figures (16-image iterations, 800-1333 px COCO images, pretrained FrozenBN).

  python bench/gpu/train_timing.py --data datasets/openkbp_fewshot --iters 40 --batch 16 [--amp]
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED_V100 = {"r50": 0.261, "r101": 0.340, "x101": 0.690}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="input short side (train and test)")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--models", nargs="+", default=["r50", "r101", "x101"])
    p.add_argument("--out", default="/tmp/d2ct_train_timing")
    args = p.parse_args()
    rows = []
    for name in args.models:
        out = Path(args.out) / f"{name}_{args.size}_{args.batch}{'_amp' if args.amp else ''}"
        cmd = [sys.executable, str(ROOT / "tools/train_net.py"), "--config", f"configs/scratch/radiologist_{name}.yaml",
               "SOLVER.MAX_ITER", str(args.iters), "SOLVER.IMS_PER_BATCH", str(args.batch),
               "SOLVER.CHECKPOINT_PERIOD", "100000", "SOLVER.AMP.ENABLED", str(args.amp), "DATASETS.TEST", "()",
               "INPUT.MIN_SIZE_TRAIN", f"({args.size},)", "INPUT.MIN_SIZE_TEST", str(args.size),
               "DATALOADER.NUM_WORKERS", str(args.workers), "D2CT.DATA_ROOT", args.data, "OUTPUT_DIR", str(out),
               "D2CT.CURVES", "False"]
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - start
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"{name}: training failed")
        metrics = [json.loads(l) for l in (out / "metrics.json").read_text().splitlines() if l.strip()]
        times = [m["time"] for m in metrics if "time" in m]
        data_times = [m["data_time"] for m in metrics if "data_time" in m]
        mem = re.findall(r"max_mem: (\d+)M", (out / "log.txt").read_text())
        rows.append({"model": name, "size": args.size, "batch": args.batch, "amp": args.amp,
                     "s_per_iter": statistics.median(times[len(times) // 2:]) if times else float("nan"),
                     "data_time": statistics.median(data_times[len(data_times) // 2:]) if data_times else float("nan"),
                     "max_mem_MB": int(mem[-1]) if mem else None, "wall_s": round(wall, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| model | input px | images/iter | AMP | s/iter | data wait s/iter | s per 16 images | V100 published (16 img) | peak GPU MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        per16 = r["s_per_iter"] * 16 / r["batch"]
        print(f"| {r['model']} | {r['size']} | {r['batch']} | {r['amp']} | {r['s_per_iter']:.3f} | {r['data_time']:.3f} | "
              f"{per16:.3f} | {PUBLISHED_V100[r['model']]} | {r['max_mem_MB']} |")


if __name__ == "__main__":
    main()
