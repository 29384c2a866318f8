"""Hold out whole patients of a labelled data set as a labelled test split (test-images/ +
test-labels.csv.gz), leaving their unlabelled slices out too, for honest final scores.

Example (the real-data experiments in the README;
d2ct-make-holdout = python tools/make_holdout.py = python -m d2ct.data.cli.make_holdout):
  d2ct-make-holdout --data datasets/openkbp_fewshot --out datasets/openkbp_holdout \\
      --test-fraction 0.2 --group-by patient --seed 0
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from d2ct.utils.cli import prog, run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog(), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--data", required=True, help="source data set folder in the challenge layout, with a manifest")
    p.add_argument("--out", required=True, help="new data set folder (written atomically)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of labelled images held out (default 0.2)")
    p.add_argument("--group-by", default="patient", help="manifest column kept whole (default patient)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    p.add_argument("--manifest", help="manifest CSV (default DATA/manifest.csv)")
    p.add_argument("--link", action="store_true", help="symbolic links to the source images instead of copies")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    return run_cli(_run, args)


def _run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from d2ct.data.holdout import make_holdout
    from d2ct.utils.fileio import check_writable

    check_writable(args.out, kind="dir", option="--out")

    summary = make_holdout(args.data, args.out, test_fraction=args.test_fraction, group_by=args.group_by,
                           seed=args.seed, manifest=args.manifest, link=args.link, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if k != "test_images"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
