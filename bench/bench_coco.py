"""Benchmark: label maps -> single-class COCO RLE instances (d2ct.data.coco) and back (flatten).

Target: 2,000 label maps of 512x512 with 5-25 structures each converted in under 30 s using both
cores. The maps are synthetic CT-like layouts (a body ellipse holding organs: ellipses with
irregular, some multi-part, borders); 200 distinct maps are generated once and reused cyclically,
which costs the converter the same as 2,000 distinct ones and keeps memory low.

Rows: the whole data set through ``dataset_dicts`` with 1 and 2 worker processes (per value and per
connected component), plus the inverse (instances -> label map) for reference.

    .venv/bin/python bench/bench_coco.py            # full: 2,000 maps
    .venv/bin/python bench/bench_coco.py --quick    # 200 maps
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, markdown_table, median_time  # noqa: E402
from d2ct.data.coco import dataset_dicts  # noqa: E402
from d2ct.postprocess.flatten import instances_to_label_map  # noqa: E402

SIZE = 512
N_FULL = 2000
N_QUICK = 200
N_DISTINCT = 200


def synthetic_label_map(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A CT-like label map: 5-25 structures inside a body outline, irregular borders, some split."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    lm = np.zeros((size, size), np.uint8)
    body = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.47) ** 2 < 1
    k = int(rng.integers(5, 26))
    for value in rng.permutation(np.arange(1, k + 1)):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        ry, rx = rng.uniform(0.015, 0.12, 2)
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + 0.15 * np.sin(rng.integers(2, 6) * angle + rng.uniform(0, 6.3))
        region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < wobble
        if rng.random() < 0.2:  # a second part (e.g. paired organs, a vessel seen twice)
            cy2, cx2 = rng.uniform(0.2, 0.8, 2)
            region |= ((yy - cy2) / ry) ** 2 + ((xx - cx2) / rx) ** 2 < 1
        lm[region & body] = value
    return lm


class InMemoryDataset:
    """The part of ChallengeDataset that dataset_dicts uses, backed by a (N_DISTINCT, H*W) array."""

    def __init__(self, n_images: int, maps: np.ndarray, size: int = SIZE):
        self.root = Path("/in-memory")
        self.names = [f"{i}.png" for i in range(n_images)]
        self.shape = (size, size)
        self._maps = maps
        self._pos = {n: i for i, n in enumerate(self.names)}

    def image_path(self, name):
        return self.root / name

    def label_map(self, name):
        return self._maps[self._pos[name] % len(self._maps)].reshape(self.shape)


def run(quick: bool = False) -> list[dict]:
    n = N_QUICK if quick else N_FULL
    rng = np.random.default_rng(0)
    maps = np.stack([synthetic_label_map(rng).ravel() for _ in range(min(N_DISTINCT, n))])
    ds = InMemoryDataset(n, maps)
    repeat = 1 if quick else 3
    rows = []
    n_instances = None
    for split in (False, True):
        for workers in (1, 2):
            result = {}

            def convert():
                result["dicts"] = dataset_dicts(ds, split_components=split, workers=workers)

            t, times = median_time(convert, repeat=repeat)
            n_inst = sum(len(d["annotations"]) for d in result["dicts"])
            if not split:
                n_instances = n_inst
            rows.append(
                {
                    "task": f"{n} maps {SIZE}px -> COCO RLE" + (" (components)" if split else ""),
                    "workers": workers,
                    "instances": n_inst,
                    "seconds": t,
                    "ms/map": 1000 * t / n,
                    "runs": repeat,
                }
            )
    dicts = result["dicts"]

    def flatten_all():
        for d in dicts:
            anns = d["annotations"]
            instances_to_label_map(
                [a["segmentation"] for a in anns], shape=ds.shape, labels=[a["label_value"] for a in anns]
            )

    t, _ = median_time(flatten_all, repeat=repeat)
    rows.append(
        {
            "task": f"{n} maps: RLE instances -> label map (components)",
            "workers": 1,
            "instances": sum(len(d["annotations"]) for d in dicts),
            "seconds": t,
            "ms/map": 1000 * t / n,
            "runs": repeat,
        }
    )
    assert n_instances is not None
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{N_QUICK} maps instead of {N_FULL}, one run")
    args = parser.parse_args(argv)
    info = machine_info()
    print(f"# bench_coco ({info['cpu']}, {info['cores']} cores, python {info['python']}, {info['date']})\n")
    print(markdown_table(run(quick=args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
