"""Score a prediction CSV against a truth CSV (challenge layout): ARI (all pixels, the organisers'
script; and excluding truth background, the written rules), class-agnostic Dice / recall /
precision at IoU 0.5, and COCO mask AP. Two NIfTI label volumes (.nii/.nii.gz, same grid) get 3-D
scores instead: 3-D ARI, per-structure Dice after Hungarian matching in 3-D, and the structures
found / missed / split / merged (docs/volumes.md).

Example (d2ct-evaluate = python tools/evaluate.py = python -m d2ct.evaluation.cli):
    d2ct-evaluate --truth data/labels.csv.gz --pred out/baseline.csv.gz \\
        --annotated data/annotated.json --manifest data/manifest.csv --group-by patient_contours \\
        --out out/eval_baseline
    d2ct-evaluate --truth phantom3d/labels.nii.gz --pred seg.nii.gz --out out/eval_volume
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d2ct.utils.cli import prog, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog(),
        description="Evaluate predicted label maps against the truth, both as challenge CSVs (rows = pixels, "
        "one column per image). Prints a summary table; with --out also writes summary.json, per_image.csv, "
        "by_<column>.csv and ari_hist.png.")
    p.add_argument("--truth", required=True, help="truth labels CSV (.csv or .csv.gz), or a NIfTI label volume")
    p.add_argument("--pred", required=True, help="predicted labels CSV; must have a column for every scored image "
                                                 "(or a NIfTI label volume on the truth's grid)")
    p.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"),
                   help="image size (default: square, from the number of pixel rows)")
    p.add_argument("--annotated", metavar="JSON",
                   help="annotated list (annotated.json / annotated_labels.json): only those images are scored")
    empty = p.add_mutually_exclusive_group()
    empty.add_argument("--skip-empty", action="store_true", default=None,
                       help="skip images whose truth column is all zero (the default without --annotated: "
                            "such columns are the unlabelled pool)")
    empty.add_argument("--include-empty", dest="skip_empty", action="store_false",
                       help="also score images whose truth column is all zero (as images with no structure)")
    p.add_argument("--manifest", metavar="CSV", help="per-image manifest (a file/name/id column) for --group-by")
    p.add_argument("--group-by", action="append", default=[], metavar="COLUMN",
                   help="break the scores down by this manifest column (repeatable)")
    p.add_argument("--no-ap", action="store_true", help="skip COCO mask AP (faster)")
    p.add_argument("--out", metavar="DIR", help="folder for summary.json, per_image.csv, by_*.csv, ari_hist.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(_run, args)


def _run(args) -> int:
    from d2ct.evaluation.volume_metrics import evaluate_volume_cli, is_volume_path

    if is_volume_path(args.truth) or is_volume_path(args.pred):  # label volumes: 3-D scores
        return evaluate_volume_cli(args.truth, args.pred, args.out)
    from d2ct.evaluation.report import (
        breakdown,
        evaluate_csv,
        format_frame,
        format_summary,
        load_manifest,
        write_report,
    )
    from d2ct.errors import ConfigError
    from d2ct.utils.fileio import check_writable

    if args.group_by and not args.manifest:
        raise ConfigError("--group-by needs --manifest")
    check_writable(args.out, kind="dir", option="--out")
    manifest = load_manifest(args.manifest) if args.manifest else None
    if manifest is not None:
        for col in args.group_by:
            if col not in manifest.columns:
                raise ConfigError(f"--group-by {col!r}: not a column of {args.manifest}")
    result = evaluate_csv(args.truth, args.pred, shape=args.shape, annotated=args.annotated,
                          skip_empty=args.skip_empty, with_ap=not args.no_ap, progress=not args.quiet)
    print(format_summary(result.summary, title=f"{args.pred} vs {args.truth}"))
    for line in left_out_lines(result.info):
        print(line, file=sys.stderr)
    for col in args.group_by:
        print(f"\nby {col}:")
        print(format_frame(breakdown(result.per_image, manifest, col)))
    if args.out:
        paths = write_report(result, args.out, manifest=manifest, group_by=args.group_by,
                             title=Path(args.pred).name)
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def left_out_lines(info: dict) -> list[str]:
    """One line per kind of image not scored: nothing is dropped or ignored without a word."""
    what = {
        "skipped_empty": ("all-zero (unlabelled) truth column(s) not scored", "--include-empty scores them"),
        "skipped_unannotated": ("truth column(s) not in --annotated not scored", ""),
        "ignored_pred_columns": ("prediction column(s) with no scored truth image ignored", ""),
    }
    lines = []
    for key, (text, hint) in what.items():
        n = info.get(key) or 0
        if n:
            first = info.get(f"{key}_first")
            lines.append(f"note: {n} {text}" + (f" (first: {first})" if first else "") + (f"; {hint}" if hint else ""))
    return lines


if __name__ == "__main__":
    sys.exit(main())
