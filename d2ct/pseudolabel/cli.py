"""Pseudo-label the unlabelled pool with the trained radiologists.

Each radiologist is a tools/train_net.py output folder (config.yaml, model_best.pth and
model_best.json with its validation mask AP). Writes OUT/pseudo_labels.json (COCO, with
scores), stats.json, report.md, score_histogram.png and overlays.png.

Examples (d2ct-pseudolabel = python tools/pseudolabel.py = python -m d2ct.pseudolabel.cli):
  d2ct-pseudolabel --models output/radiologist_r50 output/radiologist_r101 output/radiologist_x101
  python tools/pseudolabel.py --models output/r50 output/r101 output/x101 --thresholds 0.8 0.7 0.7 \\
      --mode consensus --data datasets/openkbp --out output/pseudolabels_consensus --num-gpus 2
"""
import argparse
import sys
from pathlib import Path

from detectron2.utils.logger import setup_logger

from d2ct.config import setup_cfg
from d2ct.data.challenge import ChallengeDataset
from d2ct.engine import launch_cli
from d2ct.errors import ConfigError
from d2ct.pseudolabel.radiologists import Radiologist
from d2ct.pseudolabel.ensemble import EnsembleOptions
from d2ct.pseudolabel.run import MODES, ConsensusOptions, pseudo_label_pool
from d2ct.utils.cli import prog
from d2ct.utils.fileio import check_writable


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog=prog(), description="\n\n".join(doc[:2]), epilog=doc[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="DIR", help="radiologist training output folders")
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="one name per model, used in stats.json and cache/<name>.json (default: each folder's name)")
    p.add_argument("--aps", nargs="+", type=float, metavar="AP",
                   help="validation mask APs, one per model (default: read from each model_best.json)")
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.7], metavar="T",
                   help="score threshold per model, or one for all (default 0.7; higher = fewer, cleaner labels)")
    p.add_argument("--mode", choices=MODES, default="partition",
                   help="partition: each model labels a share of the pool proportional to its AP (the published "
                        "method); consensus: every model labels everything, agreed structures are kept; "
                        "ensemble: every model labels everything, instances are fused and scored by the "
                        "models' AP-weighted agreement")
    p.add_argument("--data", metavar="DIR", help="data set folder (default: the first model's D2CT.DATA_ROOT)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N pool images (0 = all)")
    p.add_argument("--out", default="output/pseudolabels", help="output folder (default output/pseudolabels)")
    p.add_argument("--min-area", type=int, default=10, help="drop instances smaller than this (pixels)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pool partition")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--flip-tta", action="store_true", help="fuse predictions on the slice and its mirror image")
    p.add_argument("--min-votes", type=int, default=2, help="consensus: models that must agree")
    p.add_argument("--single-model-score", type=float, default=0.9,
                   help="consensus: keep a structure seen by fewer models when one scores at least this")
    p.add_argument("--consensus-iou", type=float, default=0.5,
                   help="consensus and ensemble: mask IoU of the same structure")
    p.add_argument("--ensemble-threshold", type=float, default=None, metavar="T",
                   help="ensemble: fused score a structure needs (default: the models' thresholds averaged "
                        "with their AP weights)")
    p.add_argument("--ensemble-vote", type=float, default=0.5,
                   help="ensemble: share of the members' weighted score a pixel needs to be in the fused mask")
    p.add_argument("--ignore-below", type=float, default=None, metavar="S",
                   help="partition and ensemble: also keep instances scored from S up to the model's threshold, as ignore "
                        "regions (COCO iscrowd) that the final training learns neither as structure nor as "
                        "background (default: dropped, the published method)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (GPUs, or CPU processes)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto")
    return p


def build_radiologists(args) -> list[Radiologist]:
    n = len(args.models)
    thresholds = args.thresholds * n if len(args.thresholds) == 1 else args.thresholds
    if len(thresholds) != n:
        raise ConfigError(f"--thresholds: give one value or {n} (one per model), got {len(args.thresholds)}")
    if args.aps is not None and len(args.aps) != n:
        raise ConfigError(f"--aps: give {n} values (one per model), got {len(args.aps)}")
    if args.names is not None and len(args.names) != n:
        raise ConfigError(f"--names: give {n} names (one per model), got {len(args.names)}")
    names = args.names or [Path(d).name for d in args.models]
    return [Radiologist.from_output_dir(d, threshold=t, ap=None if args.aps is None else args.aps[i], name=name)
            for i, (d, t, name) in enumerate(zip(args.models, thresholds, names))]


def run(args):
    """One pseudo-labelling process; ``launch`` starts one per GPU / CPU process."""
    if args.limit < 0:
        raise ConfigError(f"--limit must be >= 0 (0 = the whole pool), got {args.limit}")
    check_writable(args.out, kind="dir", option="--out")
    setup_logger(name="d2ct")
    setup_logger()
    radiologists = build_radiologists(args)
    root = args.data or setup_cfg(radiologists[0].config).D2CT.DATA_ROOT
    dataset = ChallengeDataset.open(root)
    names = dataset.unlabelled_names[: args.limit or None]
    if not names:
        raise ConfigError(f"{root}: the unlabelled pool is empty")
    index = {n: i for i, n in enumerate(dataset.names)}
    pool = [(n, str(dataset.image_path(n)), index[n]) for n in names]
    stats = pseudo_label_pool(
        radiologists, pool, args.out, mode=args.mode, seed=args.seed, min_area=args.min_area,
        batch_size=args.batch_size, flip_tta=args.flip_tta,
        consensus=ConsensusOptions(args.consensus_iou, args.min_votes, args.single_model_score),
        ensemble=EnsembleOptions(iou_threshold=args.consensus_iou, vote=args.ensemble_vote,
                                 threshold=args.ensemble_threshold),
        ignore_below=args.ignore_below,
    )
    if stats is not None:
        print(f"{stats['labelled_images']} of {stats['pool_images']} pool images pseudo-labelled "
              f"({stats['instances']} instances, {stats['ignore_regions']} ignore regions, "
              f"{stats['excluded_images']} excluded) -> {args.out}/pseudo_labels.json")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return launch_cli(run, args)


if __name__ == "__main__":
    sys.exit(main())
