"""Convert one split of a challenge-layout data set folder to a single-class COCO JSON (RLE masks).

Every structure (non-zero label value, or connected component with --split-components) becomes an
instance of the one category "structure" (COCO id 1); each annotation keeps its original
``label_value``. Unlabelled images are listed with no annotations.

Examples (d2ct-convert-to-coco = python tools/convert_to_coco.py = python -m d2ct.data.cli.convert_to_coco):
  d2ct-convert-to-coco /work/shared/data/openkbp_fewshot --split train --out out/train.json
  python tools/convert_to_coco.py datasets/phantom --split labelled --split-components --min-area 5 --out out/l.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from d2ct.utils.cli import prog, run_cli


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(
        prog=prog(),
        description=doc[0], epilog=doc[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="folder in the challenge layout")
    parser.add_argument(
        "--split", required=True, choices=["train", "val", "labelled", "unlabelled", "test", "all"],
        help="train/val: seeded split of the labelled images; test: DATASET_DIR/test-images/; all: every image",
    )
    parser.add_argument("--out", required=True, metavar="FILE.json", help="COCO JSON to write (atomically)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of labelled images in val (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    parser.add_argument("--group-by", default=None, metavar="COLUMN",
                        help="keep the groups of this manifest column (e.g. patient) whole in the train/val split")
    parser.add_argument("--manifest", default=None, help="manifest CSV for --group-by (default: DATASET_DIR/manifest.csv)")
    parser.add_argument("--split-components", action="store_true",
                        help="one instance per connected component instead of per label value")
    parser.add_argument("--min-area", type=int, default=0, metavar="N", help="drop instances below N pixels")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes converting label maps (default: all usable cores)")
    parser.add_argument("--image-dir", default=None, help="image folder (default: train-images/ or images/)")
    parser.add_argument("--labels", default=None, help="labels CSV (default: labels.csv[.gz] in DATASET_DIR)")
    parser.add_argument("--annotated", default=None, help="annotated list (default: annotated*.json if present)")
    parser.add_argument("--relative", action="store_true",
                        help="write image file names relative to the JSON's folder (default: absolute)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(_run, args)


def _run(args) -> int:
    from d2ct.data.challenge import ChallengeDataset
    from d2ct.data.coco import to_coco_json
    from d2ct.data.register import split_dicts
    from d2ct.errors import ConfigError
    from d2ct.utils.fileio import atomic_write_json

    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.min_area < 0:
        raise ConfigError(f"--min-area must be >= 0, got {args.min_area}")
    from d2ct.utils.fileio import check_writable

    check_writable(args.out, kind="file", option="--out")
    dataset = ChallengeDataset.open(
        args.dataset_dir, image_dir=args.image_dir, labels=args.labels, annotated=args.annotated
    )
    if args.split == "test" and dataset.test_split() is None:
        raise ConfigError(f"--split test: {args.dataset_dir} has no test-images/ folder")
    dicts = split_dicts(
        dataset, args.split, val_fraction=args.val_fraction, seed=args.seed, group_by=args.group_by,
        manifest=args.manifest,
        split_components=args.split_components, min_area=args.min_area, workers=args.workers,
        progress=not args.no_progress,
    )
    out = Path(args.out)
    description = (
        f"d2ct: {Path(args.dataset_dir).name} split={args.split} val_fraction={args.val_fraction} "
        f"seed={args.seed} group_by={args.group_by} split_components={args.split_components} min_area={args.min_area}"
    )
    coco = to_coco_json(dicts, description=description, image_root=out.resolve().parent if args.relative else None)
    atomic_write_json(out, coco, indent=None)
    n_img, n_ann = len(coco["images"]), len(coco["annotations"])
    n_with = len({a["image_id"] for a in coco["annotations"]})
    print(
        f"{out}: {n_img} images ({n_with} with annotations), {n_ann} instances, "
        f"{n_ann / max(n_img, 1):.2f} instances per image"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
