"""Tests of the benchmark driver bench/run_all.py (discovery, --only, failures, RESULTS.md) with
stand-in benchmarks. The OpenKBP experiments (experiments/openkbp/) are tested in test_experiments.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import run_all  # noqa: E402


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    d = tmp_path / "benches"
    d.mkdir()
    (d / "bench_alpha.py").write_text(
        '"""Alpha: a stand-in benchmark."""\n'
        "def run(quick=False):\n"
        "    return [{'task': 'a', 'seconds': 0.5 if quick else 1.5, 'ok': True, 'times': [1, 2]},\n"
        "            {'task': 'b|c', 'seconds': 2.0, 'extra': 7}]\n"
    )
    (d / "bench_broken.py").write_text('"""Broken."""\ndef run(quick=False):\n    raise RuntimeError("boom")\n')
    (d / "helper.py").write_text("x = 1\n")  # not a benchmark
    return d


def test_discover_and_only(bench_dir):
    found = run_all.discover(bench_dir)
    assert list(found) == ["bench_alpha", "bench_broken"]
    assert run_all.resolve_only(["alpha", "bench_alpha.py", "bench_broken"], found) == ["bench_alpha", "bench_broken"]
    with pytest.raises(ValueError, match="unknown benchmark 'gamma'"):
        run_all.resolve_only(["gamma"], found)


def test_real_benchmarks_are_discovered():
    found = run_all.discover()
    for name in ("bench_io", "bench_coco", "bench_eval", "bench_baseline", "bench_train", "bench_infer"):
        assert name in found


def test_all_runs_writes_results_and_reports_failure(bench_dir, tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    code = run_all.main(["--quick", "--bench-dir", str(bench_dir), "--out", str(out)])
    assert code == 1  # bench_broken failed, bench_alpha still ran
    text = out.read_text()
    assert text.startswith("# d2ct benchmarks\n")
    assert "Machine: CPU " in text and "Date: " in text
    assert "## bench_alpha" in text and "Alpha: a stand-in benchmark." in text
    assert "| task | seconds | ok | extra |" in text  # union of columns; list values left out
    assert "| a | 0.5 | yes |  |" in text and "| b\\|c | 2 |  | 7 |" in text
    assert "## bench_broken" in text and "**failed:**" in text and "RuntimeError: boom" in text
    assert text.index("## bench_alpha") < text.index("## bench_broken")
    assert "quick run" in text
    printed = capsys.readouterr().out
    assert "| a | 0.5 |" in printed  # tables are printed as well
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("RESULTS")] == ["RESULTS.md"]  # no temp left


def test_only_keeps_other_sections(bench_dir, tmp_path):
    out = tmp_path / "RESULTS.md"
    run_all.main(["--quick", "--bench-dir", str(bench_dir), "--out", str(out)])
    (bench_dir / "bench_broken.py").write_text('"""Fixed."""\ndef run(quick=False):\n    return [{"v": 1}]\n')
    code = run_all.main(["--bench-dir", str(bench_dir), "--out", str(out), "--only", "broken"])
    assert code == 0
    text = out.read_text()
    assert "**failed:**" not in text and "| v |" in text
    assert "| a | 0.5 | yes |  |" in text  # alpha's quick section kept from the first run
    assert "full run" in text and "quick run" in text


def test_unknown_only_is_a_usage_error(bench_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_all.main(["--bench-dir", str(bench_dir), "--out", str(tmp_path / "R.md"), "--only", "nope"])
    assert e.value.code == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "R.md").exists()


def test_no_write_and_list(bench_dir, tmp_path, capsys):
    out = tmp_path / "R.md"
    run_all.main(["--bench-dir", str(bench_dir), "--out", str(out), "--only", "alpha", "--no-write"])
    assert not out.exists()
    assert run_all.main(["--bench-dir", str(bench_dir), "--list"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-2:] == ["bench_alpha", "bench_broken"]


def test_bf16_accuracy_reads_runs_and_compares_with_the_seed_spread(tmp_path):
    """bench/accuracy_bf16.py: last evaluation and speed from metrics.json; bf16 - fp32 vs seed spread."""
    import json

    from bench import accuracy_bf16 as acc

    def write_run(name, ari, ap, final_iter=599):
        run = tmp_path / name
        run.mkdir()
        lines = [{"iteration": 19, "time": 1.0, "total_loss": 2.0}, {"iteration": 39, "time": 3.0},
                 {"iteration": 299, "segm/AP": 1.0, "ct/ARI": 0.1},
                 {"iteration": final_iter, "segm/AP": ap, "segm/AP50": 2 * ap, "ct/ARI": ari, "ct/ARI_fg": ari,
                  "ct/Dice": ari}]
        (run / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n{cut short")
        return run

    assert acc.read_run(write_run("unfinished", 0.5, 9.0, final_iter=299), 600) is None
    assert acc.read_run(tmp_path / "missing", 600) is None
    results = {("fp32", 42): acc.read_run(write_run("f42", 0.50, 9.0), 600),
               ("fp32", 7): acc.read_run(write_run("f7", 0.56, 10.0), 600),
               ("bf16", 42): acc.read_run(write_run("b42", 0.52, 9.5), 600),
               ("bf16", 7): acc.read_run(write_run("b7", 0.53, 12.0), 600)}
    assert results[("fp32", 42)]["s/iter"] == 2.0 and results[("fp32", 42)]["ct/ARI"] == 0.5
    rows, diffs, verdict = acc.summarise(results, [42, 7])
    assert [(r["recipe"], r["seed"]) for r in rows] == [("bf16", 7), ("fp32", 7), ("bf16", 42), ("fp32", 42)]
    ari = next(d for d in diffs if d["figure"] == "val ARI")
    assert ari["bf16 - fp32 (mean over seeds)"] == pytest.approx(-0.005)
    assert ari["fp32 seed spread"] == pytest.approx(0.06)
    assert any(v.startswith("val ARI:") and "within" in v for v in verdict)
    ap = next(v for v in verdict if v.startswith("val mask AP:"))
    assert "within" in ap  # +1.25 mean difference, 2.5 bf16 spread
    results[("bf16", 42)]["ct/ARI"] = 0.69  # +0.165 mean difference against spreads of 0.06 and 0.01
    results[("bf16", 7)]["ct/ARI"] = 0.70
    assert any("val ARI:" in v and "OUTSIDE" in v for v in acc.summarise(results, [42, 7])[2])


def test_bf16_accuracy_schedule_scales_the_config_schedule():
    from bench import accuracy_bf16 as acc

    opts = acc.schedule_opts(600, 300)
    assert opts[opts.index("SOLVER.STEPS") + 1] == "(450, 552)"
    assert opts[opts.index("SOLVER.WARMUP_ITERS") + 1] == "200"
    tiny = acc.schedule_opts(4, 4)
    assert tiny[tiny.index("SOLVER.STEPS") + 1] == "(2, 3)"  # fvcore: increasing milestones below MAX_ITER
