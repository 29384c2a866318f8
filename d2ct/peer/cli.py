"""Train the U-Net peer (MONAI) on a data set's labelled slices and write its submission CSV.

A yardstick for the Mask R-CNN method, not a stage of it (d2ct/peer/unet.py): foreground and
boundary classes -> connected components -> label map. It trains on the same train/validation
split as the Mask R-CNN models (same --val-fraction, --split-seed, --group-by), for --iters
iterations or --seconds of wall time, keeps the checkpoint with the best validation ARI, predicts
the test split (or the validation split when there is none), writes OUT/submission.csv in the
challenge layout and, when that split has labels, OUT/evaluate/summary.json.

Examples (d2ct-train-unet = python tools/train_unet.py = python -m d2ct.peer.cli):
  d2ct-train-unet --data datasets/openkbp_holdout --out output/unet --group-by patient \\
      --iters 20000 --seconds 3600
  python tools/evaluate.py --truth datasets/openkbp_holdout/test-labels.csv.gz --pred output/unet/submission.csv
"""
from __future__ import annotations

import argparse
import logging
import sys

from d2ct.utils.cli import prog, run_cli


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog=prog(), description="\n\n".join(doc[:2]), epilog=doc[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DIR", help="data set folder in the challenge layout")
    p.add_argument("--out", default="output/unet", metavar="DIR", help="output folder (default output/unet)")
    p.add_argument("--iters", type=int, default=2000, help="training iterations (default 2000)")
    p.add_argument("--seconds", type=float, default=0.0, help="wall-time budget for training (0: none)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-period", type=int, default=200, help="validation ARI every N iterations")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128, 256],
                   help="feature widths per level (default 16 32 64 128 256)")
    p.add_argument("--no-boundary", action="store_true", help="foreground only (no boundary class)")
    p.add_argument("--min-area", type=int, default=5, help="drop predicted structures smaller than this")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--group-by", default=None, help="manifest column kept whole in the split (e.g. patient)")
    p.add_argument("--manifest", default=None)
    p.add_argument("--predict", default="auto", choices=["auto", "test", "val"], help="split to predict")
    p.add_argument("--limit", type=int, default=0, help="use at most N training slices (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(_run, args)


def _run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from d2ct.evaluation.report import format_summary
    from d2ct.peer.unet import UNetOptions, run_unet_peer

    options = UNetOptions(channels=tuple(args.channels), boundary=not args.no_boundary, max_iter=args.iters,
                          max_seconds=args.seconds, batch_size=args.batch_size, lr=args.lr,
                          eval_period=args.eval_period, min_area=args.min_area, seed=args.seed, device=args.device)
    summary = run_unet_peer(args.data, args.out, options, val_fraction=args.val_fraction,
                            split_seed=args.split_seed, group_by=args.group_by, manifest=args.manifest,
                            predict_split=args.predict, limit=args.limit)
    print(f"U-Net: {summary['iterations']} iterations in {summary['seconds']} s on {summary['device']}; best "
          f"validation ARI {summary['best']['ARI']} at iteration {summary['best']['iteration']}; "
          f"{summary['predicted']} {summary['predicted_split']} slices -> {summary['submission']}")
    if "scores" in summary:
        print(format_summary(summary["scores"], f"U-Net peer on the {summary['predicted_split']} split"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
