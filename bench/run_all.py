#!/usr/bin/env python
"""Run every benchmark (bench/bench_*.py exposing ``run(quick) -> list[dict]``) and write bench/RESULTS.md.

Each module's rows are printed as a table as soon as it finishes; bench/RESULTS.md is then written
atomically, headed by the machine (CPU model and cores, GPU, Python, torch) and the date. With
``--only``, the sections of the other benchmarks already in RESULTS.md are kept (each section
carries its own machine, date and mode line). A benchmark that raises is reported in its section
and the command exits 1 after running the others.

Examples:
  .venv/bin/python bench/run_all.py                 # everything, full sizes (make bench)
  .venv/bin/python bench/run_all.py --quick         # small sizes: checks that every benchmark runs
  .venv/bin/python bench/run_all.py --only train --only infer
  .venv/bin/python bench/run_all.py --list
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import re
import sys
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine_info  # noqa: E402

DEFAULT_OUT = BENCH_DIR / "RESULTS.md"
SECTION = re.compile(r"^## (bench_\w+)\b", re.M)


def discover(bench_dir: Path = BENCH_DIR) -> dict[str, Path]:
    """bench_<name>.py files, by module name, sorted."""
    return {p.stem: p for p in sorted(bench_dir.glob("bench_*.py"))}


def resolve_only(names: list[str], available: dict[str, Path]) -> list[str]:
    """--only values ("train", "bench_train", "bench_train.py") -> module names; unknown -> ValueError."""
    out = []
    for raw in names:
        name = Path(raw).stem
        name = name if name.startswith("bench_") else f"bench_{name}"
        if name not in available:
            raise ValueError(f"unknown benchmark {raw!r}; available: {', '.join(available)}")
        if name not in out:
            out.append(name)
    return out


def load(name: str, path: Path):
    if path.parent == BENCH_DIR:
        module = importlib.import_module(f"bench.{name}")
    else:  # another folder (tests)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"{path.name} has no run(quick) function")
    return module


def columns_of(rows: list[dict]) -> list[str]:
    """Union of the rows' keys in first-seen order; list-valued keys (raw timings) left out."""
    cols: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in cols and not isinstance(value, (list, dict)):
                cols.append(key)
    return cols


def fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = columns_of(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def describe_machine(info: dict) -> str:
    parts = [f"CPU {info['cpu']} ({info['cores']} cores)", f"GPU {info['gpu']}", f"Python {info['python']}"]
    if "torch" in info:
        parts.append(f"torch {info['torch']}")
    return ", ".join(parts)


def section(name: str, module, rows: list[dict] | None, error: str | None, seconds: float, quick: bool,
            info: dict) -> str:
    doc = (inspect.getdoc(module) or "").split("\n\n")[0].replace("\n", " ") if module else ""
    head = f"## {name}\n\n"
    if doc:
        head += f"{doc}\n\n"
    head += f"_{'quick' if quick else 'full'} run, {info['date']}, {seconds:.0f} s; {describe_machine(info)}_\n\n"
    if error:
        return head + "**failed:**\n\n```\n" + error.strip() + "\n```\n"
    return head + table(rows or [])


def read_sections(path: Path) -> dict[str, str]:
    """Existing RESULTS.md sections by benchmark name."""
    if not path.is_file():
        return {}
    text = path.read_text()
    marks = list(SECTION.finditer(text))
    return {m.group(1): text[m.start(): marks[i + 1].start() if i + 1 < len(marks) else len(text)].rstrip() + "\n"
            for i, m in enumerate(marks)}


def render(sections: dict[str, str], order: list[str], info: dict, command: str) -> str:
    header = (
        "# d2ct benchmarks\n\n"
        f"Machine: {describe_machine(info)}.  \n"
        f"Date: {info['date']}.  \n"
        f"Command: `{command}` (sections not re-run keep their own date and machine line).\n\n"
    )
    if info.get("gpu", "none") == "none":
        header += "No CUDA GPU on this machine: the GPU figures (and the V100 comparison) are absent.\n\n"
    body = "\n".join(sections[name] for name in order if name in sections)
    return header + body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="each benchmark's quick (small) mode")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this benchmark (io, bench_io or bench_io.py); repeatable")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT.relative_to(ROOT)})")
    ap.add_argument("--no-write", action="store_true", help="print only, leave the results file alone")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    available = discover(args.bench_dir)
    if args.list:
        for name, path in available.items():
            print(name)
        return 0
    try:
        selected = resolve_only(args.only, available) if args.only else list(available)
    except ValueError as e:
        ap.error(str(e))

    from d2ct.utils.fileio import atomic_write_text

    info = machine_info()
    print(f"# d2ct benchmarks: {describe_machine(info)}, {info['date']}, {'quick' if args.quick else 'full'}\n",
          flush=True)
    sections = read_sections(args.out) if args.only else {}
    failed = []
    for name in selected:
        print(f"## {name} ...", flush=True)
        start = time.time()
        module, rows, error = None, None, None
        try:
            module = load(name, available[name])
            rows = module.run(quick=args.quick)
            if not isinstance(rows, list):
                raise TypeError(f"{name}.run returned {type(rows).__name__}, expected a list of dicts")
        except Exception:  # noqa: BLE001 - one broken benchmark must not stop the others
            error = traceback.format_exc(limit=6)
            failed.append(name)
        seconds = time.time() - start
        sections[name] = section(name, module, rows, error, seconds, args.quick, info)
        print(sections[name], flush=True)
    if not args.no_write:
        order = list(available) + [n for n in sections if n not in available]
        command = "bench/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
        atomic_write_text(args.out, render(sections, order, info, command.strip()))
        print(f"written: {args.out}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
