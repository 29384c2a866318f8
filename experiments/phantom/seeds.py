#!/usr/bin/env python
"""Paired differences pooled over training seeds (experiments/phantom/README.md).

For each pair ``A - B`` and each seed suffix (``""`` is seed 42, ``_seed7``, ``_seed11``): the mean
per-slice difference of all-pixel ARI between the final models of runs ``A<suffix>`` and
``B<suffix>`` on the same test slices; then the per-slice differences averaged over the seeds, with
a 95% interval from resampling the slices (each phantom slice is its own "patient"). Reads finished
run folders of ``experiments/openkbp/run.py`` (``<runs>/<variant>/evaluate/student_r*/per_image.csv``);
trains nothing.

  python experiments/phantom/seeds.py ~/d2ct-runs/phantom-noise --seeds "" _seed7 _seed11 \\
      --pair strong_ensemble_noisier strong_labelled_noisier --pair strong_labelled_noisier strong_labelled \\
      --out experiments/phantom/results/PHANTOM_noise_seeds.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from d2ct.evaluation.metrics import group_bootstrap  # noqa: E402
from experiments.abdomen.folds import difference_row, last_student, read_per_image  # noqa: E402
from experiments.openkbp.tables import publish  # noqa: E402


def final_scores(runs: Path, variant: str) -> dict[str, float]:
    """{slice: all-pixel ARI} of a run's last student."""
    student = last_student(runs / variant)
    if student is None:
        raise SystemExit(f"{runs / variant}: no evaluated student (evaluate/student_r*/per_image.csv); is the run finished?")
    return {name: s["ARI"] for name, s in read_per_image(student).items()}


def pooled_pair(runs: Path, a: str, b: str, seeds: list[str]) -> tuple[list[float], tuple[float, float, float], int, int]:
    """(per-seed mean of a - b, (mean over slices of the seed-averaged difference, 95% interval),
    slices where that average is positive, slices)."""
    per_seed, rows, slices = [], [], None
    for suffix in seeds:
        sa, sb = final_scores(runs, a + suffix), final_scores(runs, b + suffix)
        if set(sa) != set(sb):
            raise SystemExit(f"{a + suffix} and {b + suffix} were scored on different slices")
        if slices is not None and set(sa) != slices:
            raise SystemExit(f"{a + suffix}: scored on other slices than {a + seeds[0]}")
        slices = set(sa)
        d = np.array([sa[n] - sb[n] for n in sorted(sa)])
        per_seed.append(float(d.mean()))
        rows.append(d)
    avg = np.mean(rows, axis=0)
    return per_seed, group_bootstrap(avg.tolist(), list(range(len(avg)))), int((avg > 0).sum()), len(avg)


def table(runs: Path, pairs: list[tuple[str, str]], seeds: list[str]) -> str:
    labels = [s.lstrip("_").replace("seed", "seed ") or "seed 42" for s in seeds]
    lines = ["# Paired differences pooled over seeds", "",
             f"Written by `experiments/phantom/seeds.py` (commands in experiments/phantom/README.md) from `{runs}`. "
             "Per-slice all-pixel ARI of the first run's final model minus the second's, each seed's pair on the "
             "same test slices; pooled: the per-slice differences averaged over the seeds, 95% interval from "
             "10,000 resamples of the slices (seed 0).", "",
             "| pair | " + " | ".join(labels) + " | pooled (95% interval) | slices the first wins |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for a, b in pairs:
        lines.append(difference_row(f"{a} - {b}", *pooled_pair(runs, a, b, seeds)))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="the runs folder (run.py --runs)")
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"),
                   help="variant names without the seed suffix: A - B")
    p.add_argument("--seeds", nargs="+", default=["", "_seed7"], metavar="SUFFIX",
                   help='the variants\' seed suffixes ("" for the default seed; default: %(default)s)')
    p.add_argument("--out", type=Path, help="write the table here (atomically) as well as printing it")
    args = p.parse_args(argv)
    text = table(args.runs.expanduser().resolve(), [tuple(x) for x in args.pair], args.seeds)
    if args.out:
        publish(args.out, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
