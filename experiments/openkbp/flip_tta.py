#!/usr/bin/env python
"""Horizontal-flip test-time augmentation on OpenKBP: does it help the trained models?

For the radiologists and the final model of each run named (run folders of
experiments/openkbp/run.py, trained before; nothing is trained here), the test and validation
slices are predicted again with ``--flip-tta`` (each slice and its mirror image, masks fused;
d2ct/engine/predictor.py ``fuse_views``) into ``--work`` and scored against the same slices without
it. The plain predictions are the run's own saved instances (``predict/<model>_instances.json``)
where they match the checkpoint (otherwise they are predicted too). Both are flattened the same
way: at score 0.5, and at each model's own threshold chosen on the validation split (a fused
instance seen in one view only gets half its score, so the two are calibrated differently).
Per-slice ARI differences (flip minus plain) get a 95% interval from a bootstrap over the test
patients. Resumable: finished predictions are reused.

  python experiments/openkbp/flip_tta.py --radiologists r50 r101 --only long_labelled strong_teacher
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from d2ct.utils.fileio import atomic_write_text  # noqa: E402
from experiments.openkbp.run import add_run_folder_arguments, experiment_of, load_variants  # noqa: E402
from experiments.openkbp.tables import Runs, patient_bootstrap, publish  # noqa: E402

FIXED_THRESHOLD = 0.5  # the pipeline's default predict.score_threshold: the bench files' first policy
DEFAULT_RUNS = ("warmstart_labelled", "long_labelled", "long_consensus", "strong_teacher", "strong_teacher_labelled")


def model_instances(model_dir: Path, folder: Path, names: list[str], saved: Path, work: Path, flip: bool,
                    log: Path) -> dict:
    """name -> (RLEs, scores) of one model on ``names``: ``saved`` (plain only) or ``work`` when they
    were made with this checkpoint and flip setting and cover ``names``; otherwise predicted into ``work``."""
    from d2ct.engine.predictor import prediction_source, source_changes, trained_weights
    from d2ct.errors import DataError
    from d2ct.postprocess.submission import read_instances

    wanted = prediction_source(trained_weights(model_dir), flip)
    for f in ([] if flip else [saved]) + [work]:
        if f.exists():
            try:
                source, found = read_instances(f)
            except DataError:
                continue
            if source is not None and not source_changes(source, wanted) and set(names) <= set(found):
                return found
    work.parent.mkdir(parents=True, exist_ok=True)
    listing = work.with_suffix(".txt")
    atomic_write_text(listing, "\n".join(names) + "\n")
    cmd = [sys.executable, str(ROOT / "tools/predict.py"), "--model", str(model_dir), "--input", str(folder),
           "--list", str(listing), "--instances", str(work), "--batch-size", "4"] + (["--flip-tta"] if flip else [])
    with open(log, "w") as fh:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=fh, stderr=subprocess.STDOUT)
    return read_instances(work)[1]


def score(instances: dict, names: list[str], truth: list, threshold: float, post):
    """Per-slice scores (EvaluationResult) of instances flattened at ``threshold``."""
    from d2ct.evaluation.report import evaluate_label_maps
    from d2ct.postprocess.submission import label_maps_from_instances

    maps = label_maps_from_instances(instances, names, dataclasses.replace(post, score_threshold=threshold),
                                     shape=truth[0].shape)
    return evaluate_label_maps(names, truth, maps, with_ap=False)


def splits(pipe) -> tuple[tuple[Path, list[str], list], tuple[Path, list[str], list]]:
    """(image folder, names, truth label maps) of the test and the validation split of a run."""
    (folder, names, truth_of), (val_folder, val_names, val_truth_of) = pipe.eval_images(), pipe.val_images()
    return (folder, names, [truth_of(n) for n in names]), (val_folder, val_names, [val_truth_of(n) for n in val_names])


def compare_model(label: str, model_dir: Path, run: Path, name: str, pipe, work: Path, patients: dict,
                  test_split: tuple, val_split: tuple) -> list[dict]:
    """Rows (one per threshold policy) comparing one model with and without flip TTA
    (``test_split``, ``val_split``: :func:`splits`)."""
    from d2ct.evaluation.coco_ap import coco_ap, label_map_to_rles
    from d2ct.postprocess.submission import PostprocessOptions
    from d2ct.postprocess.threshold import best_threshold, threshold_scores

    pr = pipe.cfg["predict"]
    post = PostprocessOptions(min_area=pr["min_area"], fallback_top_k=pr["fallback_top_k"])
    (folder, names, truth), (val_folder, val_names, val_truth) = test_split, val_split
    views = {}
    for flip in (False, True):
        tag = "flip" if flip else "plain"
        test = model_instances(model_dir, folder, names, run / "predict" / f"{name}_instances.json",
                               work / f"{name}_{tag}_instances.json", flip, work / f"{name}_{tag}.log")
        val = model_instances(model_dir, val_folder, val_names, run / "predict" / "val" / f"{name}_instances.json",
                              work / "val" / f"{name}_{tag}_instances.json", flip, work / f"{name}_{tag}_val.log")
        chosen = best_threshold(threshold_scores(val, val_names, val_truth, post, pr["threshold_grid"]))
        ap = coco_ap([label_map_to_rles(t)[0] for t in truth], [list(zip(test[n][0], test[n][1].tolist())) for n in names],
                     [truth[0].shape] * len(names))["AP"]
        views[tag] = {"instances": test, "val_threshold": chosen, "AP": ap}
    rows = []
    for policy in ("fixed", "val"):
        results = {}
        for tag, v in views.items():
            t = FIXED_THRESHOLD if policy == "fixed" else v["val_threshold"]
            results[tag] = (t, score(v["instances"], names, truth, t, post))
        plain, flip = results["plain"][1].per_image, results["flip"][1].per_image
        diff = (flip["ARI"].to_numpy() - plain["ARI"].to_numpy())
        mean, low, high = patient_bootstrap(diff, [patients[n] for n in plain["name"]])
        rows.append({"model": label,
                     "threshold": (f"{FIXED_THRESHOLD:g}" if policy == "fixed"
                                   else f"val: {results['plain'][0]:g} / {results['flip'][0]:g}"),
                     "ARI": (plain["ARI"].mean(), flip["ARI"].mean()), "diff": (mean, low, high),
                     "better_worse": (int((diff > 0).sum()), int((diff < 0).sum())),
                     "Dice": tuple(results[k][1].summary.get("Dice") for k in ("plain", "flip")),
                     "recall": tuple(results[k][1].summary.get("Recall50") for k in ("plain", "flip")),
                     "AP": (views["plain"]["AP"], views["flip"]["AP"]),
                     "truth_structures": float(plain["n_true"].mean()),
                     "structures": tuple(results[k][1].per_image["n_pred"].mean() for k in ("plain", "flip"))})
    return rows


def _pair(values, digits: int = 3) -> str:
    a, b = values
    return "-" if a is None or b is None else f"{a:.{digits}f} -> {b:.{digits}f}"


def table(rows: list[dict], n_slices: int, n_patients: int, unit: str = "patients") -> str:
    truth_structures = rows[0]["truth_structures"] if rows else float("nan")
    lines = ["# Horizontal-flip test-time augmentation on OpenKBP", "",
             "Written by `experiments/openkbp/flip_tta.py` (commands in experiments/openkbp/README.md). Each model "
             f"scored on the {n_slices} held-out test slices without and with flip TTA (plain -> flip); "
             f"threshold: {FIXED_THRESHOLD:g} for both, or each one's own chosen on the validation split (val: plain / flip); "
             "structures / slice: after flattening at that threshold (the truth has "
             f"{truth_structures:.2f}). "
             f"Difference: per-slice ARI (all pixels), flip minus plain; 95% interval from 10,000 bootstrap "
             f"resamples of the {n_patients} test {unit} (seed 0).", "",
             "| model | threshold | ARI (all pixels) | flip - plain | 95% interval | slices better / worse | Dice "
             "| recall@0.5 | mask AP | structures / slice |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mean, low, high = r["diff"]
        lines.append(f"| {r['model']} | {r['threshold']} | {_pair(r['ARI'])} | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] "
                     f"| {r['better_worse'][0]} / {r['better_worse'][1]} | {_pair(r['Dice'])} | {_pair(r['recall'])} "
                     f"| {_pair(r['AP'], 1)} | {_pair(r['structures'], 2)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_run_folder_arguments(p)
    p.add_argument("--only", nargs="+", default=list(DEFAULT_RUNS),
                   help="runs whose final models are scored (default: %(default)s); the radiologists of the "
                        "first are scored too")
    p.add_argument("--work", type=Path, help="predictions go here (default: <runs>/flip_tta)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "OPENKBP_flip_tta.md")
    args = p.parse_args(argv)
    spec = load_variants(args.variants)
    unknown = sorted(set(args.only) - set(spec["variants"]))
    if unknown:
        raise SystemExit(f"--only: {', '.join(unknown)} not in {args.variants}")
    exp = experiment_of(args, spec)
    work = args.work.resolve() if args.work else exp.runs / "flip_tta"
    args.out = args.out.resolve()
    os.chdir(ROOT)  # the pipeline config's paths are relative to the project
    runs, rows, seen = Runs(exp), [], set()
    for i, variant in enumerate(args.only):
        run = exp.run_dir(variant)
        pipe = runs.pipeline(variant) if (run / "evaluate" / "table.json").exists() else None
        if pipe is None or not (pipe.student_dir(pipe.rounds()) / "model_final.pth").exists():
            raise SystemExit(f"{run}: not a finished run (python experiments/openkbp/run.py --only {variant} first)")
        if i == 0:
            patients, unit = runs.groups()
        models = pipe.models() if i == 0 else [m for m in pipe.models() if m[0] == pipe.final_model_name()]
        test_split, val_split = splits(pipe)
        for name, model_dir in models:
            if model_dir.resolve() in seen:  # a teacher that is another run's final model
                continue
            seen.add(model_dir.resolve())
            label = f"{variant} {name}" if name.startswith("student_r") else name
            print(f"{label}: {model_dir}", flush=True)
            rows += compare_model(label, model_dir, run, name, pipe, work / variant, patients, test_split, val_split)
            atomic_write_text(args.out, table(rows, len(patients), len(set(patients.values())), unit))
    publish(args.out, table(rows, len(patients), len(set(patients.values())), unit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
