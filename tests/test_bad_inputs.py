"""The bad-input matrix: each user mistake gives one clear error naming the file, column or key,
and leaves no partial output behind. (Tool-level cases: tests/test_tools_bad_inputs.py.)"""
from __future__ import annotations

import gzip
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
