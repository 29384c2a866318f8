"""Write the procedural abdominal CT phantom (d2ct's embedded default data) in the challenge layout.

Example (d2ct-make-phantom = python tools/make_phantom.py = python -m d2ct.data.cli.make_phantom):
    d2ct-make-phantom --out datasets/phantom --n-train 60 --n-labelled 20 --n-test 20 \\
        --preview datasets/phantom/preview.png
    d2ct-make-phantom --volume --out datasets/phantom3d --n-slices 40 --preview phantom3d.png
"""
from __future__ import annotations

import argparse
import sys
import time

from d2ct.utils.cli import prog, run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog(),
        description="Write a procedural abdominal CT phantom data set in the challenge layout: "
        "train-images/, labels.csv.gz (first N labelled, the rest an all-zero unlabelled pool), "
        "annotated.json, test-images/ + test-labels.csv.gz, manifest.csv, phantom.json. "
        "Same parameters -> byte-identical files; an existing complete set is left as it is.")
    p.add_argument("--out", required=True, help="output folder (replaced atomically when it is an older phantom set)")
    p.add_argument("--n-train", type=int, default=60, help="training images (default 60)")
    p.add_argument("--n-labelled", type=int, default=20, help="how many of them have labels (default 20)")
    p.add_argument("--n-test", type=int, default=20, help="test images with truth labels (default 20)")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--label-dropout", type=float, default=0.15,
                   help="probability that a visible structure stays unlabelled (default 0.15)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1; the result does not depend on it)")
    p.add_argument("--pool-truth", action="store_true",
                   help="also write the hidden labels of the unlabelled pool as train-truth-labels.csv.gz")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a phantom set")
    p.add_argument("--preview", metavar="PNG", help="also draw a grid of labelled slices with their labels to PNG")
    p.add_argument("--preview-n", type=int, default=8, help="slices in the preview (default 8)")
    p.add_argument("--volume", action="store_true",
                   help="write a 3-D phantom instead: ct.nii.gz, labels.nii.gz (one label per organ, the same on "
                        "every slice) and structures.json; --size, --seed, --n-slices, --preview apply")
    p.add_argument("--n-slices", type=int, default=40, help="--volume: axial slices (default 40)")
    args = p.parse_args(argv)
    return run_cli(_run, args)


def _run(args) -> int:
    from d2ct.data.phantom import write_phantom_dataset, write_phantom_volume, write_preview

    from d2ct.utils.fileio import check_writable

    check_writable(args.out, kind="dir", option="--out")
    check_writable(args.preview, kind="file", option="--preview")
    t0 = time.perf_counter()
    if args.volume:
        paths = write_phantom_volume(args.out, seed=args.seed, size=args.size, n_slices=args.n_slices,
                                     overwrite=args.overwrite, preview=args.preview)
        print(f"3-D phantom: {', '.join(str(v) for v in paths.values())} ({time.perf_counter() - t0:.1f} s)")
        return 0
    root = write_phantom_dataset(args.out, n_train=args.n_train, n_labelled=args.n_labelled, n_test=args.n_test,
                                 size=args.size, seed=args.seed, workers=args.workers,
                                 label_dropout=args.label_dropout, pool_truth=args.pool_truth,
                                 overwrite=args.overwrite)
    print(f"phantom data set in {root} ({time.perf_counter() - t0:.1f} s)")
    if args.preview:
        print(f"preview: {write_preview(root, args.preview, n=args.preview_n)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
