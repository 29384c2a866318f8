#!/usr/bin/env python
"""Write a PNG grid of the student's augmented samples with their masks (D2CT.AUGMENT.STUDENT).

Each row: a slice with its masks, then --views augmented training samples of it, masks drawn over
the image they came out with. Slices come from a data set's labelled training split (and, with
--pseudo, from a pseudo_labels.json written by tools/pseudolabel.py); the student's policy is
applied to all of them here (APPLY_TO all), copy-paste sources are the labelled training slices.

Examples:
  .venv/bin/python bench/augment_preview.py --data datasets/sample --out output/augment_preview.png
  .venv/bin/python bench/augment_preview.py --config configs/cpu/final.yaml --data datasets/openkbp_holdout \\
      --pseudo output/cpu_pipeline/pseudolabels/pseudo_labels.json --out output/augment_openkbp.png \\
      D2CT.AUGMENT.STUDENT.ROTATION 30.0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo" / "final.yaml"), help="Detectron2 YAML")
    p.add_argument("--data", required=True, help="data set folder (challenge layout)")
    p.add_argument("--pseudo", help="pseudo_labels.json: its slices are shown too")
    p.add_argument("--out", default="output/augment_preview.png")
    p.add_argument("--slices", type=int, default=4, help="slices per source (labelled, pseudo-labelled)")
    p.add_argument("--views", type=int, default=4, help="augmented samples per slice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time", type=int, default=0, metavar="N",
                   help="also time the mapper: N rounds over the slices, the teachers' mild policy and the "
                        "student's interleaved (ms per slice, median of rounds)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)

    import numpy as np
    from detectron2.data import DatasetCatalog

    from d2ct.config import setup_cfg
    from d2ct.data.augment import augmentation_grid
    from d2ct.data.coco import load_coco_dicts
    from d2ct.data.register import register_challenge_dataset
    from d2ct.engine.mapper import CTDatasetMapper

    cfg = setup_cfg(args.config, ["D2CT.DATA_NAME", "preview", "D2CT.DATA_ROOT", args.data,
                                  "DATASETS.TRAIN", "('preview_train',)", "D2CT.AUGMENT.STUDENT.ENABLED", "True",
                                  "D2CT.AUGMENT.STUDENT.APPLY_TO", "all", *args.opts])
    register_challenge_dataset("preview", args.data, val_fraction=cfg.D2CT.VAL_FRACTION, seed=cfg.D2CT.SPLIT_SEED)
    np.random.seed(args.seed)
    mapper = CTDatasetMapper(cfg, is_train=True)
    rng = np.random.default_rng(args.seed)
    labelled = DatasetCatalog.get("preview_train")
    dicts = [labelled[i] for i in sorted(rng.choice(len(labelled), min(args.slices, len(labelled)), replace=False))]
    if args.pseudo:
        pseudo = load_coco_dicts(args.pseudo)
        dicts += [pseudo[i] for i in sorted(rng.choice(len(pseudo), min(args.slices, len(pseudo)), replace=False))]
    path = augmentation_grid(mapper, dicts, args.out, views=args.views,
                             title="student augmentation (D2CT.AUGMENT.STUDENT): masks over the augmented image")
    print(f"{len(dicts)} slices x {args.views} augmented views -> {path}")
    if args.time:
        import copy
        import time

        mild = CTDatasetMapper(setup_cfg(args.config, ["D2CT.DATA_NAME", "preview", "D2CT.DATA_ROOT", args.data,
                                                       "DATASETS.TRAIN", "('preview_train',)", *args.opts]),
                               is_train=True)
        rounds = {"mild (teachers)": [], "student": []}
        for _ in range(args.time):  # interleaved, so both see the same load on a shared machine
            for name, m in (("mild (teachers)", mild), ("student", mapper)):
                start = time.perf_counter()
                for d in dicts:
                    m(copy.deepcopy(d))
                rounds[name].append((time.perf_counter() - start) / len(dicts) * 1000)
        for name, ms in rounds.items():
            print(f"{name:<16} {np.median(ms):7.1f} ms per slice (median of {args.time} rounds over {len(dicts)} slices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
