#!/usr/bin/env python
"""The checks and measurements of bench/gpu/device_run.sh, one step per call.

  python bench/gpu/device_checks.py STEP --out DIR --data DATA [--smoke] [--budget-s S]

Steps (each adds its part to DIR/results.json and rewrites DIR/results.md, atomically, as soon as
it has it, so a run cut short still leaves what finished):
  env        versions, GPU, the Detectron2 build (compiled-op stand-in) and its hook
  train      every radiologist config (configs/scratch) x fp32 / AMP: a few real Trainer iterations
             on the OpenKBP training split; seconds per iteration, data-loader wait, peak memory
  nccl       a 1-GPU launch through Detectron2's NCCL worker (_distributed_worker), DDP-wrapped
  short_run  the from-scratch R50 for about --budget-s seconds, then a BatchPredictor call on the
             test patients: ARI / Dice / mask AP, and inference ms per slice at 256 and 512 px
  table      rewrite results.md only
  timing     record the wall time and exit status of one part of device_run.sh (--part --seconds --rc)

--smoke sizes everything for a 2-core CPU host (tiny inputs, 2 images per iteration, a few
iterations); CUDA-only checks (AMP, NCCL, GPU memory) are reported as skipped there, not faked.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODELS = ["r50", "r101", "x101"]
# Detectron2 MODEL_ZOO, Mask R-CNN 3x, 8 x V100, 16 images per iteration at about 800-1333 px.
PUBLISHED_V100 = {"r50": 0.261, "r101": 0.340, "x101": 0.690}
DATA_NAME = "openkbp"
LOG = logging.getLogger("d2ct.gpu")

# Overrides that shrink any config to a CPU smoke size (as tests/conftest.py TINY_OPTS).
SMOKE_OPTS = [
    "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MAX_SIZE_TEST", "160",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "200", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "400",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "200", "MODEL.RPN.PRE_NMS_TOPK_TEST", "400",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64", "TEST.DETECTIONS_PER_IMAGE", "20",
]


# ----------------------------------------------------------------------------------------------
# results file
# ----------------------------------------------------------------------------------------------
def results_path(out: Path) -> Path:
    return out / "results.json"


def load_results(out: Path) -> dict:
    p = results_path(out)
    return json.loads(p.read_text()) if p.exists() else {"steps": {}}


def _clean(obj):
    """JSON-safe: NaN/inf become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def save_step(out: Path, step: str, data: dict) -> None:
    """Merge one step's (partial or final) results into results.json and rewrite results.md."""
    from d2ct.utils.fileio import atomic_write_json, atomic_write_text

    results = load_results(out)
    results["steps"][step] = _clean(data)
    atomic_write_json(results_path(out), results, indent=1)
    atomic_write_text(out / "results.md", render_markdown(results))


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def render_markdown(results: dict) -> str:
    steps = results.get("steps", {})
    lines = ["# d2ct on the GPU machine (bench/gpu/device_run.sh)", ""]
    env = steps.get("env")
    if env:
        lines += [f"Mode: {'smoke (CPU host, tiny sizes)' if env.get('smoke') else 'full'}. "
                  f"Python {env.get('python')}, torch {env.get('torch')}, torchvision {env.get('torchvision')}, "
                  f"detectron2 {env.get('detectron2')} (compiled ops: {env.get('compiled_ops')}), "
                  f"numpy {env.get('numpy')}; device: {env.get('device')}.", ""]
    checks = []
    for name, step in steps.items():
        for c in step.get("checks", []):
            checks.append((name, c))
    if checks:
        lines += ["## Checks", "", "| step | check | status | detail |", "|---|---|---|---|"]
        for name, c in checks:
            lines.append(f"| {name} | {c['check']} | {c['status']} | {str(c.get('detail', '')).replace('|', '/')} |")
        lines.append("")
    train = steps.get("train", {}).get("runs", [])
    if train:
        lines += ["## Training speed (configs/scratch radiologists, OpenKBP slices upsampled to the input size)", "",
                  "| model | input px | images/iter | AMP | s/iter | data wait s/iter | s per 16 images | "
                  "V100 published s/iter (16 img, ~800-1333 px COCO) | peak GPU MiB | iters timed | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in train:
            per16 = r["s_per_iter"] * 16 / r["batch"] if r.get("s_per_iter") else None
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['amp']} | {_f(r.get('s_per_iter'))} | "
                         f"{_f(r.get('data_time'))} | {_f(per16)} | {PUBLISHED_V100[r['model']]} | "
                         f"{_f(r.get('peak_mem_mib'), '{:.0f}')} | {r.get('iters_timed', '-')} | {r['status']} |")
        lines.append("")
    short = steps.get("short_run")
    if short:
        tr = short.get("training", {})
        lines += ["## Short real run: from-scratch R50 on OpenKBP (patient hold-out)", "",
                  f"{tr.get('iters_done', '-')} of {tr.get('max_iter', '-')} iterations of {tr.get('batch', '-')} "
                  f"images (AMP {tr.get('amp')}) in {_f(tr.get('train_s'), '{:.0f}')} s "
                  f"({_f(tr.get('s_per_iter'))} s/iter); {tr.get('train_images', '-')} training slices, "
                  f"{short.get('test', {}).get('n_images', '-')} test-patient slices.", ""]
        q = short.get("test")
        if q:
            lines += ["| split | slices | ARI | ARI fg | Dice | mask AP | AP50 | recall@0.5 | precision@0.5 |",
                      "|---|---|---|---|---|---|---|---|---|",
                      f"| test patients | {q.get('n_images')} | {_f(q.get('ARI'))} | {_f(q.get('ARI_fg'))} | "
                      f"{_f(q.get('Dice'))} | {_f(q.get('AP'), '{:.1f}')} | {_f(q.get('AP50'), '{:.1f}')} | "
                      f"{_f(q.get('Recall50'))} | {_f(q.get('Precision50'))} |", ""]
        inf = short.get("inference", [])
        if inf:
            lines += ["| inference input px | batch | AMP | ms per slice (predictor, masks pasted) | slices |",
                      "|---|---|---|---|---|"]
            for r in inf:
                lines.append(f"| {r['size']} | {r['batch']} | {r.get('amp', False)} | {_f(r['ms_per_slice'], '{:.1f}')} "
                             f"| {r['slices']} |")
            lines.append("")
    timings = results.get("timings")
    if timings:
        lines += ["## Wall time per part", "", "| part | seconds | exit |", "|---|---|---|"]
        for t in timings:
            lines.append(f"| {t['part']} | {t['seconds']} | {t.get('rc', '')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
class CompiledOpWatch:
    """Records every attribute asked of detectron2._C (d2ct's stand-in raises on any): it must stay empty."""

    def __init__(self):
        import detectron2._C as C

        self.module = C
        self.standin = not getattr(C, "has_compiled_ops", True)
        self.calls: list[str] = []
        if self.standin:
            original = C.__dict__.get("__getattr__")

            def watch(name, _orig=original, _calls=self.calls):
                if not name.startswith("__"):
                    _calls.append(name)
                return _orig(name)

            C.__getattr__ = watch

    def check(self) -> dict:
        if not self.standin:
            return {"check": "compiled-op stand-in never called", "status": "skipped",
                    "detail": "this detectron2 has real compiled ops (not d2ct's stand-in)"}
        return {"check": "compiled-op stand-in never called", "status": "ok" if not self.calls else "FAILED",
                "detail": "no call" if not self.calls else f"called: {sorted(set(self.calls))}"}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def base_opts(args, out_dir: Path) -> list[str]:
    opts = ["OUTPUT_DIR", str(out_dir), "D2CT.DATA_NAME", DATA_NAME, "D2CT.DATA_ROOT", str(args.data),
            "D2CT.SPLIT_GROUP_BY", "patient", "D2CT.VAL_FRACTION", "0.2", "D2CT.SPLIT_SEED", "0",
            "DATASETS.TRAIN", f"('{DATA_NAME}_train',)", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
            "SOLVER.CHECKPOINT_PERIOD", "1000000", "D2CT.CURVES", "False", "D2CT.CHECK_WEIGHTS", "False",
            "MODEL.DEVICE", "cuda" if cuda() else "cpu"]
    if args.smoke:
        opts += SMOKE_OPTS
    return opts


def make_cfg(config: str, opts: list[str]):
    from d2ct.config import setup_cfg
    from d2ct.engine.setup import register_datasets_from_cfg

    cfg = setup_cfg(str(ROOT / config), opts, freeze=False)
    register_datasets_from_cfg(cfg)
    cfg.freeze()
    return cfg


def setup_logging(out: Path) -> None:
    from detectron2.utils.logger import setup_logger

    setup_logger(str(out / "logs"), name="detectron2", abbrev_name="d2")
    setup_logger(str(out / "logs"), name="d2ct", abbrev_name="d2ct")
    logging.getLogger("d2ct.gpu").setLevel(logging.INFO)


def say(msg: str) -> None:
    print(f"[device_checks {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if cuda() else None


def reset_peak() -> None:
    import torch

    if cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def history(storage, key: str) -> list[float]:
    try:
        return [v for v, _ in storage.history(key).values()]
    except KeyError:
        return []


def train_for(cfg, budget_s: float | None = None, ddp: bool = False):
    """Detectron2's training loop (TrainerBase.train) with a wall-clock stop after ``budget_s``.

    Returns (trainer, iterations done, seconds). ``ddp`` wraps the model in DistributedDataParallel
    even in a world of one process (the NCCL check).
    """
    from detectron2.utils.events import EventStorage

    from d2ct.engine import Trainer

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        import torch

        ids = [torch.cuda.current_device()] if cfg.MODEL.DEVICE.startswith("cuda") else None
        trainer._trainer.model = DistributedDataParallel(trainer._trainer.model, device_ids=ids, broadcast_buffers=False)
    start = time.perf_counter()
    done = 0
    with EventStorage(0) as trainer.storage:
        trainer.iter = 0
        trainer.before_train()
        try:
            for trainer.iter in range(trainer.start_iter, trainer.max_iter):
                trainer.before_step()
                trainer.run_step()
                trainer.after_step()
                done = trainer.iter + 1
                if budget_s is not None and time.perf_counter() - start > budget_s:
                    LOG.info("time budget of %.0f s reached after %d iterations", budget_s, done)
                    break
            trainer.iter += 1
        finally:
            trainer.after_train()
    return trainer, done, time.perf_counter() - start


def shutdown(trainer) -> None:
    """Stop the data-loader workers and free the GPU memory of a finished trainer (the caller drops
    its own reference too)."""
    import torch

    with contextlib.suppress(AttributeError):
        del trainer._trainer._data_loader_iter  # the iterator owns the worker processes
    trainer._trainer = None
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------
def _nccl_version() -> str | None:
    try:
        import torch.cuda.nccl as nccl

        v = nccl.version()
        return ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
    except Exception as e:  # informational only
        return f"unknown ({type(e).__name__})"


def step_env(args) -> dict:
    import numpy
    import torch
    import torchvision

    import detectron2
    import d2ct

    watch = CompiledOpWatch()
    info = {"smoke": args.smoke, "python": sys.version.split()[0], "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__, "detectron2": detectron2.__version__,
            "detectron2_path": os.path.dirname(detectron2.__file__), "d2ct": d2ct.__version__,
            "compiled_ops": not watch.standin, "cuda_available": cuda(), "cpus": os.cpu_count()}
    checks = []
    if cuda():
        p = torch.cuda.get_device_properties(0)
        info.update({"device": f"{p.name}, {p.total_memory / 2**30:.0f} GiB, cc {p.major}.{p.minor}",
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                     "nccl": _nccl_version()})
        checks.append({"check": "CUDA GPU visible", "status": "ok", "detail": info["device"]})
    else:
        info["device"] = "CPU only"
        checks.append({"check": "CUDA GPU visible", "status": "skipped", "detail": "no CUDA on this host"})
    # torchvision's ops are linked against one torch build: a mismatch fails here, not mid-training.
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    dev = "cuda" if cuda() else "cpu"
    keep = torchvision.ops.nms(boxes.to(dev), scores.to(dev), 0.5).cpu().tolist()
    checks.append({"check": f"torchvision nms on {dev}", "status": "ok" if keep == [0, 2] else "FAILED",
                   "detail": f"kept {keep}"})
    from detectron2.layers import ROIAlign

    feat = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8).to(dev)
    roi = ROIAlign((2, 2), 1.0, 0, aligned=True)(feat, torch.tensor([[0, 0, 0, 4, 4]], dtype=torch.float32, device=dev))
    checks.append({"check": f"ROIAlign (torchvision) on {dev}", "status": "ok" if torch.isfinite(roi).all() else "FAILED",
                   "detail": f"out {tuple(roi.shape)}"})
    checks.append(watch.check())
    info["checks"] = checks
    return info


def step_train(args) -> dict:
    """Each radiologist config x (fp32, AMP): iterations on real slices; timings from Detectron2's storage."""
    import torch

    setup_logging(args.out)
    watch = CompiledOpWatch()
    size = args.size or (96 if args.smoke else 512)
    batch = args.batch or (2 if args.smoke else 16)
    iters = args.iters or (3 if args.smoke else 20)
    workers = args.workers if args.workers is not None else (0 if args.smoke else 12)
    runs, checks = [], []
    result = {"runs": runs, "checks": checks, "size": size, "batch": batch, "iters": iters, "workers": workers}
    for amp in (False, True):
        for model in args.models:
            row = {"model": model, "size": size, "batch": batch, "amp": amp, "status": "?"}
            if amp and not cuda():
                row["status"] = "skipped: AMP needs CUDA"
                runs.append(row)
                checks.append({"check": f"train {model} AMP", "status": "skipped", "detail": "no CUDA on this host"})
                save_step(args.out, "train", result)
                continue
            say(f"train {model} {'AMP' if amp else 'fp32'}: {iters} iterations of {batch} images at {size} px")
            opts = base_opts(args, Path(tempfile.mkdtemp(prefix=f"d2ct_gpu_{model}_")))
            opts += ["SOLVER.MAX_ITER", str(iters), "SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.AMP.ENABLED", str(amp),
                     "INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MIN_SIZE_TEST", str(size),
                     "DATALOADER.NUM_WORKERS", str(workers)]
            start = time.perf_counter()
            try:
                cfg = make_cfg(f"configs/scratch/radiologist_{model}.yaml", opts)
                reset_peak()
                trainer, done, seconds = train_for(cfg)
                times = history(trainer.storage, "time")
                data = history(trainer.storage, "data_time")
                losses = history(trainer.storage, "total_loss")
                warm = len(times) // 2 if len(times) >= 4 else min(1, len(times) - 1)  # first iterations warm up (cudnn, loader)
                row.update({"status": "ok", "iters_done": done, "iters_timed": len(times[warm:]),
                            "s_per_iter": statistics.median(times[warm:]) if times else None,
                            "data_time": statistics.median(data[warm:]) if data[warm:] else None,
                            "peak_mem_mib": peak_mib(), "loss_first": losses[0] if losses else None,
                            "loss_last": losses[-1] if losses else None, "wall_s": round(time.perf_counter() - start, 1)})
                finite = bool(losses) and all(math.isfinite(v) for v in losses)
                checks.append({"check": f"train {model} {'AMP' if amp else 'fp32'}",
                               "status": "ok" if finite else "FAILED",
                               "detail": f"{done} iterations, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no loss"})
                shutdown(trainer)
                del trainer
            except Exception as e:  # keep going: the other configs still tell something
                traceback.print_exc()
                row.update({"status": f"FAILED: {type(e).__name__}: {str(e)[:200]}",
                            "wall_s": round(time.perf_counter() - start, 1)})
                checks.append({"check": f"train {model} {'AMP' if amp else 'fp32'}", "status": "FAILED",
                               "detail": row["status"]})
                if cuda():
                    torch.cuda.empty_cache()
            runs.append(row)
            say(json.dumps(_clean(row)))
            save_step(args.out, "train", result)
    checks.append(watch.check())
    return result


def _nccl_main(args, result_file: str):
    """Runs inside a launcher's worker: Detectron2's _distributed_worker (NCCL) on a GPU, d2ct's
    CPU worker (gloo) otherwise. A world of one process; the model is DDP-wrapped all the same."""
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    dev = "cuda" if cuda() else "cpu"
    out = {"backend": str(dist.get_backend()), "world_size": comm.get_world_size(),
           "local_world": comm.get_local_size()}
    t = torch.ones(4, device=dev) * 3
    dist.all_reduce(t)
    out["all_reduce"] = t.tolist()
    size, batch = (96, 2) if args.smoke else (256, 4)
    opts = base_opts(args, Path(tempfile.mkdtemp(prefix="d2ct_gpu_nccl_")))
    opts += ["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", str(batch), "INPUT.MIN_SIZE_TRAIN", f"({size},)",
             "INPUT.MIN_SIZE_TEST", str(size), "DATALOADER.NUM_WORKERS", "0" if args.smoke else "2"]
    cfg = make_cfg("configs/scratch/radiologist_r50.yaml", opts)
    trainer, done, seconds = train_for(cfg, ddp=True)
    losses = history(trainer.storage, "total_loss")
    out.update({"iters": done, "seconds": round(seconds, 1), "loss": losses,
                "ddp": type(trainer._trainer.model).__name__})
    Path(result_file).write_text(json.dumps(_clean(out)))


def step_nccl(args) -> dict:
    """A launch through the distributed worker. On a CPU host NCCL cannot run: that check is reported
    as skipped, and the same child code runs through d2ct's gloo worker instead (labelled as such)."""
    import torch.multiprocessing as mp

    checks = []
    if cuda():
        from detectron2.engine.launch import _distributed_worker as worker

        label, backend = "1-GPU launch through the NCCL path", "nccl"
    else:
        from d2ct.engine.launch import _cpu_worker as worker

        checks.append({"check": "1-GPU launch through the NCCL path", "status": "skipped",
                       "detail": "NCCL needs CUDA"})
        label, backend = "1-process launch through the gloo path (the NCCL check's code, CPU host)", "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_file = args.out / "nccl_child.json"
    start = time.perf_counter()
    try:
        mp.start_processes(worker, nprocs=1, start_method="spawn",
                           args=(_nccl_main, 1, 1, 0, f"tcp://127.0.0.1:{port}", (args, str(result_file)),
                                 timedelta(minutes=2)))
        child = json.loads(result_file.read_text())
        ok = (child["backend"].lower() == backend and child["all_reduce"] == [3.0] * 4 and child["iters"] == 3
              and len(child["loss"]) == 3 and all(v is not None for v in child["loss"]))
        checks.append({"check": label, "status": "ok" if ok else "FAILED",
                       "detail": f"backend {child['backend']}, {child['ddp']}, {child['iters']} iterations, "
                                 f"loss {child['loss'][0]:.3f} -> {child['loss'][-1]:.3f}"})
        return {"child": child, "seconds": round(time.perf_counter() - start, 1), "checks": checks}
    except Exception as e:
        traceback.print_exc()
        checks.append({"check": label, "status": "FAILED", "detail": f"{type(e).__name__}: {str(e)[:300]}"})
        return {"checks": checks}
    finally:
        with contextlib.suppress(FileNotFoundError):
            result_file.unlink()


def _expected_s_per_iter(out: Path, amp: bool) -> float | None:
    for r in load_results(out)["steps"].get("train", {}).get("runs", []):
        if r["model"] == "r50" and r["amp"] == amp and r.get("s_per_iter"):
            return float(r["s_per_iter"]) * 16 / r["batch"] if r["batch"] else None
    return None


def step_short_run(args) -> dict:
    """R50 from scratch for about --budget-s seconds, then the test patients through BatchPredictor."""
    import numpy as np
    import torch

    from d2ct.data.challenge import ChallengeDataset
    from d2ct.data.register import split_names
    from d2ct.engine.mapper import read_model_image
    from d2ct.engine.predictor import BatchPredictor
    from d2ct.evaluation.coco_ap import coco_ap, label_map_to_rles
    from d2ct.evaluation.report import evaluate_label_maps
    from d2ct.postprocess.submission import PostprocessOptions, prediction_to_label_map

    setup_logging(args.out)
    watch = CompiledOpWatch()
    checks: list[dict] = []
    result: dict = {"checks": checks}
    batch = args.batch or (2 if args.smoke else 16)
    # Mixed precision only when the timing step found it clearly faster for R50 (at least 1.25x, both
    # with finite losses): fp32 is the path the CPU runs took.
    fp32, amp16 = _expected_s_per_iter(args.out, False), _expected_s_per_iter(args.out, True)
    amp = bool(cuda() and amp16 and fp32 and amp16 * 1.25 <= fp32)
    if args.amp is not None:
        amp = args.amp and cuda()
    per_iter = (amp16 if amp else fp32) or (30.0 if args.smoke else 1.0)
    if args.smoke:
        per_iter = per_iter * batch / 16
    budget = float(args.budget_s)
    max_iter = max(2, int(budget / per_iter * 0.95))
    if args.max_iter:
        max_iter = args.max_iter
    warmup = min(500, max(1, max_iter // 5))
    # learning-rate drops at 75% and 90% of the run (as the configs' schedules); strictly increasing, < max_iter
    steps = sorted({s for s in (int(max_iter * 0.75), int(max_iter * 0.9)) if 0 < s < max_iter})
    out_dir = Path(tempfile.mkdtemp(prefix="d2ct_gpu_short_"))
    opts = base_opts(args, out_dir) + [
        "SOLVER.IMS_PER_BATCH", str(batch), "SOLVER.MAX_ITER", str(max_iter), "SOLVER.AMP.ENABLED", str(amp),
        "SOLVER.WARMUP_ITERS", str(warmup), "SOLVER.STEPS", "(" + "".join(f"{x}," for x in steps) + ")",
        "DATALOADER.NUM_WORKERS", str(args.workers if args.workers is not None else (0 if args.smoke else 12))]
    if args.smoke:
        opts += ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MIN_SIZE_TEST", "96"]
    cfg = make_cfg("configs/scratch/radiologist_r50.yaml", opts)
    ds = ChallengeDataset.open(args.data)
    _, train_names = split_names(ds, "train", val_fraction=0.2, seed=0, group_by="patient")
    test_ds, test_names = split_names(ds, "test")
    if test_ds is None or not test_names:
        raise SystemExit(f"{args.data}: no test split (make it with tools/make_holdout.py)")
    if args.test_limit:
        test_names = test_names[: args.test_limit]
    training = {"config": "configs/scratch/radiologist_r50.yaml", "batch": batch, "amp": amp, "max_iter": max_iter,
                "warmup_iters": warmup, "lr_steps": steps, "budget_s": budget, "expected_s_per_iter": per_iter,
                "train_images": len(train_names), "input": {"min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN),
                                                              "min_size_test": cfg.INPUT.MIN_SIZE_TEST}}
    result["training"] = training
    save_step(args.out, "short_run", result)
    say(f"short run: R50 from scratch, up to {max_iter} iterations of {batch} images (AMP {amp}), "
        f"budget {budget:.0f} s")
    reset_peak()
    trainer, done, seconds = train_for(cfg, budget_s=budget)
    losses = history(trainer.storage, "total_loss")
    times = history(trainer.storage, "time")
    training.update({"iters_done": done, "train_s": round(seconds, 1), "stopped_by_budget": done < max_iter,
                     "s_per_iter": statistics.median(times[len(times) // 2:]) if times else None,
                     "data_time": statistics.median(history(trainer.storage, "data_time")[len(times) // 2:] or [float("nan")]),
                     "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                     "peak_mem_mib": peak_mib(), "epochs": round(done * batch / max(1, len(train_names)), 1)})
    weights = out_dir / "model_final.pth"
    if not weights.exists():  # stopped by the budget: the final checkpoint was not written
        trainer.checkpointer.save("model_final")
    shutdown(trainer)
    del trainer
    checks.append({"check": f"short run R50 ({done} iterations)", "status": "ok" if losses and all(
        math.isfinite(v) for v in losses) else "FAILED", "detail": f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""})
    save_step(args.out, "short_run", result)

    # Test patients through d2ct's BatchPredictor (the predictor call), then the challenge metrics.
    say(f"predicting {len(test_names)} test-patient slices")
    start = time.perf_counter()
    predictor = BatchPredictor(cfg, weights=str(weights), batch_size=batch)
    preds = predictor.predict_files([(n, str(test_ds.image_path(n))) for n in test_names], compact=True)
    post = PostprocessOptions(score_threshold=0.5, min_area=5, fallback_top_k=3)
    maps = [prediction_to_label_map(p, post) for p in preds]
    truth = [test_ds.label_map(n) for n in test_names]
    ev = evaluate_label_maps(test_names, truth, maps, with_ap=False)
    summary = dict(ev.summary)
    gt_rles = [label_map_to_rles(t)[0] for t in truth]
    dets = [list(zip(p.rles or [], p.scores.tolist())) for p in preds]
    summary.update(coco_ap(gt_rles, dets, [t.shape for t in truth]))
    summary["postprocess"] = {"score_threshold": 0.5, "min_area": 5, "fallback_top_k": 3}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    result["test"] = summary
    checks.append({"check": "BatchPredictor on the test patients", "status": "ok",
                   "detail": f"{len(preds)} slices, {sum(len(p) for p in preds)} instances"})
    save_step(args.out, "short_run", result)
    say(f"test patients: ARI {summary['ARI']:.3f}, Dice {summary['Dice']:.3f}, mask AP {summary.get('AP', float('nan')):.1f}")

    # Inference speed per slice, images in memory (no disk), at two input sizes.
    images = [(n, read_model_image(str(test_ds.image_path(n)))) for n in test_names]
    sizes = [96] if args.smoke else [256, 512]
    inference = []
    result["inference"] = inference
    for size in sizes:
        for use_amp in ([False, True] if cuda() else [False]):
            c = cfg.clone()
            c.defrost()
            c.INPUT.MIN_SIZE_TEST = size
            c.freeze()
            try:
                pr = BatchPredictor(c, weights=str(weights), batch_size=batch)
                ctx = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
                with ctx:
                    pr.predict_images(images[:batch])  # warm-up (cuDNN, allocator)
                    if cuda():
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    got = pr.predict_images(images)
                    if cuda():
                        torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) * 1000 / len(images)
                inference.append({"size": size, "batch": batch, "amp": use_amp, "ms_per_slice": ms,
                                  "slices": len(images), "instances": int(sum(len(p) for p in got))})
                del pr, got
            except Exception as e:  # one failed variant must not hide the others
                traceback.print_exc()
                checks.append({"check": f"inference {size} px{' AMP' if use_amp else ''}", "status": "FAILED",
                               "detail": f"{type(e).__name__}: {str(e)[:200]}"})
            save_step(args.out, "short_run", result)
    checks.append(watch.check())
    del images
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["env", "train", "nccl", "short_run", "table", "timing"])
    p.add_argument("--out", type=Path, required=True, help="results folder ($OUT on the GPU machine)")
    p.add_argument("--data", type=Path, help="OpenKBP patient hold-out set (tools/make_holdout.py)")
    p.add_argument("--smoke", action="store_true", help="CPU-sized: tiny inputs, a few iterations")
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--size", type=int, help="train step: input size (default 512; smoke 128)")
    p.add_argument("--batch", type=int, help="images per iteration (default 16; smoke 2)")
    p.add_argument("--iters", type=int, help="train step: iterations per config (default 20; smoke 3)")
    p.add_argument("--workers", type=int, help="data-loader workers (default 12, of the 16 cores there; smoke 0)")
    p.add_argument("--budget-s", type=float, default=240.0, help="short run: training seconds (default 240)")
    p.add_argument("--max-iter", type=int, help="short run: iterations (default: from the budget and the R50 timing)")
    p.add_argument("--amp", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                   help="short run: mixed precision (default: whichever the train step found faster)")
    p.add_argument("--test-limit", type=int, help="short run: score only the first N test slices")
    p.add_argument("--part", help="timing: name of the part of device_run.sh")
    p.add_argument("--seconds", type=float, help="timing: its wall time")
    p.add_argument("--rc", type=int, help="timing: its exit status")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "timing":
        from d2ct.utils.fileio import atomic_write_json, atomic_write_text

        results = load_results(args.out)
        results["timings"] = [t for t in results.get("timings", []) if t["part"] != args.part]
        results["timings"].append({"part": args.part, "seconds": args.seconds, "rc": args.rc})
        atomic_write_json(results_path(args.out), results, indent=1)
        atomic_write_text(args.out / "results.md", render_markdown(results))
        return 0
    if args.step == "table":
        from d2ct.utils.fileio import atomic_write_text

        atomic_write_text(args.out / "results.md", render_markdown(load_results(args.out)))
        return 0
    if args.step in ("train", "nccl", "short_run") and not args.data:
        p.error(f"{args.step} needs --data")
    start = time.perf_counter()
    try:
        data = {"env": step_env, "train": step_train, "nccl": step_nccl, "short_run": step_short_run}[args.step](args)
    except Exception as e:
        traceback.print_exc()
        partial = load_results(args.out)["steps"].get(args.step, {})
        partial.setdefault("checks", []).append({"check": f"{args.step} step", "status": "FAILED",
                                                 "detail": f"{type(e).__name__}: {str(e)[:300]}"})
        save_step(args.out, args.step, partial)
        return 1
    data["step_seconds"] = round(time.perf_counter() - start, 1)
    save_step(args.out, args.step, data)
    failed = [c for c in data.get("checks", []) if c["status"] == "FAILED"]
    say(f"{args.step}: done in {data['step_seconds']} s" + (f", {len(failed)} check(s) FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
