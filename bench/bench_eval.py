"""Benchmark: the evaluation metrics (d2ct.evaluation) against their reference implementations.

- ARI over all pixels: ``adjusted_rand_index`` (one np.bincount contingency table per image)
  vs ``sklearn.metrics.adjusted_rand_score`` on the same flattened maps, 500 maps of 512x512
  (the 2024 test set size); results are checked equal to 1e-12.
- ARI on truth foreground, Dice/recall matching (Hungarian on the IoU matrix), and
  class-agnostic COCO mask AP (pycocotools) on the same maps, ours only.

Label maps are realistic: ~70 % background and 8-20 blob structures per image; predictions are
a perturbed relabelled copy (shifted, some structures merged or dropped). ``--quick`` uses 50
images. Usage::

    .venv/bin/python bench/bench_eval.py [--quick] [--repeat N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, markdown_table, median_time  # noqa: E402
from d2ct.evaluation.ari import adjusted_rand_index  # noqa: E402
from d2ct.evaluation.coco_ap import coco_ap_from_label_maps  # noqa: E402
from d2ct.evaluation.dice import match_structures  # noqa: E402


def make_pairs(n: int, side: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(truth, pred) stacks (n, side, side) uint8."""
    rng = np.random.default_rng(seed)
    cells = 32
    coarse = rng.integers(1, rng.integers(8, 21, size=(n, 1, 1)) + 1, size=(n, cells, cells)).astype(np.uint8)
    coarse[rng.random((n, cells, cells)) < 0.7] = 0
    rep = side // cells
    truth = np.repeat(np.repeat(coarse, rep, axis=1), rep, axis=2)
    perm = rng.permutation(256).astype(np.uint8)
    perm[0] = 0
    pred = perm[np.roll(truth, shift=(3, -2), axis=(1, 2))]
    pred[pred % 7 == 1] = 0  # some structures missed
    return np.ascontiguousarray(truth), np.ascontiguousarray(pred)


def run(quick: bool = False, repeat: int = 1) -> list[dict]:
    from sklearn.metrics import adjusted_rand_score

    n = 50 if quick else 500
    truth, pred = make_pairs(n)
    rows = []

    ours_vals = []
    t_ours, _ = median_time(lambda: ours_vals.append([adjusted_rand_index(t, p) for t, p in zip(truth, pred)]),
                            repeat=repeat, warmup=0)
    sk_vals = []
    start = time.perf_counter()
    for t, p in zip(truth, pred):
        sk_vals.append(adjusted_rand_score(t.ravel(), p.ravel()))
    t_sk = time.perf_counter() - start
    max_diff = float(np.max(np.abs(np.array(ours_vals[-1]) - np.array(sk_vals))))
    assert max_diff <= 1e-12, max_diff
    rows.append({"metric": "ARI (all pixels)", "images": n, "size": "512x512", "d2ct s": t_ours,
                 "reference": "sklearn adjusted_rand_score", "reference s": t_sk, "speed-up": t_sk / t_ours,
                 "max |diff|": max_diff})

    t_fg, _ = median_time(lambda: [adjusted_rand_index(t, p, exclude_background=True) for t, p in zip(truth, pred)],
                          repeat=repeat)
    rows.append({"metric": "ARI (truth foreground)", "images": n, "size": "512x512", "d2ct s": t_fg})
    t_dice, _ = median_time(lambda: [match_structures(t, p) for t, p in zip(truth, pred)], repeat=repeat)
    rows.append({"metric": "Dice / Recall50 (Hungarian)", "images": n, "size": "512x512", "d2ct s": t_dice})
    m = min(n, 100)
    start = time.perf_counter()
    ap = coco_ap_from_label_maps(truth[:m], pred[:m])
    rows.append({"metric": f"COCO mask AP (pycocotools), AP={ap['AP']:.1f}", "images": m, "size": "512x512",
                 "d2ct s": time.perf_counter() - start})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="50 images instead of 500")
    p.add_argument("--repeat", type=int, default=1, help="timed repetitions of the d2ct runs (median)")
    args = p.parse_args(argv)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, {info['date']}")
    print(markdown_table(run(quick=args.quick, repeat=args.repeat),
                         ["metric", "images", "size", "d2ct s", "reference", "reference s", "speed-up", "max |diff|"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
