"""Outputs bound to their settings: change one group of pipeline settings at a time and check that
exactly the affected models and pseudo-labels are made again, the others reused.

The training and pseudo-labelling tools are replaced by stand-ins that write outputs unique to each
call (so "made again" is visible by content), which keeps this fast; the real tools run in
tests/test_pipeline.py, including one real settings change on the tiny pipeline."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from d2ct.pipeline.config import load_pipeline_config
from d2ct.pipeline.provenance import SETTINGS_FILE, StaleOutputError, changed_keys

# one training at a time: the stand-ins replace Pipeline._run_tool, which the scheduler of
# parallel_trainings (tests/test_parallel_trainings.py) does not call
BASE = ["data.phantom={n_train: 10, n_labelled: 6, n_test: 2, size: 64, seed: 3}", "baseline.enabled=false",
        "parallel_trainings=1"]


class StubTools:
    """Stand-ins for train_net and pseudolabel: each call writes outputs unique to it."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def __call__(self, tool: str, args: list, log_name: str) -> None:
        args = [str(a) for a in args]
        if "train" in tool:
            from d2ct.config import setup_cfg

            opts = args[args.index("--resume") + 1:]
            out = Path(opts[opts.index("OUTPUT_DIR") + 1])
            self.calls.append(("train", out.name))
            out.mkdir(parents=True, exist_ok=True)
            weights = os.urandom(64)
            for name in ("model_final.pth", "model_best.pth"):
                (out / name).write_bytes(weights)
            (out / "model_best.json").write_text(json.dumps({"value": 10.0, "iteration": 1,
                                                             "scores": {"segm/AP": 10.0}}))
            (out / "config.yaml").write_text(setup_cfg(args[args.index("--config") + 1], opts).dump())
        elif "pseudolabel" in tool:
            out = Path(args[args.index("--out") + 1])
            self.calls.append(("pseudolabel", out.name))
            out.mkdir(parents=True, exist_ok=True)
            (out / "pseudo_labels.json").write_text(json.dumps({"made_by": args, "nonce": os.urandom(8).hex()}))
            (out / "stats.json").write_text(json.dumps({"labelled_images": 3, "pool_images": 4, "instances": 9}))
        else:
            raise AssertionError(f"unexpected tool {tool}")


@pytest.fixture()
def run_with(tmp_path, monkeypatch):
    """run_with(*overrides) -> the set of (tool, folder) calls a run up to the final stage made."""
    from d2ct.pipeline.runner import Pipeline

    stub = StubTools()

    def run(*sets, config="configs/demo/pipeline.yaml"):
        cfg = load_pipeline_config(config, [f"output_dir={tmp_path / 'run'}",
                                            f"data.root={tmp_path / 'run' / 'data' / 'phantom'}", *BASE, *sets])
        pipe = Pipeline(cfg)
        monkeypatch.setattr(pipe, "_run_tool", stub)
        stub.calls.clear()
        pipe.run(until="final")
        return set(stub.calls)

    run.out = tmp_path / "run"
    return run


def digest(path: Path) -> bytes:
    return path.read_bytes()


ALL = {("train", "r50"), ("train", "r101"), ("train", "x101"), ("pseudolabel", "pseudolabels_r1"),
       ("train", "student_r1")}
ROUND1 = {("pseudolabel", "pseudolabels_r1"), ("train", "student_r1")}


def test_each_group_of_settings_remakes_exactly_what_depends_on_it(run_with, tmp_path):
    out = run_with.out
    assert run_with() == ALL
    assert run_with() == set()  # nothing changed: everything skipped
    r50 = digest(out / "radiologists" / "r50" / "model_final.pth")

    # a radiologist's threshold: the pseudo-labels and the student, no radiologist
    labels = digest(out / "pseudolabels_r1" / "pseudo_labels.json")
    assert run_with("radiologists.0.threshold=0.9") == ROUND1
    assert digest(out / "pseudolabels_r1" / "pseudo_labels.json") != labels
    assert digest(out / "radiologists" / "r50" / "model_final.pth") == r50
    t = ["radiologists.0.threshold=0.9"]

    # the pseudo-labelling mode: the same
    assert run_with(*t, "pseudolabel.mode=consensus") == ROUND1
    t.append("pseudolabel.mode=consensus")

    # the student's opts: the student alone
    labels = digest(out / "pseudolabels_r1" / "pseudo_labels.json")
    student = digest(out / "student_r1" / "model_final.pth")
    assert run_with(*t, "final.opts=['SOLVER.BASE_LR', '0.001']") == {("train", "student_r1")}
    assert digest(out / "pseudolabels_r1" / "pseudo_labels.json") == labels
    assert digest(out / "student_r1" / "model_final.pth") != student
    t.append("final.opts=['SOLVER.BASE_LR', '0.001']")

    # one radiologist's opts: that radiologist, then what it teaches
    assert run_with(*t, "radiologists.1.opts=['SOLVER.MAX_ITER', '3']") == {("train", "r101")} | ROUND1
    assert digest(out / "radiologists" / "r50" / "model_final.pth") == r50
    t.append("radiologists.1.opts=['SOLVER.MAX_ITER', '3']")

    # the student's starting point: the student alone
    assert run_with(*t, "final.init=r101") == {("train", "student_r1")}  # r101: the demo's R34, as the student
    t.append("final.init=r101")

    # a second round: round 1 is reused, round 2 made
    student = digest(out / "student_r1" / "model_final.pth")
    assert run_with(*t, "pseudolabel.rounds=2") == {("pseudolabel", "pseudolabels_r2"), ("train", "student_r2")}
    assert digest(out / "student_r1" / "model_final.pth") == student
    # the threshold a student teaches with: round 2 again
    assert run_with(*t, "pseudolabel.rounds=2", "final.teach_threshold=0.95") == {
        ("pseudolabel", "pseudolabels_r2"), ("train", "student_r2")}
    t += ["pseudolabel.rounds=2", "final.teach_threshold=0.95"]

    # the split: every model sees other slices, so everything is made again
    assert run_with(*t, "data.val_fraction=0.5") == ALL | {("pseudolabel", "pseudolabels_r2"), ("train", "student_r2")}
    splits = json.loads((out / "data" / "splits_final.json").read_text())
    assert splits["made_with"]["val_fraction"] == 0.5 and len(splits["splits"]["val"]) == 3

    # each folder says what it was made with
    record = json.loads((out / "student_r2" / SETTINGS_FILE).read_text())
    assert record["settings"]["config"]["SOLVER"]["BASE_LR"] == 0.001 and len(record["settings"]["pseudo_labels"]) == 1


def test_an_edited_training_config_file_retrains_that_model(run_with, tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree("configs", configs)
    pipeline_yaml = configs / "demo" / "pipeline.yaml"
    text = pipeline_yaml.read_text().replace("configs/demo/", f"{configs}/demo/")
    pipeline_yaml.write_text(text)
    assert run_with(config=str(pipeline_yaml)) == ALL
    r50 = configs / "demo" / "radiologist_r50.yaml"
    r50.write_text(r50.read_text().replace("BASE_LR: 0.025", "BASE_LR: 0.02"))
    assert run_with(config=str(pipeline_yaml)) == {("train", "r50")} | ROUND1
    # an edited base config reaches every model built on it
    base = configs / "demo" / "Base-demo.yaml"
    base.write_text(base.read_text() + "\nTEST:\n  EVAL_PERIOD: 7\n")
    assert run_with(config=str(pipeline_yaml)) == ALL


def test_a_killed_training_resumes_and_one_with_other_settings_starts_again(run_with):
    out = run_with.out
    assert run_with() == ALL
    student = out / "student_r1"
    # killed before it finished: the same settings resume in the same folder (its checkpoints kept)
    (student / "model_final.pth").unlink()
    (student / "model_0000009.pth").write_bytes(b"last checkpoint")
    (out / "stages" / "final.json").unlink()  # killed: the stage never finished
    assert run_with() == {("train", "student_r1")}
    assert (student / "model_0000009.pth").exists()
    # killed, then run with other settings: the unfinished folder is removed first
    (student / "model_final.pth").unlink()
    (out / "stages" / "final.json").unlink()
    assert run_with("final.opts=['SOLVER.BASE_LR', '0.001']") == {("train", "student_r1")}
    assert not (student / "model_0000009.pth").exists()


def test_a_shared_radiologists_dir_is_never_removed_for_other_settings(run_with, tmp_path):
    shared = tmp_path / "shared"
    assert run_with(f"radiologists_dir={shared}") == ALL
    assert run_with(f"radiologists_dir={shared}") == set()
    with pytest.raises(StaleOutputError, match=r"shared/r50 holds a trained model made with other settings "
                                               r"\(config\.SOLVER\.MAX_ITER\)"):
        run_with(f"radiologists_dir={shared}", "radiologists.0.opts=['SOLVER.MAX_ITER', '3']")
    assert (shared / "r50" / "model_final.pth").exists()


def test_outputs_with_no_record_are_not_trusted(run_with):
    out = run_with.out
    assert run_with() == ALL
    (out / "radiologists" / "x101" / SETTINGS_FILE).unlink()  # e.g. made by an older d2ct
    (out / "stages" / "radiologists.json").unlink()
    assert run_with() == {("train", "x101")} | ROUND1


def test_changed_keys_names_what_differs():
    assert changed_keys({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == "a.c"
    assert changed_keys(None, {"a": 1}) == "no record of its settings"
    many = changed_keys({f"k{i}": 0 for i in range(9)}, {f"k{i}": 1 for i in range(9)})
    assert many.endswith("(and 3 more)")


def test_split_file_is_what_training_reads(tmp_path):
    """A Detectron2 registration given the split file uses its names, whatever the split settings say."""
    from detectron2.data import DatasetCatalog

    from d2ct.data.challenge import ChallengeDataset
    from d2ct.data.register import register_challenge_dataset, unregister
    from d2ct.data.splits import make_splits, write_splits
    from d2ct.errors import DataError

    ds = ChallengeDataset.open("datasets/sample")
    record = make_splits(ds, val_fraction=0.5, seed=1)
    record["splits"]["train"], record["splits"]["val"] = record["splits"]["val"], record["splits"]["train"]
    path = write_splits(tmp_path / "splits_final.json", record)
    try:
        register_challenge_dataset("splitcheck", "datasets/sample", val_fraction=0.2, seed=0, split_file=path)
        assert [d["name"] for d in DatasetCatalog.get("splitcheck_train")] == record["splits"]["train"]
        assert [d["name"] for d in DatasetCatalog.get("splitcheck_val")] == record["splits"]["val"]
        record["splits"]["val"] = ["nowhere.png"]
        write_splits(path, record)
        register_challenge_dataset("splitcheck2", "datasets/sample", split_file=path)
        with pytest.raises(DataError, match="splits_final.json: 1 val image\\(s\\) not in"):
            DatasetCatalog.get("splitcheck2_val")
        path.write_text(json.dumps({"format": "other"}))
        with pytest.raises(DataError, match="not a split file"):
            register_challenge_dataset("splitcheck3", "datasets/sample", split_file=path)
    finally:
        for name in ("splitcheck", "splitcheck2", "splitcheck3"):
            unregister(name)


def test_a_model_trained_before_a_new_config_key_existed_is_kept_at_its_default(tmp_path):
    """A newer d2ct adds a training key (D2CT.PSEUDO_NEGATIVES): models recorded without it are the same
    models while it holds its default, and stale (removed, or an error when not owned) otherwise."""
    from d2ct.pipeline.provenance import SETTINGS_FILE, StaleOutputError, claim_folder, fingerprint
    from d2ct.pipeline.runner import config_key_at_default

    old = {"config": {"D2CT": {"MIN_AREA": 0}, "SOLVER": {"MAX_ITER": 10}}, "split": "abc"}
    for owned in (True, False):
        folder = tmp_path / f"model_{owned}"
        folder.mkdir()
        (folder / "model_final.pth").write_bytes(b"w")
        (folder / SETTINGS_FILE).write_text(json.dumps({"fingerprint": fingerprint(old), "settings": old}))
        new = json.loads(json.dumps(old))
        new["config"]["D2CT"]["PSEUDO_NEGATIVES"] = "background"
        assert claim_folder(folder, new, owned=owned, at_default=config_key_at_default) is True
        assert (folder / "model_final.pth").exists()
        new["config"]["D2CT"]["PSEUDO_NEGATIVES"] = "ignore"
        if owned:
            assert claim_folder(folder, new, owned=True, at_default=config_key_at_default) is False
            assert not (folder / "model_final.pth").exists()
        else:
            with pytest.raises(StaleOutputError, match="PSEUDO_NEGATIVES"):
                claim_folder(folder, new, owned=False, at_default=config_key_at_default)
    changed = json.loads(json.dumps(old))
    changed["config"]["SOLVER"]["MAX_ITER"] = 20  # a key the record has, changed: never "at default"
    folder = tmp_path / "model_changed"
    folder.mkdir()
    (folder / "model_final.pth").write_bytes(b"w")
    (folder / SETTINGS_FILE).write_text(json.dumps({"fingerprint": fingerprint(old), "settings": old}))
    with pytest.raises(StaleOutputError, match="SOLVER.MAX_ITER"):
        claim_folder(folder, changed, owned=False, at_default=config_key_at_default)
