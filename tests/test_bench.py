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
