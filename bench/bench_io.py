"""Benchmark: challenge label CSV I/O (d2ct.data.labels_csv) against plain pandas, side by side.

- read:  a 65,536 x 2,000 label CSV (256x256 maps, about 255 MB) with ``read_labels_csv`` vs
         ``pandas.read_csv(path, index_col=0)`` (default C engine); the results are checked equal.
- write: a 262,144 x 500 prediction CSV (512x512 maps) with ``write_labels_csv`` vs
         ``DataFrame.to_csv`` (uint8 frame, index named "pixel"); the files are checked byte-identical.

Content is realistic: mostly background (0) with blob-shaped structures numbered 1..K (K <= 15,
so a few two-digit labels). ``--quick`` uses 1/10 of the columns. Usage::

    .venv/bin/python bench/bench_io.py [--quick] [--repeat N] [--tmp DIR]
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, markdown_table, median_time  # noqa: E402
from d2ct.data.labels_csv import read_labels_csv, write_labels_csv  # noqa: E402


def make_label_maps(n_images: int, side: int, seed: int = 0) -> np.ndarray:
    """(n_images, side*side) uint8: blobs on a coarse grid, ~80 % background, labels 1..K (K <= 15)."""
    rng = np.random.default_rng(seed)
    cells = 16
    coarse = rng.integers(1, 16, size=(n_images, cells, cells), dtype=np.uint8)
    coarse[rng.random((n_images, cells, cells)) < 0.8] = 0
    # a few images entirely unlabelled, as in the challenge's unlabelled pool
    coarse[rng.random(n_images) < 0.3] = 0
    rep = side // cells
    maps = np.repeat(np.repeat(coarse, rep, axis=1), rep, axis=2)
    return np.ascontiguousarray(maps.reshape(n_images, side * side))


def _names(n: int) -> list[str]:
    return [f"{i}.png" for i in range(n)]


def bench_read(tmp: Path, n_images: int, side: int, repeat: int, target: str = ">= 2x") -> dict:
    import pandas as pd

    values = make_label_maps(n_images, side, seed=1)
    names = _names(n_images)
    path = tmp / "read_bench.csv"
    write_labels_csv(path, names, values)
    size_mb = path.stat().st_size / 1e6

    def ours():
        return read_labels_csv(path)

    def plain():
        return pd.read_csv(path, index_col=0)

    t_ours, _ = median_time(ours, repeat=repeat)
    table = ours()
    ok = table.names == names and np.array_equal(table.values, values)
    del table
    gc.collect()
    t_pd, _ = median_time(plain, repeat=repeat)
    df = plain()
    ok = ok and list(df.columns) == names and np.array_equal(df.to_numpy().T, values)
    del df
    gc.collect()
    path.unlink()
    return {
        "task": f"read {side * side:,} x {n_images:,} CSV",
        "size_MB": round(size_mb, 1),
        "pandas_s": t_pd,
        "d2ct_s": t_ours,
        "speedup": t_pd / t_ours,
        "target": target,
        "equal": ok,
    }


def bench_write(tmp: Path, n_images: int, side: int, repeat: int, target: str = ">= 3x") -> dict:
    import pandas as pd

    values = make_label_maps(n_images, side, seed=2)
    names = _names(n_images)
    p_ours = tmp / "write_ours.csv"
    p_pd = tmp / "write_pandas.csv"
    df = pd.DataFrame(values.T, columns=names)
    df.index.name = "pixel"

    t_ours, _ = median_time(lambda: write_labels_csv(p_ours, names, values), repeat=repeat)
    t_pd, _ = median_time(lambda: df.to_csv(p_pd), repeat=repeat)
    ok = p_ours.read_bytes() == p_pd.read_bytes()
    size_mb = p_ours.stat().st_size / 1e6
    p_ours.unlink()
    p_pd.unlink()
    return {
        "task": f"write {side * side:,} x {n_images:,} CSV",
        "size_MB": round(size_mb, 1),
        "pandas_s": t_pd,
        "d2ct_s": t_ours,
        "speedup": t_pd / t_ours,
        "target": target,
        "equal": ok,
    }


def run(quick: bool = False, repeat: int | None = None, tmp: str | None = None) -> list[dict]:
    repeat = repeat or (1 if not quick else 3)
    scale = 10 if quick else 1
    with tempfile.TemporaryDirectory(dir=tmp, prefix="bench_io_") as d:
        d = Path(d)
        # the targets are set for the full sizes; quick runs only show the trend
        rows = [
            bench_read(d, 2000 // scale, 256, repeat, target="(full size: >= 2x)" if quick else ">= 2x"),
            bench_write(d, 500 // scale, 512, repeat, target="(full size: >= 3x)" if quick else ">= 3x"),
        ]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1/10 of the columns (seconds instead of a minute)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per measurement, median reported (default 1, quick 3)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary CSV files (default: system temp)")
    args = ap.parse_args(argv)
    rows = run(quick=args.quick, repeat=args.repeat, tmp=args.tmp)
    info = machine_info()
    print(f"# bench_io ({'quick' if args.quick else 'full'}) on {info['cpu']}, {info['cores']} cores, python {info['python']}, {info['date']}")
    print()
    print(markdown_table(rows, ["task", "size_MB", "pandas_s", "d2ct_s", "speedup", "target", "equal"]))
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
