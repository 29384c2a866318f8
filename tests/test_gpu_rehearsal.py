"""The GPU machine's scripts (bench/gpu/): syntax, the carry folder's manifest / size / install-plan
logic on tiny fakes, fast failures, and (slow) the whole rehearsal: the smoke run in a clean clone,
installed from the carry folder alone with the network off (bench/gpu/rehearse.sh)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "bench" / "gpu"
sys.path.insert(0, str(GPU))

import carry as C  # noqa: E402
import device_checks as DC  # noqa: E402


def _fake_carry(tmp: Path, python_version: str | None = None) -> Path:
    carry = tmp / "carry"
    (carry / "wheels").mkdir(parents=True)
    (carry / "fallback").mkdir()
    (carry / "data" / "openkbp_holdout").mkdir(parents=True)
    (carry / "wheels" / "yacs-0.1.8-py3-none-any.whl").write_bytes(b"y" * 1000)
    (carry / "wheels" / "pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl").write_bytes(b"p" * 2000)
    # module present everywhere (json is stdlib) and one that is nowhere
    (carry / "fallback" / "tabulate-0.10.0-py3-none-any.whl").write_bytes(b"t" * 10)
    (carry / "fallback" / "nosuchmodule_d2ct-1.0-py3-none-any.whl").write_bytes(b"n" * 10)
    (carry / "data" / "openkbp_holdout" / "labels.csv.gz").write_bytes(b"l" * 3000)
    pyv = python_version or "%d.%d" % sys.version_info[:2]
    manifest = C.build_manifest(carry, python_version=pyv, platform=C.DEFAULT_PLATFORM, max_mib=1)
    # the fallback modules of this fake: one stdlib (present), one missing
    manifest["fallback"] = {"tabulate-0.10.0-py3-none-any.whl": "json",
                            "nosuchmodule_d2ct-1.0-py3-none-any.whl": "nosuchmodule_d2ct"}
    manifest["present_required"] = []
    (carry / C.MANIFEST).write_text(json.dumps(manifest))
    return carry


def test_scripts_parse():
    for script in ("prepare_carry.sh", "device_run.sh", "offline_env.sh", "rehearse.sh"):
        proc = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    for script in ("carry.py", "device_checks.py"):
        compile((GPU / script).read_text(), script, "exec")


def test_manifest_lists_files_and_checks_size(tmp_path):
    carry = _fake_carry(tmp_path)
    manifest = json.loads((carry / C.MANIFEST).read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert paths == {"wheels/yacs-0.1.8-py3-none-any.whl",
                     "wheels/pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl",
                     "fallback/tabulate-0.10.0-py3-none-any.whl", "fallback/nosuchmodule_d2ct-1.0-py3-none-any.whl",
                     "data/openkbp_holdout/labels.csv.gz"}
    assert manifest["total_bytes"] == 1000 + 2000 + 10 + 10 + 3000
    assert set(manifest["wheels"]) == {"yacs-0.1.8-py3-none-any.whl",
                                       "pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl"}
    assert manifest["wheels"]["yacs-0.1.8-py3-none-any.whl"] == "yacs"
    assert C.check(carry) == []
    # over the limit: 6 KB against 0.004 MiB (4 KiB)
    assert any("over the 0.004 MiB limit" in p for p in C.check(carry, max_mib=0.004))
    # an extra file, a changed file, a missing file
    (carry / "wheels" / "extra-1.0-py3-none-any.whl").write_bytes(b"x")
    (carry / "wheels" / "yacs-0.1.8-py3-none-any.whl").write_bytes(b"y" * 999)
    (carry / "data" / "openkbp_holdout" / "labels.csv.gz").unlink()
    problems = C.check(carry)
    assert "not in the manifest: wheels/extra-1.0-py3-none-any.whl" in problems
    assert "size differs: wheels/yacs-0.1.8-py3-none-any.whl" in problems
    assert "missing: data/openkbp_holdout/labels.csv.gz" in problems


def test_prepare_carry_check_only(tmp_path):
    carry = _fake_carry(tmp_path)
    ok = subprocess.run(["bash", str(GPU / "prepare_carry.sh"), "--check-only", str(carry)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout and "MiB" in ok.stdout
    over = subprocess.run(["bash", str(GPU / "prepare_carry.sh"), "--check-only", str(carry), "--max-mib", "0.001"],
                          capture_output=True, text=True)
    assert over.returncode == 1
    assert "over the 0.001 MiB limit" in over.stderr


def test_plan_installs_needed_and_only_missing_fallbacks(tmp_path):
    carry = _fake_carry(tmp_path)
    problems, todo, facts = C.plan(carry)
    assert problems == []
    names = sorted(Path(t).name for t in todo)
    assert names == sorted(["yacs-0.1.8-py3-none-any.whl", "pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl",
                            "nosuchmodule_d2ct-1.0-py3-none-any.whl"])
    assert facts["fallback_installed"] == ["nosuchmodule_d2ct-1.0-py3-none-any.whl"]


def test_plan_refuses_another_python(tmp_path):
    carry = _fake_carry(tmp_path, python_version="3.99")
    proc = subprocess.run([sys.executable, str(GPU / "carry.py"), "plan", str(carry)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "wheels for Python 3.99" in proc.stderr and "--python-version" in proc.stderr


def test_plan_refuses_missing_torch(tmp_path, monkeypatch):
    carry = _fake_carry(tmp_path)
    monkeypatch.setattr(C, "PRESENT", [("nosuchtorch_d2ct", "torch", "2.1")])
    problems, _, _ = C.plan(carry)
    assert problems and "nosuchtorch_d2ct (torch) is not installed here" in problems[0]


def test_requirements_coverage(tmp_path):
    """Requires-Dist of carried wheels must be carried or on the machine."""
    import zipfile

    def wheel(name, requires):
        path = tmp_path / f"{name}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{name}-1.0.dist-info/METADATA", "Name: %s\n" % name + "".join(f"Requires-Dist: {r}\n" for r in requires))
        return path

    a = wheel("alpha", ["numpy", "beta>=1", "gamma; extra == 'test'", 'importlib-resources; python_version < "3.9"'])
    b = wheel("beta", ["delta"])
    assert C.uncovered_requirements([a, b], "3.12") == ["beta needs delta"]


def test_device_run_fails_fast_without_carry(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(GPU / "device_run.sh"), "--carry", str(tmp_path / "nope"), "--out", str(out),
                           "--python", sys.executable], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "carry folder" in proc.stdout + proc.stderr and "not found" in proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["timings"] == [{"part": "install", "seconds": results["timings"][0]["seconds"], "rc": 1}]


def test_markdown_table_from_results():
    results = {"steps": {
        "env": {"smoke": False, "python": "3.12.3", "torch": "2.11.0", "device": "NVIDIA H200", "checks": [
            {"check": "CUDA GPU visible", "status": "ok", "detail": "NVIDIA H200"}]},
        "train": {"runs": [{"model": "r50", "size": 512, "batch": 16, "amp": True, "status": "ok", "s_per_iter": 0.2,
                            "data_time": 0.01, "peak_mem_mib": 9000.0, "iters_timed": 10}], "checks": []},
        "short_run": {"training": {"iters_done": 10, "max_iter": 12, "batch": 16, "amp": False, "train_s": 100.0,
                                   "s_per_iter": 0.3, "train_images": 254},
                      "test": {"n_images": 82, "ARI": 0.5, "ARI_fg": 0.4, "Dice": 0.6, "AP": 30.0, "AP50": 50.0,
                               "Recall50": 0.7, "Precision50": 0.8},
                      "inference": [{"size": 512, "batch": 16, "amp": False, "ms_per_slice": 12.5, "slices": 82}]}},
        "timings": [{"part": "install", "seconds": 5, "rc": 0}]}
    md = DC.render_markdown(results)
    assert "| r50 | 512 | 16 | True | 0.200 | 0.010 | 0.200 | 0.261 | 9000 | 10 | ok |" in md
    assert "| test patients | 82 | 0.500 | 0.400 | 0.600 | 30.0 | 50.0 | 0.700 | 0.800 |" in md
    assert "| 512 | 16 | False | 12.5 | 82 |" in md
    assert "| install | 5 | 0 |" in md


@pytest.mark.slow
def test_rehearsal_smoke_offline():
    """bench/gpu/rehearse.sh: builds (once) the stand-in venv and the carry, then runs the smoke mode
    of device_run.sh in a clean clone of HEAD, offline. Every check must pass or be skipped for a
    reason (no CUDA here), and each step must have produced its part."""
    if shutil.which("git") is None:
        pytest.skip("git is needed for the clean clone")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(["bash", str(GPU / "rehearse.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600, env=env)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    results = json.loads((ROOT / ".device" / "rehearsal-out" / "results.json").read_text())
    steps = results["steps"]
    assert set(steps) >= {"env", "train", "nccl", "short_run"}, tail
    checks = [c for s in steps.values() for c in s.get("checks", [])]
    assert all(c["status"] in ("ok", "skipped") for c in checks), checks
    assert [c["status"] for c in checks if c["check"].startswith("compiled-op")] == ["ok"] * 3
    fp32 = [r for r in steps["train"]["runs"] if not r["amp"]]
    assert [r["model"] for r in fp32] == ["r50", "r101", "x101"] and all(r["s_per_iter"] > 0 for r in fp32)
    assert steps["short_run"]["test"]["n_images"] == 6
    assert 0.0 <= steps["short_run"]["test"]["ARI"] <= 1.0
    assert [t["part"] for t in results["timings"]] == ["install", "env", "train", "nccl", "short_run"]
    assert all(t["rc"] == 0 for t in results["timings"])
