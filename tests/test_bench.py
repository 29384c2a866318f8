"""Tests of the benchmark drivers: bench/run_all.py (discovery, --only, failures, RESULTS.md) with
stand-in benchmarks, and the OpenKBP experiment tables (bench/openkbp_experiments.py).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import openkbp_experiments, run_all  # noqa: E402


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


def _fake_run(base: Path) -> None:
    """A finished main run as run_pipeline leaves it, with made-up scores."""
    import json

    (base / "data").mkdir(parents=True)
    (base / "data" / "summary.json").write_text(json.dumps(
        {"root": "datasets/x", "splits": {"train": {"images": 8}, "val": {"images": 2}, "test": {"images": 3}}}))
    (base / "evaluate").mkdir()
    (base / "evaluate" / "table.json").write_text(json.dumps(
        [{"model": "baseline", "ARI": 0.1}, {"model": "r50", "ARI": 0.5, "AP": 12.0},
         {"model": "final", "ARI": 0.6, "AP": 14.0}]))
    for name in ("r50", "r101", "x101"):
        d = base / "radiologists" / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 600\n")
        rows = [{"iteration": 299, "segm/AP": 2.0, "ct/ARI": 0.25}, {"iteration": 450, "total_loss": 1.0},
                {"iteration": 600, "segm/AP": 7.5, "ct/ARI": 0.45}]  # the final evaluation: under max_iter
        (d / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (base / "radiologists" / "r50" / "log.txt").write_text(
        "[12/02 03:49:33] d2.engine.hooks INFO: Overall training speed: 598 iterations in 0:10:00 (1.0 s / it)\n")


@pytest.fixture
def calls(monkeypatch) -> list:
    """The commands run_variant would run (tools/run_pipeline.py is not started)."""
    calls: list = []
    monkeypatch.setattr(openkbp_experiments.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    return calls


def test_openkbp_tables_count_iterations_and_keep_the_pipeline_order(tmp_path):
    base = tmp_path / "cpu_pipeline"
    _fake_run(base)
    args = SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml")
    text = openkbp_experiments.table(args)
    assert "| main | r50 | 0.500 | - | - | - | 12.0 | - |" in text
    assert "| main | baseline | 0.100 |" in text
    assert text.index("`r50`") < text.index("`r101`") < text.index("`x101`")  # not alphabetical
    assert "| 300 | 2.0 | - | 0.250 |" in text  # iteration 299 = 300 trained
    assert "| 600 | 7.5 | - | 0.450 |" in text and "| 601 |" not in text
    assert "598 iterations in 0:10:00" in text
    assert "train 8, val 2, test 3" in text


def test_openkbp_teachers_are_shown_once_from_the_first_finished_run(tmp_path):
    import json

    base = tmp_path / "cpu_pipeline"
    _fake_run(base)
    warm = tmp_path / "cpu_pipeline_warmstart"
    (warm / "evaluate").mkdir(parents=True)
    (warm / "evaluate" / "table.json").write_text(json.dumps(
        [{"model": "baseline", "ARI": 0.1}, {"model": "r50", "ARI": 0.5}, {"model": "final", "ARI": 0.7}]))
    args = SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml")
    text = openkbp_experiments.table(args)
    assert "| warmstart | final | 0.700 |" in text and "| warmstart | r50 |" not in text
    # without the main run's scores, the first finished variant shows the baseline and radiologists
    (base / "evaluate" / "table.json").unlink()
    text = openkbp_experiments.table(args)
    assert "| warmstart | r50 | 0.500 |" in text and "| warmstart | baseline | 0.100 |" in text
    assert "| main |" not in text


def test_openkbp_variants_share_identical_pseudo_labels(tmp_path, calls):
    base = tmp_path / "cpu_pipeline"
    done = base / "pseudolabels"
    done.mkdir(parents=True)
    (done / "stats.json").write_text("{}")
    (done / "pseudo_labels.json").write_text("{}")
    args = SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml")
    openkbp_experiments.run_variant(args, "warmstart_labelled")
    copied = tmp_path / "cpu_pipeline_warmstart_labelled" / "pseudolabels"
    assert (copied / "stats.json").exists() and (copied / "pseudo_labels.json").exists()
    cmd = calls[-1]
    assert "final.pseudo_labels=false" in cmd and "final.init=best" in cmd
    assert f"radiologists_dir={base / 'radiologists'}" in cmd
    openkbp_experiments.run_variant(args, "consensus")  # other pseudo-labels: labels the pool itself
    assert not (tmp_path / "cpu_pipeline_consensus" / "pseudolabels").exists()


def test_openkbp_variants_reuse_the_most_complete_raw_predictions_of_any_run(tmp_path, calls):
    base = tmp_path / "cpu_pipeline"
    args = SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml")
    openkbp_experiments.run_variant(args, "warmstart_ignore")  # nothing has run: it predicts itself
    assert not (tmp_path / "cpu_pipeline_warmstart_ignore" / "pseudolabels").exists()

    def cache(variant, model, images):
        folder = tmp_path / f"cpu_pipeline_{variant}" / "pseudolabels" / "cache"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{model}.json").write_text(json.dumps({"images": [{"name": f"{i}.png"} for i in range(images)]}))

    cache("warmstart_labelled", "r50", 5)  # a partition group
    cache("warmstart_labelled", "r101", 3)
    cache("warmstart_consensus", "r50", 8)  # the whole pool
    (tmp_path / "cpu_pipeline_thr05" / "pseudolabels" / "cache").mkdir(parents=True)
    (tmp_path / "cpu_pipeline_thr05" / "pseudolabels" / "cache" / "r101.json").write_text("{not json")
    shutil.rmtree(tmp_path / "cpu_pipeline_warmstart_ignore", ignore_errors=True)
    openkbp_experiments.run_variant(args, "warmstart_ignore")
    got = tmp_path / "cpu_pipeline_warmstart_ignore" / "pseudolabels" / "cache"
    assert len(json.loads((got / "r50.json").read_text())["images"]) == 8
    assert len(json.loads((got / "r101.json").read_text())["images"]) == 3
    assert "pseudolabel.ignore_below=0.3" in calls[-1]
    openkbp_experiments.run_variant(args, "consensus")  # consensus starts from the partition groups too
    assert len(json.loads((tmp_path / "cpu_pipeline_consensus" / "pseudolabels" / "cache" / "r101.json")
                          .read_text())["images"]) == 3


def test_openkbp_variants_reuse_the_radiologists_test_predictions(tmp_path, monkeypatch):
    monkeypatch.setattr(openkbp_experiments.subprocess, "run", lambda cmd, **kw: None)
    base = tmp_path / "cpu_pipeline"
    args = SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml")
    done = tmp_path / "cpu_pipeline_warmstart_labelled"
    (done / "predict" / "val").mkdir(parents=True)
    for name in ("r50", "r101", "x101"):
        (done / "predict" / f"{name}_instances.json").write_text(name)
    (done / "predict" / "val" / "r50_instances.json").write_text("r50 val")
    openkbp_experiments.run_variant(args, "warmstart_ignore")  # the other run's predict stage is unfinished
    assert not (tmp_path / "cpu_pipeline_warmstart_ignore" / "predict").exists()
    (done / "stages").mkdir()
    (done / "stages" / "predict.json").write_text("{}")
    (done / "predict" / "final_instances.json").write_text("not a radiologist's")
    openkbp_experiments.run_variant(args, "warmstart_ignore")
    copied = tmp_path / "cpu_pipeline_warmstart_ignore" / "predict"
    assert (copied / "x101_instances.json").read_text() == "x101" and not (copied / "final_instances.json").exists()
    # validation instances too, where a run has them (for predict.score_threshold=val)
    assert (copied / "val" / "r50_instances.json").read_text() == "r50 val"
    assert not (copied / "val" / "r101_instances.json").exists()


def test_openkbp_teacher_subset_gets_its_own_run_folders(tmp_path, calls):
    base = tmp_path / "cpu_pipeline"
    args = SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml", radiologists=["r101", "r50"])
    openkbp_experiments.run_variant(args, "warmstart_ignore")
    cmd = calls[-1]
    assert f"output_dir={tmp_path / 'cpu_pipeline_r50+r101_warmstart_ignore'}" in cmd
    assert f"radiologists_dir={base / 'radiologists'}" in cmd
    override = next(c for c in cmd if c.startswith("radiologists="))
    assert [r["name"] for r in json.loads(override.split("=", 1)[1])] == ["r50", "r101"]
    from d2ct.pipeline.config import load_pipeline_config

    cfg = load_pipeline_config(args.config, [override, "data.root=datasets/sample"])
    assert [r["name"] for r in cfg["radiologists"]] == ["r50", "r101"]
    with pytest.raises(SystemExit, match="nope"):
        openkbp_experiments.run_variant(SimpleNamespace(**{**vars(args), "radiologists": ["nope"]}), "warmstart")


def test_openkbp_two_round_variants_start_from_a_copy_of_their_one_round_run(tmp_path, calls):
    base = tmp_path / "cpu_pipeline"
    args = SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml", radiologists=["r50", "r101"])
    round1 = tmp_path / "cpu_pipeline_r50+r101_warmstart"
    (round1 / "final").mkdir(parents=True)
    (round1 / "final" / "model_0000299.pth").write_text("periodic")
    openkbp_experiments.run_variant(args, "warmstart_rounds2")  # round 1 unfinished: nothing copied
    out = tmp_path / "cpu_pipeline_r50+r101_warmstart_rounds2"
    assert not (out / "final").exists()
    (round1 / "final" / "model_final.pth").write_text("final")
    (round1 / "final" / "model_best.pth").write_text("best")
    (round1 / "pseudolabels").mkdir()
    (round1 / "pseudolabels" / "pseudo_labels.json").write_text("{}")
    openkbp_experiments.run_variant(args, "warmstart_rounds2")
    assert (out / "final" / "model_best.pth").read_text() == "best"
    assert not (out / "final" / "model_0000299.pth").exists()  # periodic checkpoints stay behind
    assert (out / "pseudolabels" / "pseudo_labels.json").exists()
    assert "pseudolabel.rounds=2" in calls[-1] and "final.init=best" in calls[-1]
    assert not (tmp_path / "cpu_pipeline_rounds2").exists()  # the plain variant's folder is untouched


def test_openkbp_threshold_variants_set_every_teacher_of_a_subset(tmp_path, calls):
    base = tmp_path / "cpu_pipeline"
    args = SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml", radiologists=["r50", "r101"])
    openkbp_experiments.run_variant(args, "warmstart_thr09")
    sets = calls[-1][calls[-1].index("--set") + 1:]
    # the subset is set first, so the thresholds are not replaced by it
    assert sets.index("radiologists.0.threshold=0.9") > next(i for i, s in enumerate(sets) if s.startswith("radiologists="))
    assert "radiologists.1.threshold=0.9" in sets and not any(s.startswith("radiologists.2.") for s in sets)
    from d2ct.pipeline.config import load_pipeline_config

    cfg = load_pipeline_config(str(openkbp_experiments.ROOT / args.config), sets)
    assert [(r["name"], r["threshold"]) for r in cfg["radiologists"]] == [("r50", 0.9), ("r101", 0.9)]
    openkbp_experiments.run_variant(SimpleNamespace(output=str(base), config=args.config), "thr05")
    sets = calls[-1][calls[-1].index("--set") + 1:]
    assert [s for s in sets if s.startswith("radiologists.")] == [f"radiologists.{i}.threshold=0.5" for i in range(3)]


def test_every_openkbp_variant_is_a_valid_pipeline_config(tmp_path, calls):
    # a typo in a variant's settings or config path would only surface after an hour of training
    from d2ct.pipeline.config import load_pipeline_config

    teachers = {openkbp_experiments.STRONG_TEACHER: tmp_path / "cpu_pipeline_r50+r101_long_labelled" / "final",
                openkbp_experiments.SECOND_GENERATION: tmp_path / "cpu_pipeline_r50+r101_strong_teacher" / "final"}
    for teacher in teachers.values():  # the runs' final models that teach other runs, trained
        teacher.mkdir(parents=True)
        (teacher / "config.yaml").write_text("MODEL: {}\n")
        (teacher / "model_final.pth").write_bytes(b"weights")
    for variant in openkbp_experiments.VARIANTS:
        args = SimpleNamespace(output=str(tmp_path / "cpu_pipeline"), config="configs/cpu/pipeline_openkbp.yaml",
                               radiologists=["r50", "r101"], predict_threshold="val")
        openkbp_experiments.run_variant(args, variant)
        sets = calls[-1][calls[-1].index("--set") + 1:]
        cfg = load_pipeline_config(str(openkbp_experiments.ROOT / args.config), sets)
        assert (openkbp_experiments.ROOT / cfg["final"]["config"]).is_file(), variant
        if openkbp_experiments.own_teachers(variant):  # "@long_labelled/final" names that run's model
            [(name, folder)] = [(r["name"], r["dir"]) for r in cfg["radiologists"]]
            assert name in teachers and folder == str(teachers[name]), variant
        else:
            assert [r["name"] for r in cfg["radiologists"]] == ["r50", "r101"], variant
        assert cfg["predict"]["score_threshold"] == "val", variant
    with pytest.raises(SystemExit) as exc:
        openkbp_experiments.main(["--predict-threshold", "1.5", "--table-only"])
    assert exc.value.code == 2


def test_patient_bootstrap_resamples_patients_not_slices():
    mean, low, high = openkbp_experiments.patient_bootstrap([0.1] * 6, ["a", "a", "b", "b", "c", "c"])
    assert (mean, low, high) == pytest.approx((0.1, 0.1, 0.1))
    # one patient with many slices all better, another all worse: the interval must span both
    diff = [0.2] * 10 + [-0.2] * 2
    mean, low, high = openkbp_experiments.patient_bootstrap(diff, ["a"] * 10 + ["b"] * 2)
    assert mean == pytest.approx(0.2 * 8 / 12) and low == pytest.approx(-0.2) and high == pytest.approx(0.2)


def test_openkbp_table_has_paired_differences_against_the_control(tmp_path):
    base = tmp_path / "cpu_pipeline"
    holdout = tmp_path / "holdout"
    holdout.mkdir()
    (holdout / "manifest.csv").write_text("holdout,file,patient\n" + "".join(
        f"test,{i}.png,pt_{i // 2}\n" for i in range(6)) + "train,9.png,pt_9\n")

    def per_image(variant, model, aris):
        d = tmp_path / f"cpu_pipeline_{variant}" / "evaluate" / model
        d.mkdir(parents=True)
        (d / "per_image.csv").write_text("name,ARI\n" + "".join(f"{i}.png,{a}\n" for i, a in enumerate(aris)))
        (d.parent / "table.json").write_text("[]")

    per_image("warmstart_labelled", "final", [0.5] * 6)
    per_image("warmstart", "r50", [0.4] * 6)
    per_image("warmstart", "final", [0.6] * 6)
    args = SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml", holdout=holdout)
    text = openkbp_experiments.table(args)
    assert "bootstrap resamples of the 3 test patients" in text
    assert "| warmstart | r50 | -0.100 | [-0.100, -0.100] | 0 / 6 |" in text
    assert "| warmstart | final | +0.100 | [+0.100, +0.100] | 6 / 0 |" in text
    assert "| warmstart_labelled |" not in text.split("## Paired")[1].split("###")[0]  # not against itself
    assert "against long_labelled" not in text  # no longer schedule has run
    # a longer schedule's pseudo-labelled run is also compared with its own control
    per_image("long_labelled", "final", [0.7] * 6)
    per_image("long_thr09", "final", [0.65] * 6)
    section = openkbp_experiments.table(args).split("## Paired differences on the test slices: against long_labelled")[1]
    assert "| long_thr09 | final | -0.050 | [-0.050, -0.050] | 0 / 6 |" in section.split("##")[0]
    assert "| warmstart |" not in section.split("##")[0]
    # and every final model against the best radiologist (no pseudo-label stats here: the first one)
    section = openkbp_experiments.table(args).split("every final model against the r50 radiologist")[1].split("##")[0]
    assert "(the best radiologist by validation mask AP)" in section
    assert "| warmstart | final | +0.200 | [+0.200, +0.200] | 6 / 0 |" in section
    assert "| long_thr09 | final | +0.250 |" in section and "| warmstart | r50 |" not in section


def test_openkbp_table_counts_foreground_pixels_of_predictions_and_truth(tmp_path):
    base = tmp_path / "cpu_pipeline"
    _fake_run(base)
    (base / "predict").mkdir()
    (base / "predict" / "r50.csv").write_text("pixel,0.png,1.png\n0,1,0\n1,2,0\n2,0,0\n3,0,3\n")
    holdout = tmp_path / "holdout"
    holdout.mkdir()
    (holdout / "test-labels.csv.gz").write_bytes(__import__("gzip").compress(b"pixel,0.png\n0,1\n1,0\n"))
    args = SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml", holdout=holdout)
    text = openkbp_experiments.table(args)
    assert "| main | r50 | 0.500 | - | - | - | 12.0 | - | - | - | 1.5 |" in text  # (2 + 1) / 2 slices
    assert "| main | final |" in text and text.split("| main | final |")[1].split("\n")[0].endswith("| - |")
    assert "The truth has 1.0 foreground pixels per test slice" in text


def test_openkbp_table_lists_what_each_round_of_pseudo_labelling_kept(tmp_path):
    base = tmp_path / "cpu_pipeline"
    _fake_run(base)
    for folder, kept in (("pseudolabels", 7), ("pseudolabels_r2", 6)):
        (base / folder).mkdir()
        (base / folder / "stats.json").write_text(json.dumps(
            {"mode": "partition", "labelled_images": kept, "pool_images": 8, "instances": 3 * kept,
             "instances_per_image": 3.0, "ignore_regions": 2}))
    text = openkbp_experiments.table(SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml"))
    assert "| main | pseudolabels | partition | 7 of 8 | 21 | 3.00 | 2 |" in text
    assert "| main | pseudolabels_r2 | partition | 6 of 8 | 18 | 3.00 | 2 |" in text


def test_openkbp_table_shows_thresholds_chosen_on_validation_and_teachers_once(tmp_path):
    base = tmp_path / "cpu_pipeline"
    _fake_run(base)
    chosen = {"r50": {"threshold": 0.3, "chosen_on": "val", "val_ARI": {"0.3": 0.62, "0.5": 0.607}},
              "final": {"threshold": 0.5, "chosen_on": "val", "val_ARI": {"0.3": 0.5, "0.5": 0.6}}}
    (base / "predict").mkdir()
    (base / "predict" / "thresholds.json").write_text(json.dumps(chosen))
    other = tmp_path / "cpu_pipeline_consensus" / "predict"
    other.mkdir(parents=True)
    (other / "thresholds.json").write_text(json.dumps({**chosen, "final": {**chosen["final"], "threshold": 0.3}}))
    table = json.loads((base / "evaluate" / "table.json").read_text())
    (base / "evaluate" / "table.json").write_text(json.dumps([{**row, "threshold": 0.3} for row in table]))
    text = openkbp_experiments.table(SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml"))
    section = text.split("## Score thresholds chosen on the validation split", 1)[1]
    assert "| run | model | chosen | 0.3 | 0.5 |" in section
    assert "| main | r50 | 0.3 | 0.620 | 0.607 |" in section and "| main | final | 0.5 | 0.500 | 0.600 |" in section
    assert "| consensus | final | 0.3 |" in section and "| consensus | r50 |" not in section
    assert "| main | final | 0.600 |" in text and text.split("| main | final |")[1].split("\n")[0].endswith("| 0.3 |")
    # fixed thresholds: no such section
    (base / "predict" / "thresholds.json").write_text(json.dumps({"final": {"threshold": 0.5, "chosen_on": "config"}}))
    (other / "thresholds.json").unlink()
    assert "## Score thresholds chosen" not in openkbp_experiments.table(
        SimpleNamespace(output=str(base), config="configs/cpu/pipeline_openkbp.yaml"))


def _instances_file(path: Path, weights: Path, flip: bool, names=("a.png", "b.png")) -> None:
    from d2ct.engine.predictor import prediction_source

    images = [{"name": n, "height": 4, "width": 4, "scores": [0.9], "rles": [{"size": [4, 4], "counts": "04000"}]}
              for n in names]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": prediction_source(weights, flip), "images": images}))


def test_flip_tta_bench_reuses_matching_predictions_and_predicts_the_rest(tmp_path, monkeypatch):
    from bench import openkbp_flip_tta

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_best.pth").write_bytes(b"weights")
    saved, work = tmp_path / "run" / "final_instances.json", tmp_path / "work"
    _instances_file(saved, model / "model_best.pth", flip=False)
    predicted = []

    def fake_predict(cmd, **kwargs):  # tools/predict.py: writes the --instances file
        predicted.append(cmd)
        _instances_file(Path(cmd[cmd.index("--instances") + 1]), model / "model_best.pth", "--flip-tta" in cmd)

    monkeypatch.setattr(openkbp_flip_tta.subprocess, "run", fake_predict)
    names = ["a.png", "b.png"]
    args = (model, tmp_path / "images", names, saved)
    plain = openkbp_flip_tta.model_instances(*args, work / "plain.json", False, tmp_path / "plain.log")
    assert predicted == [] and set(plain) == set(names)  # the run's own plain predictions
    flip = openkbp_flip_tta.model_instances(*args, work / "flip.json", True, tmp_path / "flip.log")
    assert len(predicted) == 1 and "--flip-tta" in predicted[0] and set(flip) == set(names)
    assert (work / "flip.txt").read_text().split() == names  # the slices it was asked for
    openkbp_flip_tta.model_instances(*args, work / "flip.json", True, tmp_path / "flip.log")
    assert len(predicted) == 1  # resumed: predicted once
    (model / "model_best.pth").write_bytes(b"retrained")  # stale everywhere: predicted again
    openkbp_flip_tta.model_instances(*args, work / "plain.json", False, tmp_path / "plain.log")
    assert len(predicted) == 2 and "--flip-tta" not in predicted[1]


def test_flip_tta_bench_table_pairs_plain_and_flip():
    from bench import openkbp_flip_tta

    row = {"model": "long_labelled final", "threshold": "0.5", "ARI": (0.6, 0.62), "diff": (0.02, -0.01, 0.05),
           "better_worse": (50, 30), "Dice": (0.6, 0.61), "recall": (0.7, None), "AP": (19.6, 20.1),
           "structures": (3.0, 3.5), "truth_structures": 3.9}
    text = openkbp_flip_tta.table([row], 82, 28)
    assert "82 held-out test slices" in text and "28 test patients" in text and "(the truth has 3.90)" in text
    assert ("| long_labelled final | 0.5 | 0.600 -> 0.620 | +0.020 | [-0.010, +0.050] | 50 / 30 "
            "| 0.600 -> 0.610 | - | 19.6 -> 20.1 | 3.00 -> 3.50 |") in text


def test_openkbp_main_writes_the_table_after_each_run_and_builds_it_once_per_run(tmp_path, monkeypatch, capsys):
    holdout, out = tmp_path / "holdout", tmp_path / "T.md"
    holdout.mkdir()
    (holdout / "holdout.json").write_text("{}")  # made before: make_holdout.py is not run
    ran, built = [], []
    monkeypatch.setattr(openkbp_experiments, "run_variant", lambda args, variant: ran.append(variant))
    monkeypatch.setattr(openkbp_experiments, "table", lambda args: built.append(len(ran)) or f"table after {len(ran)}\n")
    assert openkbp_experiments.main(["--only", "main", "warmstart", "--holdout", str(holdout), "--out", str(out)]) == 0
    assert ran == ["main", "warmstart"] and built == [1, 2]  # the last run's table is the one printed
    assert out.read_text() == "table after 2\n"
    assert capsys.readouterr().out == f'table after 2\n\n{{"written": "{out}"}}\n'
    assert openkbp_experiments.main(["--table-only", "--out", str(out)]) == 0 and built == [1, 2, 2]
