"""Run the whole d2ct method in one command, resumably.

Stages: data (generate the phantom or check the data set; COCO files; preview) -> baseline
(classical watershed) -> radiologists (train the three Mask R-CNNs) -> pseudolabel (weigh them by
validation mask AP; label the unlabelled pool) -> final (train on labelled + pseudo-labelled)
-> predict (every model on the evaluation split; submission.csv) -> evaluate (ARI, Dice, mask AP)
-> report (report/report.md with plots). A stage whose outputs are complete is skipped, so
running the same command again after a kill resumes; --from STAGE re-runs a stage and the rest.

Examples (d2ct-pipeline = python tools/run_pipeline.py = python -m d2ct.pipeline.cli):
  d2ct-pipeline --config configs/demo/pipeline.yaml
  d2ct-pipeline --config configs/pipeline.yaml --set num_gpus=2 pseudolabel.mode=consensus
  python tools/run_pipeline.py --config configs/pipeline.yaml --from pseudolabel
"""
import argparse
import logging
import sys

from d2ct.pipeline.config import STAGES, load_pipeline_config
from d2ct.pipeline.report import format_table
from d2ct.pipeline.runner import Pipeline
from d2ct.utils.cli import prog, run_cli


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog=prog(), description="\n\n".join(doc[:2]), epilog=doc[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="pipeline YAML (configs/pipeline.yaml, configs/demo/pipeline.yaml)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override pipeline keys, e.g. num_gpus=2 pseudolabel.rounds=2 radiologists.0.threshold=0.8")
    p.add_argument("--from", dest="from_stage", choices=STAGES, help="re-run from this stage (its outputs are removed)")
    p.add_argument("--until", choices=STAGES, help="stop after this stage")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(_run, args)


def _run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    cfg = load_pipeline_config(args.config, args.set)
    pipeline = Pipeline(cfg, args.config)
    from d2ct.utils.fileio import check_writable

    check_writable(pipeline.out, kind="dir", option="out (pipeline config)")
    pipeline.run(from_stage=args.from_stage, until=args.until)
    if pipeline.is_done("evaluate"):
        print()
        print(format_table(pipeline))
        print(f"\nreport: {pipeline.out / 'report' / 'report.md'}   submission: {pipeline.out / 'submission.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
