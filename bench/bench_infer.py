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

``--compare --model DIR --data DIR`` (CPU): a trained model (a tools/train_net.py folder) on the
labelled slices of a data set (its test-images/ and test-labels), today's float32 prediction
(D2CT.CPU_BF16 False, D2CT.CHANNELS_LAST False, no score floor, Detectron2's one-mask-at-a-time
pasting) against the new defaults (bfloat16 + channels-last where supported, mask head only from
D2CT.PREDICT_SCORE_FLOOR, chunked pasting), alternately in one process at 256 and 512 px, batch 1 and
8: ms per slice, the speed-up, the rise of resident memory during a run, and the mean ARI (all
pixels, threshold 0.5, fallback 3, min area 5) of both on the same slices::

    .venv/bin/python bench/bench_infer.py --compare --model output/cpu/radiologist_r50 \
        --data datasets/openkbp_holdout [--slices 24] [--rounds 2]
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


CMP_COLUMNS = ["input_px", "batch", "slices", "fp32 ms/slice", "new ms/slice", "speed-up", "fp32 MB", "new MB",
               "fp32 ARI", "new ARI", "ARI diff", "fp32 inst/slice", "new inst/slice", "bf16 active"]


def run_compare(model_dir: Path, data_root: Path, n_slices: int = 24, rounds: int = 2,
                sizes=(256, 512), batches=(1, 8), new_opts: list[str] = ()) -> list[dict]:
    from detectron2.layers import paste_masks_in_image

    import d2ct.engine.predictor as pred_mod
    from d2ct.engine.predictor import BatchPredictor, load_trained
    from d2ct.evaluation.report import evaluate_label_maps
    from d2ct.postprocess.submission import PostprocessOptions, label_maps_from_predictions
    from bench.bench_train import RssPeak

    new_paste = pred_mod.paste_soft_masks

    def old_paste(masks, boxes, h, w, chunk=32):  # today's: Detectron2, one mask at a time on the CPU
        from detectron2.structures import Boxes

        return paste_masks_in_image(masks, Boxes(boxes), (h, w), threshold=-1)

    folder = Path(data_root) / "test-images"
    names = sorted((p.name for p in folder.glob("*.png")), key=lambda n: int(Path(n).stem) if Path(n).stem.isdigit() else n)
    step = max(1, len(names) // n_slices)
    names = names[::step][:n_slices]
    files = [(n, str(folder / n)) for n in names]
    truth = _test_truth(data_root, names)
    options = PostprocessOptions(score_threshold=0.5, min_area=5, fallback_top_k=3)
    modes = {"fp32": (["D2CT.CPU_BF16", "False", "D2CT.CHANNELS_LAST", "False", "D2CT.PREDICT_SCORE_FLOOR", "0.0"],
                      old_paste),
             "new": (list(new_opts), new_paste)}
    rows = []
    for px in sizes:
        for batch in batches:
            preds, times, mem, counts, aris, active = {}, {m: [] for m in modes}, {m: [] for m in modes}, {}, {}, {}
            for mode, (opts, _) in modes.items():
                cfg, weights = load_trained(model_dir, opts=[*opts, "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST",
                                                             str(px), "INPUT.MAX_SIZE_TEST", str(max(512, px))])
                preds[mode] = BatchPredictor(cfg, weights, batch_size=batch)
                active[mode] = preds[mode].bf16
            for r in range(rounds + 1):  # round 0: warm-up on one batch
                for mode, (opts, paste) in modes.items():
                    pred_mod.paste_soft_masks = paste
                    with RssPeak() as peak:
                        start = time.perf_counter()
                        out = preds[mode].predict_files(files if r else files[:batch])
                        elapsed = time.perf_counter() - start
                    if r:
                        times[mode].append(elapsed / len(files))
                        mem[mode].append(peak.rise_mb)
                        counts[mode] = sum(len(p) for p in out) / len(out)
                        maps = label_maps_from_predictions(out, options)
                        aris[mode] = evaluate_label_maps(names, truth, maps, with_ap=False).summary["ARI"]
            pred_mod.paste_soft_masks = new_paste
            old, new = statistics.median(times["fp32"]), statistics.median(times["new"])
            rows.append({
                "input_px": px, "batch": batch, "slices": len(files),
                "fp32 ms/slice": 1000 * old, "new ms/slice": 1000 * new, "speed-up": f"{old / new:.2f}x",
                "fp32 MB": round(max(mem["fp32"])), "new MB": round(max(mem["new"])),
                "fp32 ARI": round(aris["fp32"], 4), "new ARI": round(aris["new"], 4),
                "ARI diff": f"{aris['new'] - aris['fp32']:+.4f}",
                "fp32 inst/slice": round(counts["fp32"], 1), "new inst/slice": round(counts["new"], 1),
                "bf16 active": active["new"],
            })
            print(f"  {px}px batch {batch}: {rows[-1]['speed-up']} ARI {rows[-1]['ARI diff']}", file=sys.stderr,
                  flush=True)
    return rows


def _test_truth(data_root: Path, names: list[str]):
    import numpy as np

    from d2ct.data.images import read_slice
    from d2ct.data.labels_csv import read_labels_csv

    root = Path(data_root)
    path = next((root / f for f in ("test-labels.csv.gz", "test-labels.csv") if (root / f).exists()), None)
    if path is None:
        raise SystemExit(f"{root}: no test-labels.csv(.gz) to score the slices against")
    shape = read_slice(root / "test-images" / names[0]).shape[:2]
    table = read_labels_csv(path, expected_pixels=shape[0] * shape[1])
    return np.stack([table.label_map(n, shape) for n in names])


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
    ap.add_argument("--compare", action="store_true", help="today's float32 prediction vs the new defaults")
    ap.add_argument("--model", type=Path, help="--compare: trained model folder")
    ap.add_argument("--data", type=Path, help="--compare: data set with test-images/ and test-labels")
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-opts", nargs="+", default=[], metavar="KEY VALUE",
                    help="--compare: overrides of the new side, e.g. D2CT.PREDICT_SCORE_FLOOR 0.0 (bf16 alone)")
    args = ap.parse_args(argv)
    if args.compare:
        if not (args.model and args.data):
            ap.error("--compare needs --model and --data")
        import logging

        logging.getLogger("d2ct").setLevel(logging.WARNING)
        rows = run_compare(args.model, args.data, args.slices, args.rounds, args.sizes, args.batches, args.new_opts)
        info = machine_info()
        print(f"# bench_infer --compare on {info['cpu']}, {info['cores']} cores, {info['date']}; model "
              f"{args.model}, slices of {args.data}/test-images; new side overrides: {args.new_opts or 'none'}\n")
        print(markdown_table(rows, CMP_COLUMNS))
        return 0
    rows = run(quick=args.quick)
    info = machine_info()
    print(f"# bench_infer ({'quick' if args.quick else 'full'}) on {info['cpu']}, {info['cores']} cores, "
          f"GPU {info['gpu']}, {info['date']}\n")
    print(markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
