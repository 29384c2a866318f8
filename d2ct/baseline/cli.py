"""The organisers' classical watershed baseline: segment every slice of an image folder and write a
submission CSV, or compare the presets on labelled images.

Examples (d2ct-baseline = python tools/baseline.py = python -m d2ct.baseline.cli):
    # submission for a folder of slices (2 processes)
    d2ct-baseline --images data/test-images --out out/baseline.csv.gz --preset clahe_tv --workers 2

    # the preset comparison table on the labelled images of a challenge-layout folder
    python tools/baseline.py --data /work/shared/data/openkbp_fewshot --compare-presets --workers 2 \\
        --out-dir out/baseline_compare
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from d2ct.utils.cli import prog, run_cli


def _parse_set(items: list[str]) -> dict:
    from d2ct.baseline.watershed import BaselineConfig
    from d2ct.errors import ConfigError

    types = {f: t for f, t in BaselineConfig.__annotations__.items()}
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in types:
            raise ConfigError(f"--set {key!r}: unknown option; options: {', '.join(types)}")
        t = str(types[key])
        v = value.strip()
        try:
            if v.lower() in ("none", "null") and "None" in t:
                out[key] = None
            elif t.startswith("bool"):
                if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(v)
                out[key] = v.lower() in ("true", "1", "yes")
            elif t.startswith("int"):
                out[key] = int(v)
            elif t.startswith("float"):
                out[key] = float(v)
            else:
                out[key] = v
        except ValueError:
            raise ConfigError(f"--set {key}={value!r}: not a valid {t}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog(),
        description="Classical baseline (median denoising, Sobel gradient, low-gradient markers, watershed; "
        "optional CLAHE + bilateral / total-variation preprocessing). Writes one label map per slice as a "
        "challenge CSV, or with --compare-presets scores every preset on the labelled images of --data.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of PNG slices to segment")
    src.add_argument("--data", metavar="DIR",
                     help="challenge-layout folder: segment its labelled images (or --split) and score them")
    p.add_argument("--out", metavar="CSV", help="submission CSV to write (.gz compresses)")
    p.add_argument("--preset", default="baseline", help="baseline | clahe_bilateral | clahe_tv (default baseline)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a BaselineConfig field, e.g. --set marker_threshold=20 (repeatable)")
    p.add_argument("--split", choices=("labelled", "all", "test"), default="labelled",
                   help="with --data: which images (default labelled; test = test-images/ with test labels)")
    p.add_argument("--limit", type=int, help="only the first N images (quick runs)")
    p.add_argument("--compare-presets", action="store_true",
                   help="with --data: run every preset (with --set overrides) and print the comparison table")
    p.add_argument("--out-dir", metavar="DIR", help="with --data: write per-preset reports and compare.json/.md here")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--show-config", action="store_true", help="print the resolved configuration(s) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    return run_cli(_run, args)


def _run(args) -> int:
    from d2ct.baseline.watershed import PRESETS, compare_configs, get_preset, run_baseline
    from d2ct.errors import ConfigError

    from d2ct.utils.fileio import check_writable

    overrides = _parse_set(args.set)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1 (images to process), got {args.limit}")
    # before the work: a baseline run takes minutes and must not fail at the very end
    check_writable(args.out, kind="file", option="--out")
    check_writable(args.out_dir, kind="dir", option="--out-dir")
    presets = list(PRESETS) if args.compare_presets else [args.preset]
    configs = {name: get_preset(name, **overrides) for name in presets}
    if args.show_config:
        print(json.dumps({k: v.as_dict() for k, v in configs.items()}, indent=2))
        return 0
    if args.images:
        if args.compare_presets:
            raise ConfigError("--compare-presets needs --data (labelled images to score against)")
        if not args.out:
            raise ConfigError("--images needs --out (the submission CSV to write)")
        from d2ct.data.images import list_slices

        names = list_slices(args.images)
        if args.limit:
            names = names[: args.limit]
        t0 = time.perf_counter()
        names, maps = run_baseline(args.images, args.out, configs[args.preset], names=names,
                                   workers=args.workers, progress=not args.quiet)
        dt = time.perf_counter() - t0
        print(f"wrote {args.out}: {len(names)} images, preset {args.preset}, "
              f"{dt:.1f} s ({dt / max(1, len(names)):.3f} s/image), mean {maps.reshape(len(maps), -1).max(1).mean():.1f} regions")
        return 0
    rows = compare_configs(args.data, configs, split=args.split, limit=args.limit, workers=args.workers,
                           out_dir=args.out_dir, submission=args.out, progress=not args.quiet)
    from d2ct.baseline.watershed import format_comparison

    print(format_comparison(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
