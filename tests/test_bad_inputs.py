"""The bad-input matrix: each user mistake gives one clear error naming the file, column or key,
and leaves no partial output behind. (Tool-level cases: tests/test_tools_bad_inputs.py.)"""
from __future__ import annotations

import gzip
import os
import shutil

import pytest

from d2ct.config import setup_cfg
from d2ct.data.challenge import ChallengeDataset
from d2ct.errors import ConfigError, DataError


@pytest.fixture()
def sample(tmp_path):
    root = tmp_path / "ds"
    shutil.copytree("datasets/sample", root)
    return root


def test_two_label_files_are_never_chosen_between_silently(sample):
    with gzip.open(sample / "labels.csv.gz", "rb") as f:
        (sample / "labels.csv").write_bytes(f.read())
    with pytest.raises(DataError, match="both labels.csv and labels.csv.gz exist"):
        ChallengeDataset.open(sample)
    assert ChallengeDataset.open(sample, labels="labels.csv").labelled_names  # naming one is fine


def test_a_column_that_differs_only_in_case_says_so(sample):
    with gzip.open(sample / "labels.csv.gz", "rt") as f:
        text = f.read()
    header, rest = text.split("\n", 1)
    with gzip.open(sample / "labels.csv.gz", "wt") as f:
        f.write(header.replace("0.png", "0.PNG", 1) + "\n" + rest)
    with pytest.raises(DataError, match="column '0.PNG' has no image .*case-sensitive: the image is '0.png'"):
        ChallengeDataset.open(sample)


@pytest.mark.parametrize("text, message", [
    ("", "the config file is empty"),
    ("MODEL: [1, 2\n", "not valid YAML"),
    ("- just\n- a list\n", "a list, not a mapping of config keys"),
    ("SOLVER: 3\n", "config key SOLVER has the wrong type"),
    ("_BASE_: nowhere.yaml\n", "its _BASE_ .*nowhere.yaml does not exist"),
    ("MODEL:\n  NOPE: 1\n", "unknown config key"),
])
def test_training_configs_that_are_not_configs_name_the_file(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        setup_cfg(str(config))
    assert str(config.name) in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ issue 24: silent wrong results
def _labels(sample):
    from d2ct.data.labels_csv import read_labels_csv

    return read_labels_csv(sample / "labels.csv.gz")


def test_evaluate_scores_only_labelled_columns_by_default_and_counts_the_rest(sample):
    from d2ct.evaluation.report import evaluate_csv

    labelled = [n for n in _labels(sample).names if not _labels(sample).is_empty(n)]
    assert 0 < len(labelled) < _labels(sample).n_images  # the sample has an all-zero (unlabelled) pool
    res = evaluate_csv(sample / "labels.csv.gz", sample / "labels.csv.gz", with_ap=False, progress=False)
    assert res.summary["n_images"] == len(labelled) and res.summary["ARI"] == pytest.approx(1.0)
    assert res.info["skipped_empty"] == _labels(sample).n_images - len(labelled)
    every = evaluate_csv(sample / "labels.csv.gz", sample / "labels.csv.gz", skip_empty=False, with_ap=False,
                         progress=False)
    assert every.summary["n_images"] == _labels(sample).n_images
    # an annotated list decides alone (an annotated image may truly have no structure)
    annotated = evaluate_csv(sample / "labels.csv.gz", sample / "labels.csv.gz", annotated=["0.png"],
                             with_ap=False, progress=False)
    assert annotated.summary["n_images"] == 1 and annotated.info["skipped_unannotated"] == _labels(sample).n_images - 1
    assert annotated.info["ignored_pred_columns"] == _labels(sample).n_images - 1


def test_evaluate_rejects_an_annotated_name_missing_from_the_truth(sample):
    from d2ct.evaluation.report import evaluate_csv

    (sample / "ann.json").write_text('{"annotated": ["0.png", "99.png"]}')
    with pytest.raises(DataError, match=r"ann\.json: annotated image '99\.png' is not a column of the truth .*labels\.csv\.gz"):
        evaluate_csv(sample / "labels.csv.gz", sample / "labels.csv.gz", annotated=sample / "ann.json", progress=False)
    with pytest.raises(DataError, match="'99.png' is not a column of the truth"):
        evaluate_csv(sample / "labels.csv.gz", sample / "labels.csv.gz", annotated=["99.png"], progress=False)


def test_an_annotated_list_without_labels_is_an_error(sample):
    (sample / "labels.csv.gz").unlink()
    with pytest.raises(DataError, match=r"annotated\.json lists 4 annotated image\(s\) but .* has no labels CSV"):
        ChallengeDataset.open(sample)
    assert ChallengeDataset.open(sample, labels=False).labels is None  # no labels on purpose: fine


@pytest.mark.parametrize("fraction", [1.5, 1.0, 0.0, -0.2])
def test_make_holdout_names_the_fraction_option(sample, tmp_path, fraction):
    from d2ct.data.holdout import make_holdout

    with pytest.raises(ConfigError, match=f"--test-fraction .* got {fraction}"):
        make_holdout(sample, tmp_path / "out", test_fraction=fraction)
    assert not (tmp_path / "out").exists()


def test_baseline_limit_must_be_positive(sample):
    from d2ct.baseline.watershed import compare_configs, get_preset

    with pytest.raises(ConfigError, match="--limit.* got -1"):
        compare_configs(sample, {"baseline": get_preset("baseline")}, limit=-1, progress=False)


# ------------------------------------------------------------------ checkpoints
def _damaged(path, kind):
    import torch

    if kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 40)
    elif kind == "truncated":
        torch.save({"model": {"w": torch.zeros(4096)}}, path)
        path.write_bytes(path.read_bytes()[:3000])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "a bare tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "pickled objects":
        torch.save({"model": {"w": torch.zeros(2)}, "extra": gzip.GzipFile}, path)  # a class: not plain data
    return path


@pytest.mark.parametrize("kind", ["random bytes", "truncated", "empty", "a bare tensor", "pickled objects"])
def test_a_damaged_checkpoint_names_the_file_and_never_suggests_unsafe_loading(tmp_path, kind):
    from d2ct.engine.checkpoint import read_checkpoint

    path = _damaged(tmp_path / "model_best.pth", kind)
    with pytest.raises(DataError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "it was not loaded" in message, message
    assert "weights_only" not in message and "\n" not in message


def test_a_good_checkpoint_is_read_with_its_sha256(tmp_path):
    import hashlib

    import torch

    from d2ct.engine.checkpoint import load_checkpoint, read_checkpoint

    model = torch.nn.Linear(2, 1)
    torch.save({"model": model.state_dict(), "iteration": 3}, tmp_path / "m.pth")
    data, sha = read_checkpoint(tmp_path / "m.pth")
    assert data["iteration"] == 3 and sha == hashlib.sha256((tmp_path / "m.pth").read_bytes()).hexdigest()
    fresh = torch.nn.Linear(2, 1)
    assert load_checkpoint(fresh, tmp_path / "m.pth") == sha
    assert torch.equal(fresh.weight, model.weight)


# ------------------------------------------------------------------ output paths
def test_check_writable_names_the_option_and_leaves_nothing(tmp_path):
    from d2ct.utils.fileio import check_writable

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match=r"--out .*adir is a folder; give a file name"):
        check_writable(tmp_path / "adir", kind="file")
    with pytest.raises(ConfigError, match=r"--out-dir .*afile is an existing file, not a folder"):
        check_writable(tmp_path / "afile", kind="dir", option="--out-dir")
    with pytest.raises(ConfigError, match=r"--out .*afile is a file, not a folder"):
        check_writable(tmp_path / "afile" / "sub" / "x.csv")
    check_writable(tmp_path / "new" / "deeper" / "x.csv")  # creatable: fine, and nothing created
    check_writable(tmp_path / "afile")  # replacing a file is fine
    check_writable(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_check_writable_read_only_folder(tmp_path):
    from d2ct.utils.fileio import check_writable

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"--out .*: cannot write in .*ro"):
            check_writable(ro / "x.csv")
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------ volumes
def _nifti(path, data, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_nan_voxels_are_said_once_with_the_file_name(tmp_path, caplog):
    import numpy as np

    from d2ct.data.volumes import load_volume

    data = np.full((8, 8, 3), 40.0, np.float32)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = -100.0
    path = _nifti(tmp_path / "nan.nii.gz", data, np.eye(4))
    with caplog.at_level("WARNING", logger="d2ct.data.volumes"):
        vol = load_volume(path)
    assert np.isfinite(vol.hu).all() and vol.hu.min() == -100.0
    warned = [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()]
    assert len(warned) == 1 and str(path) in warned[0] and "1 voxel(s)" in warned[0]
    _nifti(tmp_path / "allnan.nii.gz", np.full((4, 4, 2), np.nan, np.float32), np.eye(4))
    with pytest.raises(DataError, match="allnan.nii.gz: every voxel is NaN"):
        load_volume(tmp_path / "allnan.nii.gz")


def test_an_oblique_volume_is_said_once_with_the_file_name(tmp_path, caplog):
    import numpy as np

    from d2ct.data.volumes import load_volume

    t = np.radians(20)
    affine = np.eye(4)
    affine[:3, :3] = [[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]
    data = np.zeros((8, 8, 3), np.float32)
    with caplog.at_level("WARNING", logger="d2ct.data.volumes"):
        load_volume(_nifti(tmp_path / "straight.nii.gz", data, np.eye(4)))
        assert not caplog.records
        load_volume(_nifti(tmp_path / "oblique.nii.gz", data, affine))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "oblique.nii.gz: oblique volume" in warned[0] and "20.0 degrees" in warned[0]


# ------------------------------------------------------------------ progress
def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(capsys):
    from d2ct.utils.progress import progress_bar

    for _ in progress_bar(range(50), desc="work", mininterval=0):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n") and "work: 100%" in err.splitlines()[-1]


def test_a_folder_mixing_8_and_16_bit_slices_is_said_once(sample, caplog):
    import numpy as np

    from d2ct.data.images import read_slice, write_slice

    ChallengeDataset.open(sample)
    assert not [r for r in caplog.records if "bit depths" in r.getMessage()]
    img = np.asarray(read_slice(sample / "train-images" / "2.png"))
    write_slice(sample / "train-images" / "2.png", img.astype(np.uint16) * 257)
    with caplog.at_level("WARNING", logger="d2ct.data.challenge"):
        ChallengeDataset.open(sample)
    warned = [r.getMessage() for r in caplog.records if "bit depths" in r.getMessage()]
    assert len(warned) == 1 and "train-images" in warned[0] and "1 16-bit (first: 2.png)" in warned[0]
