"""The bad-input matrix at the command line (issue 24): every tool that reads a user's files is run
as a user runs it (a subprocess) on a mistake; it must exit 2 with one ``error:`` line naming the
file, key or option, print no traceback, and leave no output, or only complete outputs, behind.
Library-level cases: tests/test_bad_inputs.py. Nothing here trains: checkpoints are faked."""
from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_OPTS, default_sigint, run_tool

SAMPLE = ROOT / "datasets" / "sample"


def assert_user_error(proc, *needles: str) -> str:
    """Exit 2, no traceback, and one ``error:`` line that contains every needle."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-2000:]}\nSTDERR:\n{err[-3000:]}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "weights_only=False" not in err
    return lines[0]


def summary_value(stdout: str, key: str) -> str:
    return next(line.split()[-1] for line in stdout.splitlines() if line.split()[:1] == [key])


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture()
def sample(tmp_path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(SAMPLE, root)
    return root


# ------------------------------------------------------------------------- evaluate.py
def test_evaluate_scores_the_labelled_images_and_says_what_it_left_out(tmp_path):
    labels = SAMPLE / "labels.csv.gz"
    proc = run_tool("evaluate.py", "--truth", labels, "--pred", labels, "--no-ap", "--quiet")
    assert summary_value(proc.stdout, "n_images") == "4", proc.stdout
    assert "note: 4 all-zero (unlabelled) truth column(s) not scored (first: 4.png); --include-empty" in proc.stderr
    everything = run_tool("evaluate.py", "--truth", labels, "--pred", labels, "--no-ap", "--quiet", "--include-empty")
    assert "note:" not in everything.stderr
    # extra prediction columns are said, not ignored silently
    with_list = run_tool("evaluate.py", "--truth", labels, "--pred", labels, "--no-ap", "--quiet",
                         "--annotated", SAMPLE / "annotated.json")
    assert "note: 4 truth column(s) not in --annotated not scored (first: 4.png)" in with_list.stderr
    assert "note: 4 prediction column(s) with no scored truth image ignored (first: 4.png)" in with_list.stderr


def test_evaluate_annotated_name_missing_from_the_truth(tmp_path):
    ann = tmp_path / "annotated.json"
    ann.write_text('{"annotated": ["0.png", "42.png"]}')
    proc = run_tool("evaluate.py", "--truth", SAMPLE / "labels.csv.gz", "--pred", SAMPLE / "labels.csv.gz",
                    "--annotated", ann, "--no-ap", "--quiet", "--out", tmp_path / "ev", check=False)
    assert_user_error(proc, str(ann), "'42.png'", "labels.csv.gz")
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("case", ["out is a file", "out under a file"])
def test_evaluate_bad_out_fails_before_scoring(tmp_path, case):
    (tmp_path / "afile").write_text("keep me")
    out = tmp_path / "afile" if case == "out is a file" else tmp_path / "afile" / "eval"
    proc = run_tool("evaluate.py", "--truth", SAMPLE / "labels.csv.gz", "--pred", SAMPLE / "labels.csv.gz",
                    "--no-ap", "--quiet", "--out", out, check=False)
    assert_user_error(proc, "--out", str(out))
    assert "n_images" not in proc.stdout  # checked before the work
    assert (tmp_path / "afile").read_text() == "keep me"


def test_evaluate_into_a_closed_pipe_is_quiet():
    read_end, write_end = os.pipe()
    os.close(read_end)  # `d2ct-evaluate ... | head` once head has gone
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--truth", SAMPLE / "labels.csv.gz",
                           "--pred", SAMPLE / "labels.csv.gz", "--no-ap", "--quiet"],
                          stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=300)
    os.close(write_end)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------- convert_to_coco.py
def test_convert_annotated_list_without_labels(sample, tmp_path):
    (sample / "labels.csv.gz").unlink()
    out = tmp_path / "coco.json"
    proc = run_tool("convert_to_coco.py", sample, "--split", "labelled", "--out", out, "--no-progress", check=False)
    assert_user_error(proc, "annotated.json", "no labels CSV")
    assert not out.exists()


def test_convert_out_is_a_folder(sample, tmp_path):
    proc = run_tool("convert_to_coco.py", sample, "--split", "labelled", "--out", tmp_path, "--no-progress", check=False)
    assert_user_error(proc, "--out", "is a folder")


# ------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def fake_model_dir(tmp_path_factory) -> Path:
    """A train_net.py output folder whose config is real and whose checkpoints are damaged:
    model_best.pth random bytes, model_final.pth a truncated real checkpoint (no training)."""
    import torch

    from d2ct.config import setup_cfg

    out = tmp_path_factory.mktemp("damaged") / "r50"
    out.mkdir()
    cfg = setup_cfg(str(ROOT / "configs/demo/radiologist_r50.yaml"), [*TINY_OPTS, "D2CT.DATA_ROOT", str(SAMPLE)])
    (out / "config.yaml").write_text(cfg.dump())
    (out / "model_best.pth").write_bytes(os.urandom(4096))
    torch.save({"model": {"w": torch.zeros(50_000)}}, out / "model_final.pth")
    (out / "model_final.pth").write_bytes((out / "model_final.pth").read_bytes()[:20_000])
    (out / "model_best.json").write_text('{"metric": "segm/AP", "value": 10.0, "scores": {"segm/AP": 10.0}}')
    return out


def test_predict_with_a_damaged_model_best_names_it_and_does_not_fall_back(fake_model_dir, tmp_path):
    out = tmp_path / "sub.csv"
    proc = run_tool("predict.py", "--model", fake_model_dir, "--input", SAMPLE / "test-images", "--out", out,
                    check=False)
    assert_user_error(proc, str(fake_model_dir / "model_best.pth"), "damaged", "not loaded")
    assert "model_final" not in proc.stderr  # no silent fallback
    assert not out.exists()
    proc = run_tool("predict.py", "--model", fake_model_dir, "--weights", "model_final.pth", "--input",
                    SAMPLE / "test-images", "--out", out, check=False)
    assert_user_error(proc, str(fake_model_dir / "model_final.pth"), "damaged")
    assert not out.exists()


def test_predict_out_is_a_folder_fails_before_loading(fake_model_dir, tmp_path):
    proc = run_tool("predict.py", "--model", fake_model_dir, "--input", SAMPLE / "test-images", "--out", tmp_path,
                    check=False)
    assert_user_error(proc, "--out", "is a folder")


def test_pseudolabel_with_a_damaged_checkpoint(fake_model_dir, tmp_path):
    out = tmp_path / "pl"
    proc = run_tool("pseudolabel.py", "--models", fake_model_dir, "--data", SAMPLE, "--out", out, check=False)
    assert_user_error(proc, str(fake_model_dir / "model_best.pth"), "damaged")
    assert not (out / "pseudo_labels.json").exists() and not (out / "stats.json").exists()


def test_pseudolabel_negative_limit(fake_model_dir, tmp_path):
    proc = run_tool("pseudolabel.py", "--models", fake_model_dir, "--limit", "-1", "--out", tmp_path / "pl", check=False)
    assert_user_error(proc, "--limit", "-1")


# ------------------------------------------------------------------------- baseline.py
def test_baseline_negative_limit(tmp_path):
    out = tmp_path / "b.csv"
    proc = run_tool("baseline.py", "--images", SAMPLE / "test-images", "--out", out, "--limit", "-1", check=False)
    assert_user_error(proc, "--limit", "-1")
    assert not out.exists()


@pytest.mark.parametrize("option", ["--out", "--out-dir"])
def test_baseline_unwritable_output_fails_before_the_work(tmp_path, option):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "result"
    args = ["--data", SAMPLE, option, target] if option == "--out-dir" else ["--images", SAMPLE / "test-images", option, target]
    proc = run_tool("baseline.py", *args, "--quiet", check=False)
    assert_user_error(proc, option, str(target))
    assert "wrote" not in proc.stdout and "ARI" not in proc.stdout


def test_baseline_progress_has_no_carriage_returns_when_redirected(tmp_path):
    proc = run_tool("baseline.py", "--images", SAMPLE / "test-images", "--out", tmp_path / "b.csv")
    assert "\r" not in proc.stderr and "100%" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------- data tools
def test_make_holdout_fraction_names_the_option(tmp_path):
    proc = run_tool("make_holdout.py", "--data", SAMPLE, "--out", tmp_path / "h", "--test-fraction", "1.5", check=False)
    assert_user_error(proc, "--test-fraction", "1.5")
    assert not (tmp_path / "h").exists()


def _nifti(path, data, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_import_volume_says_nan_and_oblique_with_the_file_name(tmp_path):
    import numpy as np

    t = np.radians(15)
    affine = np.eye(4)
    affine[:3, :3] = [[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]
    data = np.full((32, 32, 3), 40.0, np.float32)
    data[:3, :3, 0] = np.nan
    path = _nifti(tmp_path / "scan.nii.gz", data, affine)
    out = tmp_path / "case"
    proc = run_tool("import_volume.py", path, "--out", out)
    assert f"{path}: 9 voxel(s)" in proc.stderr and "NaN" in proc.stderr
    assert f"{path}: oblique volume" in proc.stderr and proc.stderr.count("oblique volume") == 1
    assert (out / "images").is_dir()


def test_import_volume_out_is_a_file(tmp_path):
    import numpy as np

    path = _nifti(tmp_path / "scan.nii.gz", np.zeros((16, 16, 2), np.float32), np.eye(4))
    (tmp_path / "afile").write_text("x")
    proc = run_tool("import_volume.py", path, "--out", tmp_path / "afile", check=False)
    assert_user_error(proc, "--out", "is an existing file")


def test_train_output_dir_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = run_tool("train_net.py", "--config", "configs/demo/radiologist_r50.yaml", *TINY_OPTS,
                    "D2CT.DATA_ROOT", SAMPLE, "OUTPUT_DIR", tmp_path / "afile" / "run", check=False)
    assert_user_error(proc, "OUTPUT_DIR", "is a file, not a folder")


# ------------------------------------------------------------------------- interruption
_WRITER = """
import sys, time
from d2ct.utils.cli import run_cli
from d2ct.utils.fileio import atomic_write
def body(path):
    with atomic_write(path, "w") as f:
        f.write("half of the new ")
        print("ready", flush=True)
        time.sleep(60)
        f.write("content")
sys.exit(run_cli(body, sys.argv[1]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("previous", [None, "previous complete output"])
def test_a_signalled_run_leaves_the_previous_output_or_none(tmp_path, signum, previous):
    out = tmp_path / "result.txt"
    if previous:
        out.write_text(previous)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.startswith("interrupted: no partial file was written") and err.count("\n") == 1, err
    assert files_under(tmp_path) == (["result.txt"] if previous else [])
    if previous:
        assert out.read_text() == previous
