"""The whole method end to end on tiny phantom data, on the CPU: every stage's artefacts, the
resume behaviour (a finished run is skipped; --from re-runs a stage) and bad pipeline configs."""
from __future__ import annotations

import json
import time

import pytest
import yaml

from d2ct.data.coco import load_coco_dicts
from d2ct.data.labels_csv import read_labels_csv
from d2ct.errors import ConfigError
from d2ct.pipeline.config import STAGES, load_pipeline_config

from .conftest import TINY_OPTS, run_tool

TINY_PIPELINE = [
    "data.phantom={n_train: 14, n_labelled: 6, n_test: 3, size: 96, seed: 1}",
    "radiologists.0.threshold=0.0", "radiologists.1.threshold=0.0", "radiologists.2.threshold=0.0",
    "pseudolabel.min_area=1", "baseline.workers=1",
    # a fixed threshold (the demo chooses one on validation; the tests switch to that on purpose)
    "predict.score_threshold=0.5",
    "opts=[" + ", ".join(f"'{o}'" for o in TINY_OPTS + ["TEST.EVAL_PERIOD", "2"]) + "]",
]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    # two trainings at a time: the radiologists go through the scheduler with real training runs
    args = ["--config", "configs/demo/pipeline.yaml", "--set", f"output_dir={out}", f"data.root={out}/data/phantom",
            *TINY_PIPELINE, "parallel_trainings=2", "rebalance_threads=true"]
    start = time.time()
    proc = run_tool("run_pipeline.py", *args, timeout=1500)
    return out, args, proc, time.time() - start


def test_pipeline_writes_every_artefact(pipeline_run):
    out, _, proc, _ = pipeline_run
    for stage in STAGES:
        assert (out / "stages" / f"{stage}.json").exists(), stage
    # data: COCO files of every split
    for split in ("train", "val", "unlabelled", "test"):
        dicts = load_coco_dicts(out / "data" / f"phantom_{split}.json")
        assert dicts, split
        assert all(not d["annotations"] for d in dicts) if split == "unlabelled" else any(d["annotations"] for d in dicts)
    # three radiologists and the final model, each with checkpoints and validation scores
    for model in ("radiologists/r50", "radiologists/r101", "radiologists/x101", "student_r1"):
        for name in ("model_final.pth", "model_best.pth", "model_best.json", "metrics.json", "training_curves.png"):
            assert (out / model / name).exists(), f"{model}/{name}"
    stats = json.loads((out / "pseudolabels_r1" / "stats.json").read_text())
    assert stats["pool_images"] == 8 and len(stats["radiologists"]) == 3
    assert sum(r["assigned"] for r in stats["radiologists"]) == 8
    assert abs(sum(r["weight"] for r in stats["radiologists"]) - 1) < 1e-6
    final_cfg = (out / "student_r1" / "config.yaml").read_text()
    if stats["labelled_images"]:
        assert "phantom_pseudo" in final_cfg  # the final model saw the pseudo-labelled images
    # submission in the challenge layout, readable by the evaluator
    submission = read_labels_csv(out / "submission.csv")
    assert submission.names == ["0.png", "1.png", "2.png"] and submission.n_pixels == 96 * 96
    ev = run_tool("evaluate.py", "--truth", out / "data" / "phantom" / "test-labels.csv.gz",
                  "--pred", out / "submission.csv")
    assert "ARI" in ev.stdout
    table = json.loads((out / "evaluate" / "table.json").read_text())
    assert [row["model"] for row in table] == ["baseline", "r50", "r101", "x101", "student_r1"]
    for row in table:
        assert -1 <= row["ARI"] <= 1 and 0 <= row["Dice"] <= 1
        assert "AP" in row
    report = (out / "report" / "report.md").read_text()
    assert "| baseline |" in report and "| student_r1 |" in report and "Pseudo-labels" in report
    assert "| 1 | r50 (0), r101 (0), x101 (0) | `pseudolabels_r1/` |" in report  # the round's row
    # the split is written once, and training read it from there
    splits = json.loads((out / "data" / "splits_final.json").read_text())["splits"]
    assert len(splits["train"]) + len(splits["val"]) == 6 and len(splits["unlabelled"]) == 8
    assert yaml.safe_load(final_cfg)["D2CT"]["SPLIT_FILE"] == str(out / "data" / "splits_final.json")
    assert (out / "report" / "ari_hist_student_r1.png").exists() and (out / "report" / "best_worst.png").exists()
    assert "| model | ARI (all pixels)" in proc.stdout  # the table printed at the end
    assert "3 trainings, 2 at a time" in proc.stdout + proc.stderr  # parallel_trainings=2
    for model in ("r50", "r101", "x101"):  # each training's own log, with its share of the threads
        assert "OMP_NUM_THREADS=" in (out / "logs" / f"{model}.log").read_text()
        assert "D2CT_THREADS_FILE=" in (out / "logs" / f"{model}.log").read_text()  # rebalance_threads
        assert int((out / "logs" / f"{model}.threads").read_text()) >= 1


def test_finished_pipeline_is_skipped_and_from_reruns_a_stage(pipeline_run):
    out, args, _, first_seconds = pipeline_run
    start = time.time()
    proc = run_tool("run_pipeline.py", *args)
    assert time.time() - start < min(60, first_seconds / 2)
    log = proc.stdout + proc.stderr
    assert all(f"stage {s:<12} done (skipped)" in log for s in STAGES)
    before = (out / "student_r1" / "model_final.pth").stat().st_mtime
    proc = run_tool("run_pipeline.py", *args, "--from", "evaluate")
    log = proc.stdout + proc.stderr
    assert "stage evaluate     running" in log and "stage predict      done (skipped)" in log
    assert (out / "student_r1" / "model_final.pth").stat().st_mtime == before


def test_score_threshold_chosen_on_validation_without_predicting_the_test_slices_again(pipeline_run):
    out, args, _, _ = pipeline_run
    test_instances = (out / "predict" / "student_r1_instances.json").stat().st_mtime
    proc = run_tool("run_pipeline.py", *args, "predict.score_threshold=val", "predict.threshold_grid=[0.2, 0.6, 0.95]")
    log = proc.stdout + proc.stderr
    assert "stage final        done (skipped)" in log and "stage predict      running" in log
    thresholds = json.loads((out / "predict" / "thresholds.json").read_text())
    assert list(thresholds) == ["r50", "r101", "x101", "student_r1"]
    for name, chosen in thresholds.items():
        assert chosen["chosen_on"] == "val" and list(chosen["val_ARI"]) == ["0.2", "0.6", "0.95"]
        # the best validation ARI, the lowest threshold on a tie
        top = max(chosen["val_ARI"].values())
        assert chosen["threshold"] == min(float(t) for t, v in chosen["val_ARI"].items() if v == top)
        assert (out / "predict" / "val" / f"{name}_instances.json").exists()
    # the test slices' instances were reused: only the threshold changed
    assert (out / "predict" / "student_r1_instances.json").stat().st_mtime == test_instances
    # with the radiologists' validation instances, the report scores the pseudo-labelling rules on them
    report = (out / "report" / "report.md").read_text()
    assert "### How good they are, on the validation slices" in report
    assert all(f"| {name} >= " in report for name in ("r50", "r101", "x101"))
    table = json.loads((out / "evaluate" / "table.json").read_text())
    assert {row["model"]: row.get("threshold") for row in table} == {
        "baseline": None, **{name: chosen["threshold"] for name, chosen in thresholds.items()}}
    # the submission is the final model's instances flattened at its chosen threshold
    from d2ct.postprocess.submission import PostprocessOptions, label_maps_from_instances, load_instances

    names = ["0.png", "1.png", "2.png"]
    maps = label_maps_from_instances(load_instances(out / "predict" / "student_r1_instances.json"), names,
                                     PostprocessOptions(thresholds["student_r1"]["threshold"], 5, 3))
    submission = read_labels_csv(out / "submission.csv")
    assert all((submission.label_map(n, (96, 96)) == m).all() for n, m in zip(names, maps))
    # back to the fixed threshold: flattened again, nothing predicted again
    run_tool("run_pipeline.py", *args)
    assert json.loads((out / "predict" / "thresholds.json").read_text())["student_r1"] == {
        "threshold": 0.5, "chosen_on": "config"}
    with pytest.raises(ConfigError, match="predict.score_threshold must be a score in \\[0, 1\\] or val"):
        load_pipeline_config("configs/demo/pipeline.yaml", ["predict.score_threshold=best"])
    with pytest.raises(ConfigError, match="predict.threshold_grid"):
        load_pipeline_config("configs/demo/pipeline.yaml", ["predict.threshold_grid=[]"])


def test_saved_instances_are_predicted_again_only_when_stale(pipeline_run):
    out, args, _, _ = pipeline_run
    pred = out / "predict"
    r50 = json.loads((pred / "r50_instances.json").read_text())
    assert r50["source"]["flip_tta"] is False and len(r50["source"]["weights_sha256"]) == 64
    # r50's as if another checkpoint had made them; r101's as saved before d2ct recorded a source
    r50["source"]["weights_sha256"] = "0" * 64
    (pred / "r50_instances.json").write_text(json.dumps(r50))
    r101 = json.loads((pred / "r101_instances.json").read_text())
    del r101["source"]
    (pred / "r101_instances.json").write_text(json.dumps(r101))
    # x101's cut short (damaged by something else): kept aside and predicted again
    damaged = (pred / "x101_instances.json").read_text()[:100]
    (pred / "x101_instances.json").write_text(damaged)
    kept = {n: (pred / f"{n}_instances.json").stat().st_mtime_ns for n in ("r101", "student_r1")}
    evaluated = (out / "evaluate" / "table.json").stat().st_mtime_ns
    # a run killed during the predict stage resumes there
    (out / "stages" / "predict.json").unlink()
    proc = run_tool("run_pipeline.py", *args)
    log = proc.stdout + proc.stderr
    assert "r50_instances.json: made with another checkpoint: predicting again" in log
    assert "r101_instances.json: reused as saved" in log
    assert "x101_instances.json: not valid JSON" in log and "x101_instances.json.unreadable: predicting again" in log
    assert (pred / "x101_instances.json.unreadable").read_text() == damaged
    assert json.loads((pred / "x101_instances.json").read_text())["source"]["flip_tta"] is False
    assert json.loads((pred / "r50_instances.json").read_text())["source"]["weights_sha256"] != "0" * 64
    assert {n: (pred / f"{n}_instances.json").stat().st_mtime_ns for n in kept} == kept
    # the stages after one that ran run too, even where their settings did not change
    assert "stage evaluate     running" in log and "stage report       running" in log
    assert (out / "evaluate" / "table.json").stat().st_mtime_ns > evaluated


def test_pipeline_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown pipeline key 'pseudolabel.nope'"):
        load_pipeline_config("configs/demo/pipeline.yaml", ["pseudolabel.nope=1"])
    with pytest.raises(ConfigError, match="pseudolabel.mode"):
        load_pipeline_config("configs/demo/pipeline.yaml", ["pseudolabel.mode=vote"])
    bad = tmp_path / "p.yaml"
    bad.write_text("data: {root: x}\nradiologists: [{config: configs/missing.yaml}]\n")
    with pytest.raises(ConfigError, match="radiologists\\[0\\].config"):
        load_pipeline_config(str(bad))
    proc = run_tool("run_pipeline.py", "--config", str(bad), check=False)
    assert proc.returncode == 2 and "configs/missing.yaml" in proc.stderr


def test_per_model_opts_follow_the_shared_ones_and_split_settings_reach_training(tmp_path):
    from d2ct.pipeline.runner import Pipeline

    cfg = load_pipeline_config("configs/demo/pipeline.yaml", [
        f"output_dir={tmp_path}", "opts=['SOLVER.MAX_ITER', '50']", "data.group_by=patient",
        "radiologists.1.opts=['SOLVER.MAX_ITER', '70']", "final.opts=['SOLVER.BASE_LR', '0.001']"])
    pipe = Pipeline(cfg)
    r101 = pipe._train_opts(tmp_path / "r101", ["phantom_train"], model_opts=cfg["radiologists"][1]["opts"])
    # the model's own override comes last, so it wins over the shared one
    assert r101[-4:] == ["SOLVER.MAX_ITER", "50", "SOLVER.MAX_ITER", "70"]
    # the split comes from the file the data stage wrote, not from settings training would recompute
    assert r101[r101.index("D2CT.SPLIT_FILE") + 1] == str(tmp_path / "data" / "splits_final.json")
    assert "D2CT.SPLIT_GROUP_BY" not in r101 and "D2CT.VAL_FRACTION" not in r101
    assert cfg["radiologists"][0]["opts"] == [] and cfg["final"]["opts"] == ["SOLVER.BASE_LR", "0.001"]
    with pytest.raises(ConfigError, match=r"radiologists\[2\].opts must be a list of KEY, VALUE pairs"):
        load_pipeline_config("configs/demo/pipeline.yaml", ["radiologists.2.opts=['SOLVER.MAX_ITER']"])
    with pytest.raises(ConfigError, match="final.opts must be a list"):
        load_pipeline_config("configs/demo/pipeline.yaml", ["final.opts=3"])


def test_shared_radiologists_dir_is_used_and_never_removed(tmp_path):
    from d2ct.pipeline.runner import Pipeline

    shared = tmp_path / "other_run" / "radiologists"
    (shared / "r50").mkdir(parents=True)
    (shared / "r50" / "model_final.pth").write_bytes(b"trained elsewhere")
    cfg = load_pipeline_config("configs/demo/pipeline.yaml", [f"output_dir={tmp_path / 'variant'}",
                                                              f"radiologists_dir={shared}"])
    pipe = Pipeline(cfg)
    assert pipe.radiologist_dirs()[0] == shared / "r50"
    (tmp_path / "variant" / "student_r1").mkdir(parents=True)
    pipe.reset_from("radiologists")  # --from radiologists: this run's later stages go, the shared models stay
    assert (shared / "r50" / "model_final.pth").exists()
    assert not (tmp_path / "variant" / "student_r1").exists()


def test_training_table_counts_iterations(tmp_path):
    """The report's training table: iterations from the config, the best checkpoint's iteration counted
    (old model_best.json files without iterations_trained hold Detectron2's max_iter for the final one)."""
    from types import SimpleNamespace

    from d2ct.pipeline.report import _training_rows

    dirs = {}
    for name, best in (("r50", {"value": 16.5, "iteration": 1200}),
                       ("student_r1", {"value": 9.0, "iteration": 299, "iterations_trained": 300})):
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(f"SOLVER:\n  MAX_ITER: 1200\nD2CT:\n  ROLE: role {name}\n")
        (d / "model_best.json").write_text(json.dumps(best))
        (d / "log.txt").write_text("[x] d2.engine.hooks INFO: Total training time: 0:30:43 (0:01:35 on hooks)\n")
        dirs[name] = d
    rows = _training_rows(SimpleNamespace(models=lambda: list(dirs.items())))
    assert rows[2] == "| r50 | role r50 | 1200 | 16.50 (1200) | 0:30:43 |"
    assert rows[3] == "| student_r1 | role student_r1 | 1200 | 9.00 (300) | 0:30:43 |"


def test_final_init_picks_the_best_radiologist_and_refuses_another_backbone(pipeline_run, tmp_path):
    import shutil

    from d2ct.pipeline.runner import Pipeline, StageError

    out, _, _, _ = pipeline_run
    shared = tmp_path / "radiologists"
    shutil.copytree(out / "radiologists", shared)
    for name, ap in (("r50", 10.0), ("r101", 30.0), ("x101", 20.0)):  # r101: the demo R34, as the final
        best = json.loads((shared / name / "model_best.json").read_text())
        best["scores"]["segm/AP"] = ap
        (shared / name / "model_best.json").write_text(json.dumps(best))
    sets = [f"output_dir={tmp_path / 'run'}", f"radiologists_dir={shared}"]
    pipe = Pipeline(load_pipeline_config("configs/demo/pipeline.yaml", sets + ["final.init=best"]))
    assert pipe.final_init_weights(1) == str(shared / "r101" / "model_best.pth")
    shutil.copytree(shared / "r101", tmp_path / "run" / "student_r1")  # as if round 1 had trained: round 2 starts there
    assert pipe.final_init_weights(2) == str(tmp_path / "run" / "student_r1" / "model_best.pth")
    pipe = Pipeline(load_pipeline_config("configs/demo/pipeline.yaml", sets + ["final.init=x101"]))
    with pytest.raises(StageError, match="MODEL.RESNETS.DEPTH=50 but the final config configs/demo/final.yaml has 34"):
        pipe.final_init_weights(1)
    assert Pipeline(load_pipeline_config("configs/demo/pipeline.yaml", sets)).final_init_weights(1) is None
    with pytest.raises(ConfigError, match="final.init must be scratch, best or a radiologist's name"):
        load_pipeline_config("configs/demo/pipeline.yaml", ["final.init=nobody"])
    with pytest.raises(ConfigError, match="final.pseudo_labels must be true or false"):
        load_pipeline_config("configs/demo/pipeline.yaml", ["final.pseudo_labels=maybe"])


def test_final_training_sets_follow_pseudo_labels_and_labelled_repeat(tmp_path, monkeypatch):
    """stage_final's DATASETS.TRAIN: the labelled split (repeated final.labelled_repeat times) plus the
    pseudo-labels; the labelled split alone when final.pseudo_labels is false or nothing was kept."""
    from d2ct.pipeline.runner import Pipeline

    folder = tmp_path / "run" / "pseudolabels_r1"
    folder.mkdir(parents=True)
    (folder / "pseudo_labels.json").write_text("{}")

    def final_sets(sets, labelled_images=5):
        (folder / "stats.json").write_text(json.dumps({"labelled_images": labelled_images}))
        pipe = Pipeline(load_pipeline_config("configs/demo/pipeline.yaml", [f"output_dir={tmp_path / 'run'}", *sets]))
        calls = []
        monkeypatch.setattr(pipe, "train", lambda config, out, train_sets, pseudo=None, model_opts=None:
                            calls.append((train_sets, pseudo)) or out)
        labelled_rounds.clear()
        monkeypatch.setattr(pipe, "_pseudolabel", lambda round_: labelled_rounds.append(round_) or folder)
        pipe.stage_final()
        return calls

    labelled_rounds = []
    pseudo = [str(folder / "pseudo_labels.json")]
    assert final_sets([]) == [(["phantom_train", "phantom_pseudo"], pseudo)]
    assert labelled_rounds == [1]
    assert final_sets(["final.labelled_repeat=3"]) == [(["phantom_train"] * 3 + ["phantom_pseudo"], pseudo)]
    assert final_sets(["final.labelled_repeat=3", "final.pseudo_labels=false"]) == [(["phantom_train"], None)]
    assert labelled_rounds == []  # a labelled-only run never labels the pool
    pipe = Pipeline(load_pipeline_config("configs/demo/pipeline.yaml", [f"output_dir={tmp_path / 'run'}",
                                                                       "final.pseudo_labels=false"]))
    monkeypatch.setattr(pipe, "_pseudolabel", lambda round_: pytest.fail("the pool was labelled"))
    assert pipe.stage_pseudolabel() == {"pseudo_labels": None}
    assert final_sets(["final.labelled_repeat=3"], labelled_images=0) == [(["phantom_train"], None)]
    for bad in ("0", "two", "1.5", "true"):
        with pytest.raises(ConfigError, match="final.labelled_repeat must be a whole number of at least 1"):
            load_pipeline_config("configs/demo/pipeline.yaml", [f"final.labelled_repeat={bad}"])


def test_control_trains_on_the_labelled_split_with_the_students_start(tmp_path, monkeypatch):
    """final.control: after the round-1 student, control_r1 with the same config, opts and start
    weights on the labelled split alone; scored like every model; bad values are named."""
    from d2ct.pipeline.runner import Pipeline

    folder = tmp_path / "run" / "pseudolabels_r1"
    folder.mkdir(parents=True)
    (folder / "pseudo_labels.json").write_text("{}")
    (folder / "stats.json").write_text(json.dumps({"labelled_images": 5}))
    # one training at a time: Pipeline.train is replaced below, which the parallel_trainings
    # scheduler does not call (the student and its control side by side: tests/test_parallel_trainings.py)
    sets = [f"output_dir={tmp_path / 'run'}", "final.control=true", "final.labelled_repeat=2", "pseudolabel.rounds=2",
            "final.opts=[SEED, 7]", "parallel_trainings=1"]
    pipe = Pipeline(load_pipeline_config("configs/demo/pipeline.yaml", sets))
    calls = []
    monkeypatch.setattr(pipe, "train", lambda config, out, train_sets, pseudo=None, model_opts=None:
                        calls.append((out.name, config, train_sets, pseudo, model_opts)) or out)
    monkeypatch.setattr(pipe, "_pseudolabel", lambda round_: folder)
    monkeypatch.setattr(pipe, "final_init_weights", lambda round_: f"start_{round_}.pth")
    outputs = pipe.stage_final()
    final = "configs/demo/final.yaml"
    pseudo = [str(folder / "pseudo_labels.json")]
    assert calls == [
        ("student_r1", final, ["phantom_train", "phantom_train", "phantom_pseudo"], pseudo, ["SEED", 7, "MODEL.WEIGHTS", "start_1.pth"]),
        ("control_r1", final, ["phantom_train"], None, ["SEED", 7, "MODEL.WEIGHTS", "start_1.pth"]),
        ("student_r2", final, ["phantom_train", "phantom_train", "phantom_pseudo"], pseudo, ["SEED", 7, "MODEL.WEIGHTS", "start_2.pth"]),
    ]
    assert list(outputs) == ["student_r1", "control_r1", "student_r2"]
    assert [m for m, _ in pipe.models()][-3:] == ["student_r1", "student_r2", "control_r1"]
    assert pipe.final_model_name() == "student_r2"  # the control never makes the submission
    # off (the default) leaves the stage's fingerprint as it was before the key existed
    plain = Pipeline(load_pipeline_config("configs/demo/pipeline.yaml", [f"output_dir={tmp_path / 'run'}"]))
    assert "control" not in plain._stage_settings("final")["final"]["final"]
    assert pipe._stage_settings("final")["final"]["final"]["control"] is True
    # an online teacher (D2CT.MEAN_TEACHER) learns the pool without pseudo-label files: its control
    # is the same training with the online teacher off
    online = ["final.pseudo_labels=false", "final.control=true", f"output_dir={tmp_path / 'online'}", "parallel_trainings=1",
              "final.opts=[D2CT.AUGMENT.STUDENT.ENABLED, True, D2CT.MEAN_TEACHER.ENABLED, True, "
              "D2CT.MEAN_TEACHER.UNLABELLED_DATASETS, '(\"phantom_unlabelled\",)']"]
    pipe = Pipeline(load_pipeline_config("configs/demo/pipeline.yaml", online))
    calls.clear()
    monkeypatch.setattr(pipe, "train", lambda config, out, train_sets, pseudo=None, model_opts=None:
                        calls.append((out.name, train_sets, pseudo, model_opts)) or out)
    monkeypatch.setattr(pipe, "final_init_weights", lambda round_: "start.pth")
    monkeypatch.setattr(pipe, "_pseudolabel", lambda round_: folder)
    pipe.stage_final()
    mt = ["D2CT.AUGMENT.STUDENT.ENABLED", True, "D2CT.MEAN_TEACHER.ENABLED", True,
          "D2CT.MEAN_TEACHER.UNLABELLED_DATASETS", '("phantom_unlabelled",)', "MODEL.WEIGHTS", "start.pth"]
    assert calls == [("student_r1", ["phantom_train"], None, mt),
                     ("control_r1", ["phantom_train"], None, mt + ["D2CT.MEAN_TEACHER.ENABLED", False])]
    for bad, match in ((["final.control=2"], "final.control must be true or false"),
                       (["final.control=true", "final.pseudo_labels=false"], "the student is that control")):
        with pytest.raises(ConfigError, match=match):
            load_pipeline_config("configs/demo/pipeline.yaml", bad)


def test_a_real_run_with_its_control_scores_and_reports_the_pair(pipeline_run, tmp_path):
    """The real tools, final.control on: control_r1 trains from the same start and schedule on the
    labelled split alone, is predicted and scored, and the report holds the paired difference."""
    out, _, _, _ = pipeline_run
    run = tmp_path / "run"
    run_tool("run_pipeline.py", "--config", "configs/demo/pipeline.yaml", "--set", f"output_dir={run}",
             f"data.root={out}/data/phantom", *TINY_PIPELINE, f"radiologists_dir={out / 'radiologists'}",
             "final.control=true", "final.init=r101", timeout=1200)
    student, control = (yaml.safe_load((run / m / "config.yaml").read_text()) for m in ("student_r1", "control_r1"))
    assert list(control["DATASETS"]["TRAIN"]) == ["phantom_train"]
    if json.loads((run / "pseudolabels_r1" / "stats.json").read_text())["labelled_images"]:
        assert "phantom_pseudo" in student["DATASETS"]["TRAIN"]
    for key in (("MODEL", "WEIGHTS"), ("SOLVER", "MAX_ITER"), ("SEED",)):
        a, b = student, control
        for k in key:
            a, b = a[k], b[k]
        assert a == b, key
    assert (run / "evaluate" / "control_r1" / "per_image.csv").exists()
    assert "control_r1" in {row["model"] for row in json.loads((run / "evaluate" / "table.json").read_text())}
    report = (run / "report" / "report.md").read_text()
    assert "## What the unlabelled pool added" in report and "`student_r1` (labelled + pseudo-labelled" in report


def test_report_gives_the_students_difference_from_its_control(tmp_path):
    """The report's paired section: per-slice ARI differences, bootstrap over the manifest's
    patients, and a verdict that follows the interval."""
    from types import SimpleNamespace

    from d2ct.pipeline.report import control_rows

    names = [f"s{i}.png" for i in range(12)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text(
        "file,patient\n" + "".join(f"{n},p{i // 3}\n" for i, n in enumerate(names)))

    def pipe(student_ari, control_ari):
        for model, values in (("student_r1", student_ari), ("control_r1", control_ari)):
            folder = tmp_path / "run" / "evaluate" / model
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "per_image.csv").write_text(
                "name,ARI\n" + "".join(f"{n},{v}\n" for n, v in zip(names, values)))
        return SimpleNamespace(out=tmp_path / "run", data_root=tmp_path / "data", control_name=lambda: "control_r1",
                               student_name=lambda k: f"student_r{k}", cfg={"data": {"group_by": "patient"}})

    text = "\n".join(control_rows(pipe([0.6 + 0.01 * i for i in range(12)], [0.5] * 12)))
    assert "| 0.655 | 0.500 | +0.155 |" in text and "12 / 0 |" in text
    assert "bootstrap resamples of the 4 patients" in text and "the unlabelled pool helped" in text
    text = "\n".join(control_rows(pipe([0.5] * 12, [0.6] * 12)))
    assert "-0.100 | [-0.100, -0.100] | 0 / 12 |" in text and "the unlabelled pool hurt" in text
    mixed = [0.5 + (0.05 if i % 2 else -0.05) for i in range(12)]
    assert "interval contains zero" in "\n".join(control_rows(pipe(mixed, [0.5] * 12)))
    no_control = SimpleNamespace(control_name=lambda: None, student_name=lambda k: "student_r1", out=tmp_path / "run")
    assert control_rows(no_control) == []


def test_warm_started_final_model_trains_from_its_teacher(pipeline_run, tmp_path):
    """final.init=<radiologist>: a real final training that starts from that teacher's model_best.pth,
    with the labelled split listed twice next to the pseudo-labels."""
    out, _, _, _ = pipeline_run
    run = tmp_path / "run"
    run_tool("run_pipeline.py", "--config", "configs/demo/pipeline.yaml", "--until", "final", "--set",
             f"output_dir={run}", f"data.root={out}/data/phantom", *TINY_PIPELINE,
             f"radiologists_dir={out / 'radiologists'}", "final.init=r101", "final.labelled_repeat=2", timeout=900)
    teacher = str(out / "radiologists" / "r101" / "model_best.pth")
    final_cfg = yaml.safe_load((run / "student_r1" / "config.yaml").read_text())
    assert final_cfg["MODEL"]["WEIGHTS"] == teacher
    assert f"Loading from {teacher}" in (run / "student_r1" / "log.txt").read_text()
    labelled = json.loads((run / "pseudolabels_r1" / "stats.json").read_text())["labelled_images"]
    expected = ["phantom_train", "phantom_train", "phantom_pseudo"] if labelled else ["phantom_train"]
    assert list(final_cfg["DATASETS"]["TRAIN"]) == expected
    assert (run / "student_r1" / "model_final.pth").exists() and not (run / "stages" / "predict.json").exists()


def test_ignore_below_reaches_the_pseudolabel_tool_and_is_checked(tmp_path, monkeypatch):
    from d2ct.pipeline.runner import Pipeline

    def pseudolabel_args(sets):
        pipe = Pipeline(load_pipeline_config("configs/demo/pipeline.yaml", [f"output_dir={tmp_path}", *sets]))
        for folder in pipe.radiologist_dirs():  # stand-ins for trained teachers
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model_final.pth").write_bytes(folder.name.encode())
        monkeypatch.setattr(pipe, "split_digest", lambda: "split")
        calls = []
        monkeypatch.setattr(pipe, "_run_tool", lambda tool, args, log_name: calls.append([str(a) for a in args]))
        pipe._pseudolabel(1)
        return calls[0]

    args = pseudolabel_args(["pseudolabel.ignore_below=0.3"])
    assert args[args.index("--ignore-below") + 1] == "0.3"
    assert "--ignore-below" not in pseudolabel_args([])  # default: the published method
    for bad, message in (("pseudolabel.ignore_below=0.9", "must be below every pseudo-label threshold"),
                         ("pseudolabel.ignore_below=-1", "must be a score >= 0"),
                         ("pseudolabel.ignore_below=yes", "must be a score >= 0")):
        with pytest.raises(ConfigError, match=message):
            load_pipeline_config("configs/demo/pipeline.yaml", [bad])
    with pytest.raises(ConfigError, match="needs pseudolabel.mode partition or ensemble"):
        load_pipeline_config("configs/demo/pipeline.yaml", ["pseudolabel.ignore_below=0.1", "pseudolabel.mode=consensus"])


def test_radiologist_trained_before_teaches_as_it_is(pipeline_run, tmp_path):
    """radiologists: [{name, dir}]: a finished training from elsewhere (here the first run's final
    student) labels the pool without being trained again, and no later --from removes it."""
    from d2ct.pipeline.runner import Pipeline

    out, _, _, _ = pipeline_run
    teacher = out / "student_r1"
    before = {p.name: p.stat().st_mtime_ns for p in teacher.iterdir()}
    run = tmp_path / "run"
    sets = [f"output_dir={run}", f"data.root={out}/data/phantom", *TINY_PIPELINE[:1], *TINY_PIPELINE[4:],
            f"radiologists=[{{name: teacher, dir: {teacher}, threshold: 0.0}}]", "final.init=best"]
    proc = run_tool("run_pipeline.py", "--config", "configs/demo/pipeline.yaml", "--until", "pseudolabel",
                    "--set", *sets, timeout=600)
    assert "radiologist teacher: trained before" in proc.stdout + proc.stderr
    stats = json.loads((run / "pseudolabels_r1" / "stats.json").read_text())
    assert [(r["name"], r["assigned"]) for r in stats["radiologists"]] == [("teacher", stats["pool_images"])]
    assert not (run / "radiologists").exists()
    pipe = Pipeline(load_pipeline_config("configs/demo/pipeline.yaml", sets))
    assert pipe.radiologist_dirs() == [teacher]
    assert pipe.final_init_weights(1) == str(teacher / "model_best.pth")  # the student starts where it stopped
    pipe.reset_from("radiologists")
    assert {p.name: p.stat().st_mtime_ns for p in teacher.iterdir()} == before

    for entry, message in (
            (f"{{dir: {teacher}}}", r"radiologists\[0\] with a 'dir' needs a 'name'"),
            (f"{{name: t, dir: {tmp_path}}}", f"radiologists\\[0\\].dir {tmp_path} has no config.yaml"),
            (f"{{name: t, dir: {tmp_path / 'nowhere'}}}", "does not exist"),
            (f"{{name: t, dir: {teacher}, config: configs/demo/radiologist_r50.yaml}}", "not both"),
            (f"{{name: t, dir: {teacher}, opts: [SOLVER.MAX_ITER, 5]}}", "a radiologist given by 'dir' is not trained"),
            (f"{{name: baseline, dir: {teacher}}}", "the name 'baseline' is the pipeline's own"),
            (f"{{name: student_r1, dir: {teacher}}}", "the name 'student_r1' is the pipeline's own"),
            ("{config: configs/demo/radiologist_r50.yaml, treshold: 0.5}", r"unknown key\(s\) treshold")):
        with pytest.raises(ConfigError, match=message):
            load_pipeline_config("configs/demo/pipeline.yaml", [f"radiologists=[{entry}]"])


def test_a_changed_threshold_remakes_the_pseudo_labels_and_the_student_only(pipeline_run):
    """The real tools: a radiologist's pseudo-label threshold changed in the settings makes the
    pseudo-labels and the student again (never a new marker over old outputs); the radiologists stay."""
    out, args, _, _ = pipeline_run
    r50 = (out / "radiologists" / "r50" / "model_final.pth").stat().st_mtime_ns
    student = (out / "student_r1" / "model_final.pth").stat().st_mtime_ns
    proc = run_tool("run_pipeline.py", *args, "radiologists.0.threshold=0.3", timeout=900)
    log = proc.stdout + proc.stderr
    assert "stage radiologists done (skipped)" in log and "stage pseudolabel  running" in log
    assert "pseudolabels_r1: made with other settings (teachers" in log
    assert (out / "radiologists" / "r50" / "model_final.pth").stat().st_mtime_ns == r50
    assert (out / "student_r1" / "model_final.pth").stat().st_mtime_ns != student
    stats = json.loads((out / "pseudolabels_r1" / "stats.json").read_text())
    assert [r["threshold"] for r in stats["radiologists"]] == [0.3, 0.0, 0.0]
    assert "| 1 | r50 (0.3), r101 (0), x101 (0) |" in (out / "report" / "report.md").read_text()


def test_report_says_why_when_the_final_model_trails_its_teachers():
    from types import SimpleNamespace

    from d2ct.pipeline.report import _standing

    pipe = SimpleNamespace(final_model_name=lambda: "student_r1",
                           cfg={"radiologists": [{"name": "r50"}, {"name": "r101"}]})
    rows = [{"model": "baseline", "ARI": 0.49}, {"model": "r50", "ARI": 0.45}, {"model": "r101", "ARI": 0.38},
            {"model": "student_r1", "ARI": 0.39}]
    line = _standing(pipe, rows)[0]
    assert "student_r1, ARI 0.390) trails its best radiologist (r50, 0.450)" in line
    assert "classical baseline (0.490)" in line
    rows[-1]["ARI"] = 0.5
    assert _standing(pipe, rows) == []
