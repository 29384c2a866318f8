"""Train (or evaluate) a d2ct Mask R-CNN: a radiologist or the final model.

Examples (d2ct-train = python tools/train_net.py = python -m d2ct.engine.train_net):
  d2ct-train --config configs/radiologist_r50.yaml --num-gpus 2
  d2ct-train --config configs/scratch/radiologist_r50.yaml OUTPUT_DIR output/r50
  d2ct-train --config configs/final.yaml --resume          # continue a killed run
  python tools/train_net.py --config configs/final.yaml --eval-only MODEL.WEIGHTS output/final/model_best.pth
Two machines: add --num-machines 2 --machine-rank {0,1} --dist-url tcp://HOST0:PORT on each.
"""
import sys

from d2ct.engine import Trainer, default_argument_parser, launch_cli, setup
from d2ct.engine.checkpoint import AtomicCheckpointer
from d2ct.utils.cli import prog


def run(args):
    """One training (or --eval-only) process; ``launch`` starts one per GPU / CPU process."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main(argv=None) -> int:
    parser = default_argument_parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2])
    parser.prog = prog() or parser.prog
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("--config FILE is required (for example configs/demo/radiologist_r50.yaml)")
    return launch_cli(run, args)


if __name__ == "__main__":
    sys.exit(main())
