"""Profile: where a CPU training step and a CPU prediction pass spend their time (torch.profiler).

- Training: one step of a d2ct config (default configs/cpu/radiologist_r50.yaml) on 256 px phantom
  slices, 2 images: data loading (CTDatasetMapper on the two images), the forward pass split into
  backbone (ResNet), FPN, RPN, ROI box head (pooler, head, predictor, box losses) and ROI mask head
  (pooler, head, mask loss), the backward pass (all modules together: autograd does not attribute
  its kernels to modules) and the optimiser step.
- Prediction: BatchPredictor.predict_files on N slices: image reading and resizing, the same model
  stages, mask pasting and RLE compaction.
- Evaluation during training costs (validation images x prediction time per slice) / TEST.EVAL_PERIOD
  per iteration; the row shows that estimate for the config's values.

Stages are torch.profiler ``record_function`` ranges opened and closed by forward hooks on the
Detectron2 modules (FPN = backbone minus its ResNet; ROI box = roi_heads minus the mask parts).
Each precision mode runs in the same process, alternately, after one warm-up; the median of
``--repeat`` profiled runs is shown. Usage::

    .venv/bin/python bench/profile_step.py [--model OUTPUT_DIR] [--modes fp32 bf16] [--repeat 2]

``--model``: a trained output folder (config.yaml + model_best/final.pth) for the prediction profile;
without it the weights are random and the mask head runs on the 50-detection cap (worst case).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_info, markdown_table  # noqa: E402

CONFIG = "configs/cpu/radiologist_r50.yaml"
MODES = {  # name: (D2CT.CPU_BF16, D2CT.CHANNELS_LAST)
    "fp32": (False, False),
    "fp32+CL": (False, True),
    "bf16": (True, False),
    "bf16+CL": (True, True),
}
TRAIN_STAGES = ["data loading", "backbone (ResNet)", "FPN", "RPN", "ROI box head", "ROI mask head",
                "backward", "optimizer step"]
INFER_STAGES = ["read + resize", "backbone (ResNet)", "FPN", "RPN", "ROI box head", "ROI mask head",
                "mask pasting", "RLE compaction"]


def _hook_ranges(model, names: dict[str, str]):
    """record_function ranges around the forward of each named submodule; returns the handles."""
    import torch

    handles = []
    modules = dict(model.named_modules())
    for path, label in names.items():
        module = modules.get(path)
        if module is None:
            continue
        stack = []

        def pre(m, inp, label=label, stack=stack):
            ctx = torch.profiler.record_function(label)
            ctx.__enter__()
            stack.append(ctx)

        def post(m, inp, out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


MODULE_RANGES = {
    "backbone": "#backbone",
    "backbone.bottom_up": "#resnet",
    "proposal_generator": "#rpn",
    "roi_heads": "#roi",
    "roi_heads.mask_pooler": "#mask_pooler",
    "roi_heads.mask_head": "#mask_head",
}


def _stage_ms(prof) -> dict[str, float]:
    """Milliseconds per range label (CPU total of the ranges, summed over calls)."""
    totals = {}
    for evt in prof.key_averages():
        if evt.key.startswith("#") or evt.key.startswith("@"):
            totals[evt.key] = evt.cpu_time_total / 1000.0
    g = totals.get
    out = {
        "backbone (ResNet)": g("#resnet", 0.0),
        "FPN": g("#backbone", 0.0) - g("#resnet", 0.0),
        "RPN": g("#rpn", 0.0),
        "ROI box head": g("#roi", 0.0) - g("#mask_pooler", 0.0) - g("#mask_head", 0.0),
        "ROI mask head": g("#mask_pooler", 0.0) + g("#mask_head", 0.0),
    }
    for key, value in totals.items():
        if key.startswith("@"):
            out[key[1:]] = value
    return out


def _top_ops(prof, n: int = 8) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def _cfg(config: str, mode: str, opts: list[str]):
    from d2ct.config import setup_cfg

    bf16, cl = MODES[mode]
    return setup_cfg(str(ROOT / config), [*opts, "D2CT.CPU_BF16", str(bf16), "D2CT.CHANNELS_LAST", str(cl),
                                         "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"])


def profile_training(config: str, modes: list[str], data_root: Path, repeat: int, top: bool) -> list[dict]:
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.utils.events import EventStorage
    from torch.profiler import ProfilerActivity, profile, record_function

    from d2ct.data.register import register_challenge_dataset
    from d2ct.engine import Trainer
    from d2ct.engine import precision
    from d2ct.engine.mapper import CTDatasetMapper

    register_challenge_dataset("profstep", data_root, val_fraction=0.0)
    dicts = DatasetCatalog.get("profstep_train")
    base_cfg = _cfg(config, "fp32", [])
    torch.manual_seed(0)
    state = copy.deepcopy(Trainer.build_model(base_cfg).state_dict())
    runs = {}
    for mode in modes:
        cfg = _cfg(config, mode, [])
        model = Trainer.build_model(cfg)
        model.load_state_dict(state)
        model.train()
        optimizer = Trainer.build_optimizer(cfg, model)
        _hook_ranges(model, MODULE_RANGES)
        runs[mode] = (cfg, model, optimizer, precision.use_cpu_bf16(cfg), CTDatasetMapper(cfg, is_train=True))
    times = {m: [] for m in modes}
    stages = {m: [] for m in modes}
    batches = itertools.cycle([dicts[i:i + 2] for i in range(0, len(dicts) - 1, 2)])
    for r in range(repeat + 1):  # round 0 is the warm-up
        for mode in modes:
            cfg, model, optimizer, bf16, mapper = runs[mode]
            raw = next(batches)
            torch.manual_seed(r)
            with profile(activities=[ProfilerActivity.CPU]) as prof, EventStorage(0):
                start = time.perf_counter()
                with record_function("@data loading"):
                    batch = [mapper(d) for d in raw]
                with precision.autocast(bf16):
                    losses = sum(model(batch).values())
                with record_function("@backward"):
                    optimizer.zero_grad()
                    losses.backward()
                with record_function("@optimizer step"):
                    optimizer.step()
                elapsed = time.perf_counter() - start
            if r:
                times[mode].append(elapsed)
                stages[mode].append(_stage_ms(prof))
                if top and r == repeat:
                    print(f"\n## top ops, training, {mode}\n{_top_ops(prof)}", file=sys.stderr)
    rows = []
    for mode in modes:
        cfg = runs[mode][0]
        rows.append(_row("training step (2 images)", mode, times[mode], stages[mode], TRAIN_STAGES))
    return rows


def profile_inference(config: str, model_dir: Path | None, modes: list[str], slices: list[tuple[str, str]],
                      repeat: int, batch: int, px: int, top: bool, tmp: Path) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import d2ct.engine.predictor as pred_mod
    from d2ct.engine.predictor import BatchPredictor

    if model_dir is None:
        from bench.bench_infer import save_random_model

        cfg_path, weights = save_random_model(config, tmp / "random_model", ["MODEL.DEVICE", "cpu"])
    else:
        cfg_path, weights = str(model_dir / "config.yaml"), str(pred_mod.trained_weights(model_dir))

    def ranged(label, fn):
        def wrapped(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return wrapped

    pred_mod.paste_soft_masks = ranged("@mask pasting", pred_mod.paste_soft_masks)
    pred_mod.read_model_image = ranged("@read + resize", pred_mod.read_model_image)
    pred_mod.InstancePrediction.compact = ranged("@RLE compaction", pred_mod.InstancePrediction.compact)
    predictors = {}
    for mode in modes:
        bf16, cl = MODES[mode]
        from d2ct.config import setup_cfg

        cfg = setup_cfg(cfg_path, ["D2CT.CPU_BF16", str(bf16), "D2CT.CHANNELS_LAST", str(cl),
                                   "INPUT.MIN_SIZE_TEST", str(px), "INPUT.MAX_SIZE_TEST", str(max(px, 512))])
        p = BatchPredictor(cfg, weights, batch_size=batch)
        p._prepare = ranged("@read + resize", p._prepare)
        _hook_ranges(p.model, MODULE_RANGES)
        predictors[mode] = p
    times = {m: [] for m in modes}
    stages = {m: [] for m in modes}
    counts = {}
    for r in range(repeat + 1):
        for mode in modes:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                preds = predictors[mode].predict_files(slices if r else slices[:batch])
                elapsed = time.perf_counter() - start
            if r:
                times[mode].append(elapsed / len(slices))
                stages[mode].append({k: v / len(slices) for k, v in _stage_ms(prof).items()})
                counts[mode] = sum(len(p) for p in preds) / len(preds)
                if top and r == repeat:
                    print(f"\n## top ops, prediction, {mode}\n{_top_ops(prof)}", file=sys.stderr)
    rows = []
    for mode in modes:
        row = _row(f"prediction per slice ({px} px, batch {batch})", mode, times[mode], stages[mode], INFER_STAGES)
        row["instances/slice"] = round(counts[mode], 1)
        rows.append(row)
    return rows


def _row(task: str, mode: str, times: list[float], stages: list[dict], order: list[str]) -> dict:
    total_ms = 1000 * statistics.median(times)
    row = {"task": task, "mode": mode, "total_ms": round(total_ms)}
    for stage in order:
        ms = statistics.median(s.get(stage, 0.0) for s in stages)
        row[stage] = f"{ms:.0f} ({100 * ms / total_ms:.0f}%)"
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--model", type=Path, help="trained output folder for the prediction profile")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=["fp32", "bf16+CL"])
    ap.add_argument("--repeat", type=int, default=2, help="profiled runs per mode after one warm-up")
    ap.add_argument("--slices", type=int, default=8, help="slices per prediction run")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--px", type=int, default=256)
    ap.add_argument("--what", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    ap.add_argument("--top", action="store_true", help="also print the top ops of the last run (stderr)")
    ap.add_argument("--val-images", type=int, default=0,
                    help="validation images, for the evaluation-per-iteration estimate (0: skip it)")
    args = ap.parse_args(argv)
    import torch

    from d2ct.data.phantom import write_phantom_dataset

    rows = []
    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        tmp = Path(tmp)
        root = write_phantom_dataset(tmp / "phantom", n_train=8, n_labelled=8, n_test=args.slices, size=256,
                                     seed=0, progress=False)
        if "train" in args.what:
            rows += profile_training(args.config, args.modes, root, args.repeat, args.top)
        if "infer" in args.what:
            slices = [(p.name, str(p)) for p in sorted((root / "test-images").glob("*.png"), key=lambda p: int(p.stem))]
            rows += profile_inference(args.config, args.model, args.modes, slices, args.repeat, args.batch, args.px,
                                      args.top, tmp)
    info = machine_info()
    print(f"# profile_step on {info['cpu']}, {info['cores']} cores, torch threads {torch.get_num_threads()}, "
          f"{info['date']}; config {args.config}; model {args.model or 'random weights'}\n")
    train_rows = [r for r in rows if r["task"].startswith("training")]
    infer_rows = [r for r in rows if r["task"].startswith("prediction")]
    if train_rows:
        print(markdown_table(train_rows, ["task", "mode", "total_ms"] + TRAIN_STAGES))
    if infer_rows:
        print(markdown_table(infer_rows, ["task", "mode", "total_ms", "instances/slice"] + INFER_STAGES))
    if args.val_images and train_rows and infer_rows:
        from d2ct.config import setup_cfg

        period = setup_cfg(str(ROOT / args.config)).TEST.EVAL_PERIOD
        for t, i in zip(train_rows, infer_rows):
            est = args.val_images * i["total_ms"] / max(1, period)
            print(f"- evaluation, {t['mode']}: {args.val_images} validation slices x {i['total_ms']} ms every "
                  f"{period} iterations = {est:.0f} ms per iteration ({100 * est / (t['total_ms'] + est):.0f}% of "
                  f"training time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
