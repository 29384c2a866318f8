#!/usr/bin/env python
"""Train (or evaluate) a d2ct Mask R-CNN: a radiologist or the final model.

Examples:
  python tools/train_net.py --config configs/radiologist_r50.yaml --num-gpus 2
  python tools/train_net.py --config configs/scratch/radiologist_r50.yaml OUTPUT_DIR output/r50
  python tools/train_net.py --config configs/final.yaml --resume          # continue a killed run
  python tools/train_net.py --config configs/final.yaml --eval-only MODEL.WEIGHTS output/final/model_best.pth
Two machines: add --num-machines 2 --machine-rank {0,1} --dist-url tcp://HOST0:PORT on each.
"""
import sys

from d2ct.engine import Trainer, default_argument_parser, launch, setup
from d2ct.engine.checkpoint import AtomicCheckpointer
from d2ct.errors import D2CTError


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    parser = default_argument_parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2])
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("--config FILE is required (for example configs/demo/radiologist_r50.yaml)")
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except D2CTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
