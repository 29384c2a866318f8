"""Import a CT volume (NIfTI file or DICOM series folder), with an optional NIfTI label volume,
into the challenge layout: images/<i>.png, labels.csv.gz, annotated.json, manifest.csv, import.json.

Example (d2ct-import-volume = python tools/import_volume.py = python -m d2ct.data.cli.import_volume):
    d2ct-import-volume ct.nii.gz --labels seg.nii.gz --out datasets/case01 --size 256 \\
        --only-labelled --step 2 --renumber
"""
from __future__ import annotations

import argparse
import sys
import time

from d2ct.utils.cli import prog, run_cli


def _z_range(text: str) -> tuple[int, int]:
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP slice indices (e.g. 10:80), got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog(),
        description="Import a CT volume into the challenge layout. Slices are axial, inferior to superior, "
        "in the radiological view (anterior up, patient right on the image left), HU-windowed to uint8.")
    p.add_argument("image", help="a .nii / .nii.gz file or a folder holding one DICOM series")
    p.add_argument("--labels", help="NIfTI label volume on the same grid as the image (0 = background)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--level", type=float, default=40.0, help="window level in HU (default 40)")
    p.add_argument("--width", type=float, default=400.0, help="window width in HU (default 400)")
    p.add_argument("--size", type=int, help="resample slices to SIZE x SIZE (square pixels, padded with air)")
    p.add_argument("--step", type=int, default=1, help="keep every STEP-th selected slice (default 1)")
    p.add_argument("--z-range", type=_z_range, metavar="START:STOP", help="display slice indices [START, STOP)")
    p.add_argument("--only-labelled", action="store_true", help="keep only slices with at least one label")
    p.add_argument("--renumber", action="store_true",
                   help="renumber each slice's labels as a random permutation of 1..K (as in the challenge)")
    p.add_argument("--seed", type=int, default=0, help="seed of --renumber (default 0)")
    p.add_argument("--series", help="SeriesInstanceUID, when the DICOM folder holds several series")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    return run_cli(_run, args)


def _run(args) -> int:
    from d2ct.data.volumes import import_volume

    from d2ct.utils.fileio import check_writable

    check_writable(args.out, kind="dir", option="--out")
    t0 = time.perf_counter()
    s = import_volume(args.image, args.out, label_path=args.labels, level=args.level, width=args.width,
                      size=args.size, step=args.step, z_range=args.z_range, only_labelled=args.only_labelled,
                      renumber=args.renumber, seed=args.seed, series_uid=args.series, overwrite=args.overwrite)
    print(f"{s.n_slices} slices of {s.image_shape[0]}x{s.image_shape[1]} px "
          f"({s.spacing[1]:.3g}x{s.spacing[2]:.3g} mm, slices {s.spacing[0]:.3g} mm; "
          f"{s.n_labelled} with labels) from a {s.volume_shape} volume -> {s.out_dir} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
