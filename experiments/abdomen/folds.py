#!/usr/bin/env python
"""The abdominal folds side by side: every model's score on each fold's held-out patient, both folds
pooled, and paired differences (experiments/abdomen/README.md).

Each fold is one runs folder of ``experiments/openkbp/run.py --variants experiments/abdomen/variants.yaml``
(one patient trains, the other is the test split). Reads each fold's finished run folders
(``<runs>/<variant>/evaluate/<model>/per_image.csv`` and ``evaluate/table.json``, the peers'
``<runs>/<peer>/evaluate/``); trains nothing. The models: the reference run's baseline and
radiologists, every variant's final model, every peer. With two patients there is no patient
bootstrap: the intervals resample the pooled test slices, which are not independent (one patient's
slices), so they are narrower than they should be; the per-fold means say more.

  python experiments/abdomen/folds.py ~/d2ct-runs/abdomen-test01 ~/d2ct-runs/abdomen-test07 \\
      --out experiments/abdomen/results/ABDOMEN.md
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from d2ct.evaluation.metrics import group_bootstrap  # noqa: E402
from experiments.openkbp.run import load_variants  # noqa: E402
from experiments.openkbp.tables import publish  # noqa: E402

COLUMNS = [("ARI", "ARI (all)"), ("ARI_fg", "ARI (fg)"), ("Dice", "Dice"), ("Recall50", "recall@0.5"),
           ("Precision50", "precision@0.5")]


def read_per_image(path: Path) -> dict[str, dict[str, float]]:
    with open(path, newline="") as fh:
        return {row["name"]: {k: float(row[k]) for k, _ in COLUMNS} for row in csv.DictReader(fh)}


def last_student(run_dir: Path) -> Path | None:
    """The per_image.csv of a run's last student (``evaluate/student_r<N>``), None before it is scored."""
    students = sorted((run_dir / "evaluate").glob("student_r*/per_image.csv"))
    return students[-1] if students else None


def difference_row(pair: str, per_group: list[float], pooled: tuple[float, float, float], wins: int, n: int) -> str:
    """One row of a paired-difference table: the per-group means, the pooled mean with its interval,
    how many slices the first model wins."""
    mean, low, high = pooled
    return (f"| {pair} | " + " | ".join(f"{d:+.3f}" for d in per_group)
            + f" | {mean:+.3f} [{low:+.3f}, {high:+.3f}] | {wins} of {n} |")


def fold_models(runs: Path, spec: dict) -> dict[str, Path]:
    """{row name: per_image.csv} of one fold: the reference run's baseline and radiologists
    (shared by every run), each variant's last student as the variant's name, each peer."""
    ref = spec["reference"]
    table = runs / ref / "evaluate" / "table.json"
    if not table.exists():
        raise SystemExit(f"{runs}: the reference run {ref!r} is not finished ({table} is missing)")
    models = {}
    for row in json.loads(table.read_text()):
        if not row["model"].startswith("student_r"):
            models[row["model"]] = runs / ref / "evaluate" / row["model"] / "per_image.csv"
    for variant in spec["variants"]:
        student = last_student(runs / variant)
        if student is not None:
            models[variant] = student
    for peer in spec["peers"]:
        f = runs / peer / "evaluate" / "per_image.csv"
        if f.exists():
            models[peer] = f
    return models


def collect(folds: list[Path], spec: dict) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """(fold names, {model: {fold: {slice: scores}}}), only the models every fold has."""
    names = [f.name for f in folds]
    if len(set(names)) != len(names):
        raise SystemExit(f"two folds share a folder name: {names}")
    per_fold = [fold_models(f, spec) for f in folds]
    common = [m for m in per_fold[0] if all(m in p for p in per_fold[1:])]
    return names, {m: {n: read_per_image(p[m]) for n, p in zip(names, per_fold)} for m in common}


def _pooled(scores: dict[str, dict], key: str) -> list[float]:
    return [s[key] for fold in scores.values() for s in fold.values()]


def difference(a: dict, b: dict, names: list[str]) -> tuple[list[float], tuple[float, float, float], int, int]:
    """(per-fold mean of a - b, (pooled mean, 95% interval over slices), slices a wins, slices)."""
    per_fold, diffs = [], []
    for n in names:
        if set(a[n]) != set(b[n]):
            raise SystemExit(f"fold {n}: the two models were scored on different slices")
        d = [a[n][s]["ARI"] - b[n][s]["ARI"] for s in sorted(a[n])]
        per_fold.append(float(np.mean(d)))
        diffs += d
    ids = list(range(len(diffs)))
    return per_fold, group_bootstrap(diffs, ids), int(sum(d > 0 for d in diffs)), len(diffs)


def table(folds: list[Path], spec: dict, pairs: list[tuple[str, str]]) -> str:
    names, models = collect(folds, spec)
    ref = spec["reference"]
    sizes = [len(next(iter(models.values()))[n]) for n in names] if models else []
    lines = [f"# {spec.get('title') or 'Folds'}", "",
             "Written by `experiments/abdomen/folds.py` (commands in experiments/abdomen/README.md). "
             "Each fold holds out one patient: " + ", ".join(f"`{n}` ({k} test slices)" for n, k in zip(names, sizes))
             + ". All-pixel ARI is the challenge's metric.", "",
             "| model | " + " | ".join(f"ARI (all), {n}" for n in names) + " | "
             + " | ".join(f"{t}, pooled" for _, t in COLUMNS) + " |",
             "|---|" + "---|" * (len(names) + len(COLUMNS))]
    for m, scores in models.items():
        label = f"{m} (control)" if m == ref else m
        lines.append(f"| {label} | " + " | ".join(f"{np.mean([s['ARI'] for s in scores[n].values()]):.3f}" for n in names)
                     + " | " + " | ".join(f"{np.mean(_pooled(scores, k)):.3f}" for k, _ in COLUMNS) + " |")
    lines += ["", "Paired differences of all-pixel ARI on the same slices; the interval resamples the pooled "
              "slices (too narrow: slices of one patient are not independent).", "",
              "| pair | " + " | ".join(names) + " | pooled (95% interval over slices) | slices the first wins |",
              "|---|" + "---|" * (len(names) + 2)]
    wanted = [(v, x["control"]) for v, x in spec["variants"].items() if x["control"]]  # the equal-compute pairs
    wanted += [(m, ref) for m in models if m != ref] + list(pairs)
    shown: set[tuple[str, str]] = set()
    for a, b in wanted:
        if a not in models or b not in models or (a, b) in shown or (b, a) in shown:
            continue  # a model not in every fold, or a pair already shown (either way round)
        shown.add((a, b))
        lines.append(difference_row(f"{a} - {b}", *difference(models[a], models[b], names)))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folds", nargs="+", type=Path, metavar="RUNS", help="each fold's runs folder (run.py --runs)")
    p.add_argument("--variants", type=Path, default=HERE / "variants.yaml")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="also A - B (model names as in the table); default: r50ct - r50, every pool-using "
                        "student - r50ct (the radiologist they start from), every model - each peer")
    p.add_argument("--out", type=Path, help="write the tables here (atomically) as well as printing them")
    args = p.parse_args(argv)
    spec = load_variants(args.variants.resolve())
    students = [v for v, x in spec["variants"].items() if x["control"]]
    pairs = [tuple(x) for x in args.pair] or [("r50ct", "r50")] + [(v, "r50ct") for v in students] + [
        (m, peer) for peer in spec["peers"] for m in [*spec["variants"], "r50", "r50ct"]]
    text = table([f.expanduser().resolve() for f in args.folds], spec, pairs)
    if args.out:
        publish(args.out, text)  # atomic write, then print it and where it went (the OpenKBP tables' way)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
