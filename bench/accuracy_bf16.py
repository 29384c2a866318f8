"""Benchmark: does bfloat16 training cost accuracy? R50 at equal iterations, float32 vs bf16, two seeds.

Issue 22's accuracy check. For each seed, one real training run of a CPU radiologist config
(default configs/cpu/radiologist_r50.yaml on the OpenKBP patient hold-out) in today's float32
recipe (``D2CT.CPU_BF16 False D2CT.CHANNELS_LAST False``) and one in the new defaults (bfloat16
autocast + channels-last), same schedule, same seed, same data order. Each run is a
``python -m d2ct.engine.train_net`` process of its own (the product's training command), so its
peak memory is its own: the high-water resident set of its largest process (``os.wait4``; the data
loader worker is a separate process and is not added to it).

Read from each run's ``metrics.json``: the validation figures of its last evaluation (segm AP/AP50,
ct ARI/ARI_fg/Dice: Detectron2's COCO evaluation and d2ct's flattened label maps, on the validation
patients), the median logged seconds per iteration, and the wall time. The verdict compares the
mean bf16 - float32 difference with the seed-to-seed spread within each recipe.

Resumable: a run whose metrics already hold its last evaluation is read, not trained again; a
killed run continues from its last checkpoint (``--resume``). Usage::

    .venv/bin/python bench/accuracy_bf16.py --iters 600 --seeds 42 7 \
        --runs ~/d2ct-runs/bf16_accuracy --out ~/d2ct-runs/bf16_accuracy/table.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine_info, markdown_table  # noqa: E402

MODES = {"fp32": False, "bf16": True}  # name -> D2CT.CPU_BF16 and D2CT.CHANNELS_LAST
METRICS = [("segm/AP", "val mask AP"), ("segm/AP50", "val AP50"), ("ct/ARI", "val ARI"),
           ("ct/ARI_fg", "val ARI fg"), ("ct/Dice", "val Dice")]


def schedule_opts(iters: int, eval_period: int) -> list[str]:
    """The config's schedule scaled to ``iters``: LR steps at 75% and 92% (as configs/cpu), warm-up <= 1/3."""
    steps = (round(iters * 0.75), round(iters * 0.92))
    if steps[1] <= steps[0] or steps[1] >= iters:  # fvcore wants increasing milestones below MAX_ITER
        steps = (max(1, iters - 2), iters - 1)
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({steps[0]}, {steps[1]})",
            "SOLVER.WARMUP_ITERS", str(min(200, iters // 3)), "TEST.EVAL_PERIOD", str(eval_period),
            "SOLVER.CHECKPOINT_PERIOD", str(eval_period)]


def read_run(run_dir: Path, iters: int) -> dict | None:
    """The last evaluation and speed of a finished run; None when it has not evaluated at ``iters`` yet."""
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        return None
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    evals = [r for r in rows if "segm/AP" in r]
    if not evals or int(evals[-1].get("iteration", -1)) + 1 < iters:
        return None
    last = evals[-1]
    times = [r["time"] for r in rows if isinstance(r.get("time"), (int, float))]
    out = {key: float(last[key]) for key, _ in METRICS if key in last}
    out["s/iter"] = statistics.median(times) if times else float("nan")
    extra = run_dir / "bench_run.json"
    if extra.is_file():
        out.update(json.loads(extra.read_text()))
    return out


def train_one(config: str, data: Path, run_dir: Path, seed: int, mode: str, iters: int, eval_period: int,
              threads: int | None) -> None:
    """One training process; records its wall time and peak RSS next to its outputs."""
    flag = str(MODES[mode])
    cmd = [sys.executable, "-m", "d2ct.engine.train_net", "--config", config, "--resume",
           *schedule_opts(iters, eval_period), "SEED", str(seed), "D2CT.CPU_BF16", flag,
           "D2CT.CHANNELS_LAST", flag, "D2CT.DATA_ROOT", str(data), "OUTPUT_DIR", str(run_dir)]
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"[bf16-accuracy] {mode} seed {seed}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(run_dir / "bench_log.txt", "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"training {mode} seed {seed} failed (exit {code}); see {run_dir / 'bench_log.txt'}")
    record = {"wall_min": (time.perf_counter() - start) / 60, "peak_RSS_GB": usage.ru_maxrss / 2**20}
    tmp = run_dir / "bench_run.json.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(run_dir / "bench_run.json")


def summarise(results: dict[tuple[str, int], dict], seeds: list[int]) -> tuple[list[dict], list[dict], list[str]]:
    """Per-run rows, difference rows (bf16 - fp32 per seed, and the seed spread per recipe), verdict lines."""
    rows = []
    for (mode, seed), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row = {"recipe": mode, "seed": seed}
        row.update({label: r.get(key, float("nan")) for key, label in METRICS})
        row.update({"s/iter": r.get("s/iter"), "wall min": r.get("wall_min", ""),
                    "peak RSS GB": r.get("peak_RSS_GB", "")})
        rows.append(row)
    diffs, verdict = [], []
    for key, label in METRICS:
        per_seed = [results[("bf16", s)][key] - results[("fp32", s)][key] for s in seeds
                    if ("bf16", s) in results and ("fp32", s) in results]
        spreads = {m: max(results[(m, s)][key] for s in seeds) - min(results[(m, s)][key] for s in seeds)
                   for m in MODES if all((m, s) in results for s in seeds) and len(seeds) > 1}
        if not per_seed:
            continue
        mean_diff = statistics.mean(per_seed)
        diff_row = {"figure": label, "bf16 - fp32 (mean over seeds)": mean_diff}
        for s, d in zip(seeds, per_seed):
            diff_row[f"bf16 - fp32, seed {s}"] = d
        for m, spread in spreads.items():
            diff_row[f"{m} seed spread"] = spread
        diffs.append(diff_row)
        if spreads:
            largest = max(spreads.values())
            inside = abs(mean_diff) <= largest
            verdict.append(f"{label}: mean bf16 - fp32 {mean_diff:+.3f}, largest seed spread {largest:.3f} -> "
                           f"{'within' if inside else 'OUTSIDE'} the seed-to-seed spread")
    return rows, diffs, verdict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/cpu/radiologist_r50.yaml", help="training config (default: %(default)s)")
    ap.add_argument("--data", type=Path, default=Path("datasets/openkbp_holdout"),
                    help="data root in the challenge layout, with a patient manifest (default: %(default)s; "
                         "make it with tools/make_holdout.py)")
    ap.add_argument("--iters", type=int, default=600, help="iterations of every run (default: %(default)s)")
    ap.add_argument("--eval-period", type=int, default=300, help="validation every N iterations (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 7], help="training seeds (default: %(default)s)")
    ap.add_argument("--runs", type=Path, default=Path.home() / "d2ct-runs" / "bf16_accuracy",
                    help="run folders (default: %(default)s)")
    ap.add_argument("--recipes", nargs="+", choices=list(MODES), default=["bf16", "fp32"],
                    help="train only these recipes (two processes can then share a machine; the table "
                         "reads every finished run) (default: both)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: torch's own)")
    ap.add_argument("--table-only", action="store_true", help="read the finished runs, train nothing")
    ap.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = ap.parse_args(argv)
    if not (ROOT / args.config).is_file() and not Path(args.config).is_file():
        ap.error(f"--config {args.config}: no such file")
    if not args.table_only and not (args.data / "train-images").is_dir():
        ap.error(f"--data {args.data}: no train-images/ folder (make it with tools/make_holdout.py)")
    data = args.data.resolve()
    results = {}
    for seed in args.seeds:
        for mode in ("bf16", "fp32"):  # bf16 first: the cheaper half of a pair finishes first
            run_dir = (args.runs / f"{mode}_seed{seed}").resolve()
            done = read_run(run_dir, args.iters)
            if done is None and not args.table_only and mode in args.recipes:
                train_one(args.config, data, run_dir, seed, mode, args.iters, args.eval_period, args.threads)
                done = read_run(run_dir, args.iters)
            if done is not None:
                results[(mode, seed)] = done
    rows, diffs, verdict = summarise(results, args.seeds)
    info = machine_info()
    text = (f"bf16 accuracy check: {args.config}, {args.iters} iterations, seeds {args.seeds}, data {args.data}; "
            f"{info['cpu']}, {info['cores']} cores, torch {info.get('torch')}, {info['date']}\n\n"
            + markdown_table(rows) + "\n" + (markdown_table(diffs) if diffs else "") + "\n"
            + "\n".join(f"- {v}" for v in verdict) + "\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
