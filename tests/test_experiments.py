"""experiments/openkbp: the variants file, the driver's pipeline command lines, the tables from
run folders (hand-made here), the flip-TTA bench's parts, and one real run of the driver through
the pipeline on a tiny phantom (two variants sharing their radiologists)."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2ct.pipeline.config import load_pipeline_config  # noqa: E402
from experiments.openkbp import run, tables  # noqa: E402

from .conftest import TINY_OPTS  # noqa: E402

# the variants of the old bench/openkbp_experiments.py, every one kept
OLD_VARIANTS = ["main", "consensus", "rounds2", "thr05", "warmstart", "warmstart_labelled", "warmstart_repeat3",
                "warmstart_thr09", "warmstart_ignore", "warmstart_consensus", "warmstart_rounds2",
                "warmstart_thr09_ignore", "warmstart_thr095", "warmstart_thr09_repeat3", "long_labelled", "long_thr09",
                "long_consensus", "long_labelled_seed7", "strong_teacher", "strong_teacher_labelled",
                "strong_teacher_seed7", "strong_teacher_labelled_seed7", "second_generation",
                "second_generation_labelled"]
# issue 23's variants, added after them
NEW_VARIANTS = ["ensemble_student", "ensemble_student_seed7", "warmstart_labelled_seed7", "mean_teacher",
                "mean_teacher_seed7", "warmstart_labelled_walltime", "warmstart_labelled_walltime_seed7"]


def _trained(folder: Path) -> Path:
    """A folder that passes for a finished training (config.yaml, model_final.pth)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 600\n")
    (folder / "model_final.pth").write_bytes(b"weights")
    return folder


def _seed(cfg: dict):
    """The training seed a pipeline config's final.opts give (None: the config's own)."""
    opts = cfg["final"]["opts"]
    return [v for k, v in zip(opts[::2], opts[1::2]) if k == "SEED"] or None


def _train_named_models(exp: run.Experiment) -> None:
    """Stand-ins for the models variants name by "@<variant>/..." (their configs check they exist)."""
    for variant in exp.variants:
        for _, folder in exp.needs(variant):
            _trained(folder)


def _experiment(tmp_path: Path, subset=None, **kw) -> run.Experiment:
    teachers = run.radiologist_subset("configs/cpu/pipeline_openkbp.yaml", subset)
    return run.Experiment(runs=tmp_path / "runs", teachers=teachers, **kw)


@pytest.mark.parametrize("subset", [None, ["r50", "r101"]])
def test_every_variant_is_a_valid_pipeline_config(tmp_path, subset):
    exp = _experiment(tmp_path, subset, predict_threshold="val")
    assert list(exp.variants) == OLD_VARIANTS + NEW_VARIANTS and exp.spec["reference"] == "warmstart_labelled"
    _train_named_models(exp)
    names = [r["name"] for r in exp.teachers] if subset else ["r50", "r101", "x101"]
    configs = {}
    for variant in exp.variants:
        cfg = configs[variant] = exp.pipeline_config(variant)
        assert cfg["output_dir"] == str(tmp_path / "runs" / f"{variant}{exp.tag}")
        assert cfg["radiologists_dir"] == str(tmp_path / "runs" / "radiologists")  # shared by every run
        assert cfg["predict"]["score_threshold"] == "val"
        if any(s.startswith("radiologists=") for s in exp.variants[variant]["sets"]):
            [teacher] = cfg["radiologists"]
            assert teacher["dir"].startswith(str(tmp_path / "runs")) and teacher["threshold"] == 0.8
        else:
            assert [r["name"] for r in cfg["radiologists"]] == names, variant
    assert {r["threshold"] for r in configs["warmstart_thr09"]["radiologists"]} == {0.9}
    assert configs["thr05"]["radiologists"][-1]["threshold"] == 0.5
    assert configs["strong_teacher"]["radiologists"][0]["dir"] == str(
        tmp_path / "runs" / f"long_labelled{exp.tag}" / "student_r1")
    assert configs["rounds2"]["pseudolabel"]["rounds"] == 2 and configs["strong_teacher_seed7"]["final"]["opts"] == ["SEED", 7]
    ensemble, ensemble7 = configs["ensemble_student"], configs["ensemble_student_seed7"]
    assert ensemble["pseudolabel"]["mode"] == ensemble7["pseudolabel"]["mode"] == "ensemble"
    assert {r["threshold"] for r in ensemble["radiologists"] + ensemble7["radiologists"]} == {0.6}
    assert ensemble["final"]["opts"] == ["D2CT.AUGMENT.STUDENT.ENABLED", True]
    assert ensemble7["final"]["opts"] == ["D2CT.AUGMENT.STUDENT.ENABLED", True, "SEED", 7]
    assert configs["warmstart_labelled_seed7"]["final"]["opts"] == ["SEED", 7]
    online = configs["mean_teacher"]["final"]["opts"]
    assert online[online.index("D2CT.MEAN_TEACHER.UNLABELLED_DATASETS") + 1] == '("openkbp_unlabelled",)'
    # the seed-7 repeats differ from their seed-42 runs by the seed alone
    assert configs["mean_teacher_seed7"]["final"]["opts"] == online + ["SEED", 7]
    assert (configs["warmstart_labelled_walltime_seed7"]["final"]["opts"]
            == configs["warmstart_labelled_walltime"]["final"]["opts"] + ["SEED", 7])
    # a control is the labelled-only run of the same start and schedule (the equal-compute pair)
    for variant, v in exp.variants.items():
        if v["control"]:
            control, cfg = configs[v["control"]], configs[variant]
            assert control["final"]["pseudo_labels"] is False, variant
            # a seed repeat, or an online teacher (no offline pseudo-labels)
            online_or_seed = ("long_labelled_seed7", "mean_teacher", "mean_teacher_seed7")
            assert cfg["final"]["pseudo_labels"] is (variant not in online_or_seed), variant
            if variant != "long_labelled_seed7":  # the same training seed on both sides of a pair
                assert _seed(control) == _seed(cfg), (variant, _seed(control), _seed(cfg))
            for key in ("config", "init"):
                assert control["final"][key] == cfg["final"][key], (variant, key)
            assert [r["name"] for r in control["radiologists"]] == [r["name"] for r in cfg["radiologists"]], variant
    # a control of equal wall time: labelled-only, the same start and config, a longer schedule
    from d2ct.config import setup_cfg

    pairs = [(variant, other) for variant, v in exp.variants.items() for other in v["also_against"]]
    assert pairs == [("mean_teacher", "warmstart_labelled_walltime"),
                     ("mean_teacher_seed7", "warmstart_labelled_walltime_seed7")]
    for variant, other in pairs:
        control, cfg = configs[other], configs[variant]
        assert control["final"]["pseudo_labels"] is False
        assert _seed(control) == _seed(cfg), variant
        assert (control["final"]["config"], control["final"]["init"]) == (cfg["final"]["config"], cfg["final"]["init"])
        solver = [setup_cfg(c["final"]["config"], [str(o) for o in c["final"]["opts"]]).SOLVER for c in (cfg, control)]
        assert solver[1].MAX_ITER > solver[0].MAX_ITER and solver[1].STEPS[-1] < solver[1].MAX_ITER
        assert tuple(solver[1].STEPS) == (767, 1054)
    assert exp.taught_by() == {"long_labelled": ["strong_teacher", "strong_teacher_labelled", "strong_teacher_seed7",
                                                 "strong_teacher_labelled_seed7"],
                               "strong_teacher": ["second_generation", "second_generation_labelled"]}


@pytest.mark.parametrize("text, match", [
    ("variants:\n  a: {sets: [final.init=best], control: nope}\n", "a.control names 'nope', which is not a variant"),
    ("variants:\n  a: {sets: [\"radiologists=[{name: t, dir: '@b/student_r1'}]\"]}\n", "a.sets names 'b'"),
    ("variants:\n  a: {sets: [final.init]}\n", "KEY=VALUE"),
    ("variants:\n  a: {sets: []}\npeers:\n  a: {args: [--seconds, 60]}\n",
     "peer 'a': expected a name .* that no variant has"),
    ("variants:\n  a: {sets: []}\npeers:\n  unet: {args: --seconds 60}\n", "peer 'unet'.*'args'"),
    ("reference: x\nvariants:\n  a: {sets: []}\n", "reference names 'x'"),
    ("variants:\n  a: {sets: [], also_against: [b]}\n", "a.also_against names 'b', which is not a variant"),
    ("variants:\n  a: {sets: [], also_against: a}\n", "'also_against' must be a list"),
    ("variants:\n  a: {sets: [final.init=best, 'final.opts+=[SEED, 7]']}\n",
     "variant a: 'final.opts\\+=\\[SEED, 7\\]' appends to final.opts, which no earlier item"),
    ("variants:\n  a: {sets: [final.init=best, 'final.init+=[x]']}\n", "final.init\\+=: 'best' is not a \\[list\\]"),
    ("variants:\n  a: {sets: ['final.opts=[SEED, 7]', final.opts+=SEED]}\n", "'SEED' is not a \\[list\\]"),
    ("variants:\n  a: {sets: []}\nholdouts:\n  datasets/x: {seed: '3'}\n", "holdouts: 'datasets/x'.*seed: int"),
    ("variants:\n  a: {sets: []}\nholdouts:\n  datasets/x: {fraction: 0.5}\n", "holdouts: 'datasets/x'.*test_fraction"),
])
def test_variants_file_errors_name_the_problem(tmp_path, text, match):
    bad = tmp_path / "v.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit, match=match):
        run.load_variants(bad)


def test_results_files_point_to_the_variants_files_commands(tmp_path):
    """A results file's header names the README beside its variants file (where its commands are)."""
    for folder in ("openkbp", "phantom", "abdomen"):
        assert run.load_variants(ROOT / "experiments" / folder / "variants.yaml")["commands"] == \
            f"experiments/{folder}/README.md"
    elsewhere = tmp_path / "v.yaml"
    elsewhere.write_text("variants:\n  a: {sets: [final.init=best]}\n")
    assert run.load_variants(elsewhere)["commands"] == "experiments/openkbp/README.md"


def test_variants_append_to_an_aliased_list(tmp_path):
    """``KEY+=[...]`` extends the last KEY=[...] before it (through YAML aliases, chained), the quoting
    of each part kept; an empty list on either side; the other items and their order untouched."""
    f = tmp_path / "v.yaml"
    f.write_text(
        "variants:\n"
        "  a: {sets: &a [final.init=best, \"final.opts=[X, '(\\\"p\\\",)']\", final.pseudo_labels=false]}\n"
        "  b: {sets: &b [*a, 'final.opts+=[SOLVER.MAX_ITER, 9]']}\n"
        "  c: {sets: [*b, 'final.opts+=[SEED, 7]']}\n"
        "  d: {sets: ['final.opts=[]', 'final.opts+=[SEED, 7]', 'final.opts=[Y, 1]', 'final.opts+=[]']}\n")
    v = run.load_variants(f)["variants"]
    assert v["a"]["sets"] == ["final.init=best", "final.opts=[X, '(\"p\",)']", "final.pseudo_labels=false"]
    assert v["b"]["sets"] == ["final.init=best", "final.opts=[X, '(\"p\",)', SOLVER.MAX_ITER, 9]", "final.pseudo_labels=false"]
    assert v["c"]["sets"][1] == "final.opts=[X, '(\"p\",)', SOLVER.MAX_ITER, 9, SEED, 7]"
    assert yaml.safe_load(v["c"]["sets"][1].split("=", 1)[1]) == ["X", '("p",)', "SOLVER.MAX_ITER", 9, "SEED", 7]
    assert v["d"]["sets"] == ["final.opts=[SEED, 7]", "final.opts=[Y, 1]"]


@pytest.fixture
def calls(monkeypatch) -> list:
    """The subprocesses the driver would start (none is started); tables not built."""
    calls: list = []
    monkeypatch.setattr(run.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(tables, "table", lambda exp: calls.append("table") or f"tables of {len(calls)} calls\n")
    return calls


def test_driver_runs_one_pipeline_per_variant_sharing_the_radiologists(tmp_path, calls, capsys):
    runs, out = tmp_path / "runs", tmp_path / "T.md"
    holdout = tmp_path / "holdout"
    assert run.main(["--runs", str(runs), "--only", "main", "warmstart_thr09", "--radiologists", "r101", "r50",
                     "--predict-threshold", "val", "--source", str(tmp_path / "src"), "--out", str(out),
                     "--set", f"data.root={holdout}"]) == 0
    make_holdout, main, _, thr09, _ = calls  # the tables after each run, built once per run
    assert make_holdout[1].endswith("tools/make_holdout.py") and make_holdout[make_holdout.index("--out") + 1] == str(holdout)
    assert make_holdout[make_holdout.index("--data") + 1] == str(tmp_path / "src")
    for cmd, variant in ((main, "main"), (thr09, "warmstart_thr09")):
        assert cmd[:5] == [sys.executable, str(ROOT / "tools/run_pipeline.py"), "--config",
                           "configs/cpu/pipeline_openkbp.yaml", "--set"]
        sets = cmd[5:]
        assert sets[:2] == [f"output_dir={runs / variant}_r50+r101", f"radiologists_dir={runs / 'radiologists'}"]
        assert [r["name"] for r in json.loads(sets[2].split("=", 1)[1])] == ["r50", "r101"]  # config order
        assert sets[-2:] == ["predict.score_threshold=val", f"data.root={holdout}"]
    assert thr09[8:-2] == ["final.config=configs/cpu/final_warmstart.yaml", "final.init=best",
                           "radiologists.0.threshold=0.9", "radiologists.1.threshold=0.9"]
    assert calls[2] == calls[4] == "table"
    assert out.read_text() == "tables of 5 calls\n" and "tables of 5 calls\n" in capsys.readouterr().out
    # the hold-out exists now: not made again; a taught run needs its teacher's run first
    holdout.mkdir()
    with pytest.raises(SystemExit, match="run --only long_labelled first"):
        run.main(["--runs", str(runs), "--only", "strong_teacher", "--set", f"data.root={holdout}", "--out", str(out)])
    assert len(calls) == 5
    _trained(runs / "long_labelled" / "student_r1")
    run.main(["--runs", str(runs), "--only", "strong_teacher", "--set", f"data.root={holdout}", "--out", str(out)])
    assert f"radiologists=[{{name: r50_2400, dir: '{runs / 'long_labelled' / 'student_r1'}', threshold: 0.8}}]" in calls[-2]
    # --table-only runs nothing; bad options are usage errors
    run.main(["--runs", str(runs), "--table-only", "--out", str(out)])
    assert len(calls) == 8 and calls[-1] == "table"
    # a peer: tools/train_unet.py on the same data and split, with its own options; not again once finished
    run.main(["--runs", str(runs), "--only", "unet", "--set", f"data.root={holdout}", "--out", str(out)])
    unet = calls[-2]
    assert unet[:2] == [sys.executable, str(ROOT / "tools/train_unet.py")]
    assert unet[2:12] == ["--data", str(holdout), "--out", str(runs / "unet"), "--val-fraction", "0.2",
                          "--split-seed", "0", "--group-by", "patient"]
    assert unet[12:] == ["--seconds", "3600", "--iters", "100000", "--eval-period", "250"]
    (runs / "unet").mkdir()
    (runs / "unet" / "run.json").write_text("{}")
    run.main(["--runs", str(runs), "--only", "unet", "--set", f"data.root={holdout}", "--out", str(out)])
    assert len(calls) == 11 and calls[-1] == "table"  # only the tables again
    with pytest.raises(SystemExit, match="--only: nope not in"):
        run.main(["--only", "nope", "--table-only"])
    with pytest.raises(SystemExit, match="--radiologists: nope not in"):
        run.main(["--radiologists", "nope", "--table-only"])
    with pytest.raises(SystemExit) as exc:
        run.main(["--predict-threshold", "1.5", "--table-only"])
    assert exc.value.code == 2


def test_driver_stops_when_a_pipeline_run_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(run.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 2))
    exp = _experiment(tmp_path)
    with pytest.raises(SystemExit, match="main: tools/run_pipeline.py failed \\(exit 2\\); its logs: .*main/logs"):
        run.run_variant(exp, "main")


# ------------------------------------------------------------------------------------------------
# tables from hand-made run folders
# ------------------------------------------------------------------------------------------------
def _holdout(tmp_path: Path) -> Path:
    """A data set folder as make_holdout leaves it: 6 test slices of 3 patients, their truth."""
    root = tmp_path / "holdout"
    root.mkdir()
    (root / "manifest.csv").write_text("holdout,file,patient\n" + "".join(
        f"test,{i}.png,pt_{i // 2}\n" for i in range(6)) + "train,9.png,pt_9\n")
    (root / "test-labels.csv.gz").write_bytes(gzip.compress(b"pixel,0.png,1.png\n0,1,0\n1,0,2\n2,0,0\n"))
    return root


def _run(exp: run.Experiment, variant: str, scores: dict[str, list[float]], extra_rows=()) -> Path:
    """A finished run folder: table.json, per-slice scores, data summary (made-up numbers)."""
    out = exp.run_dir(variant)
    (out / "data").mkdir(parents=True)
    (out / "data" / "summary.json").write_text(json.dumps(
        {"root": "datasets/x", "splits": {"train": {"images": 8}, "val": {"images": 2}, "test": {"images": 6}}}))
    rows = [*extra_rows]
    for model, aris in scores.items():
        d = out / "evaluate" / model
        d.mkdir(parents=True)
        (d / "per_image.csv").write_text("name,ARI\n" + "".join(f"{i}.png,{a}\n" for i, a in enumerate(aris)))
        rows.append({"model": model, "ARI": sum(aris) / len(aris), "AP": 10.0})
    (out / "evaluate" / "table.json").write_text(json.dumps(rows))
    return out


def test_tables_from_run_folders(tmp_path):
    holdout = _holdout(tmp_path)
    exp = _experiment(tmp_path, ["r50", "r101"], extra=[f"data.root={holdout}"])
    assert tables.table(exp).count("| run | model |") == 1  # nothing has run: an empty score table
    base = [{"model": "baseline", "ARI": 0.1}]
    first = _run(exp, "warmstart", {"r50": [0.4] * 6, "r101": [0.3] * 6, "student_r1": [0.6] * 6}, base)
    _run(exp, "warmstart_labelled", {"r50": [0.4] * 6, "r101": [0.3] * 6, "student_r1": [0.5] * 6}, base)
    _run(exp, "long_labelled", {"r50": [0.4] * 6, "student_r1": [0.7] * 6})
    _run(exp, "long_thr09", {"r50": [0.4] * 6, "student_r1": [0.65] * 6})
    _run(exp, "warmstart_rounds2", {"student_r1": [0.6] * 6, "student_r2": [0.2, 0.2, 0.2, 0.2, 0.8, 0.8]})
    _trained(exp.run_dir("long_labelled") / "student_r1")
    _run(exp, "strong_teacher", {"r50_2400": [0.7] * 6, "student_r1": [0.75] * 6})
    _run(exp, "mean_teacher", {"student_r1": [0.62] * 6})
    _run(exp, "warmstart_labelled_walltime", {"student_r1": [0.58] * 6})
    (first / "predict").mkdir()
    (first / "predict" / "r50.csv").write_text("pixel,0.png,1.png\n0,1,0\n1,2,0\n2,0,0\n3,0,3\n")
    (first / "predict" / "thresholds.json").write_text(json.dumps(
        {"r50": {"threshold": 0.3, "chosen_on": "val", "val_ARI": {"0.3": 0.62, "0.5": 0.607}},
         "student_r1": {"threshold": 0.5, "chosen_on": "val", "val_ARI": {"0.3": 0.5, "0.5": 0.6}}}))
    for run_dir, folder, kept, aps in ((first, "pseudolabels_r1", 7, (16.0, 9.5)), (first, "pseudolabels_r2", 6, None),
                                       (exp.run_dir("warmstart_labelled"), "pseudolabels_r1", 5, None)):
        (run_dir / folder).mkdir()
        (run_dir / folder / "stats.json").write_text(json.dumps(
            {"mode": "partition", "labelled_images": kept, "pool_images": 8, "instances": 3 * kept,
             "instances_per_image": 3.0, "ignore_regions": 2,
             "radiologists": [{"name": n, "ap": a, "weight": 0.5} for n, a in zip(("r50", "r101"), aps or ())]}))
    peer = exp.peer_dir("unet")  # the U-Net yardstick's folder (tools/train_unet.py)
    (peer / "evaluate").mkdir(parents=True)
    (peer / "evaluate" / "per_image.csv").write_text("name,ARI\n" + "".join(f"{i}.png,0.55\n" for i in range(6)))
    (peer / "submission.csv").write_text("pixel,0.png,1.png\n0,1,0\n1,1,0\n2,0,0\n3,0,3\n")
    (peer / "run.json").write_text(json.dumps({"scores": {"ARI": 0.55, "Dice": 0.5, "AP": 12.0}, "iterations": 900,
                                               "seconds": 1800, "best": {"ARI": 0.6, "iteration": 800}}))
    rad = exp.runs / "radiologists" / "r50"
    rad.mkdir(parents=True)
    (rad / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 600\n")
    (rad / "metrics.json").write_text("\n".join(json.dumps(r) for r in (
        {"iteration": 299, "segm/AP": 2.0, "ct/ARI": 0.25}, {"iteration": 450, "total_loss": 1.0},
        {"iteration": 600, "segm/AP": 7.5, "ct/ARI": 0.45})) + "\n")
    text = tables.table(exp)
    sections = {s.split("\n", 1)[0]: s for s in text.split("\n## ")}
    head = text.split("\n## ")[0]
    # the score table: baseline and radiologists once (the first finished run), then every run's students
    assert "Teachers: r50, r101 (a subset: `--radiologists`)." in head and "train 8, val 2, test 6" in head
    assert "| warmstart | baseline | 0.100 |" in head and "| warmstart_labelled | baseline |" not in head
    assert "| warmstart | r50 | 0.400 | - | - | - | 10.0 | - | - | - | 1.5 |" in head  # (2 + 1) px / 2 slices
    assert "| warmstart_rounds2 | student_r1 |" in head and "| warmstart_rounds2 | student_r2 | 0.400 |" in head
    assert "| strong_teacher | student_r1 | 0.750 |" in head and "| strong_teacher | r50_2400 |" not in head
    assert "The truth has 1.0 foreground pixels per test slice" in head
    assert "| unet (peer) | unet | 0.550 | - | 0.500 | - | 12.0 | - | - | - | 1.5 | - |" in head
    # every model against the reference run's final model, patients resampled
    ref = sections["Paired differences on the test slices"]
    assert "`warmstart_labelled student_r1` (the labelled-only control)" in ref
    assert "bootstrap resamples of the 3 test patients" in ref
    assert "| warmstart | r50 | -0.100 | [-0.100, -0.100] | 0 / 6 |" in ref
    assert "| warmstart | student_r1 | +0.100 | [+0.100, +0.100] | 6 / 0 |" in ref
    assert "| warmstart_labelled |" not in ref  # not against itself
    assert "| unet | unet | +0.050 | [+0.050, +0.050] | 6 / 0 |" in ref
    peer_rows = sections["Paired differences on the test slices: every final model against the unet peer"]
    assert "| long_labelled | student_r1 | +0.150 |" in peer_rows and "| warmstart | r50 |" not in peer_rows
    assert "unet (peer, `" in text and "900 iterations in 0.50 h, best validation ARI 0.600 at iteration 800" in text
    # slices 0-3 (patients 0, 1) worse by 0.3, slices 4-5 (patient 2) better: the interval spans both
    row = next(line for line in ref.splitlines() if line.startswith("| warmstart_rounds2 | student_r2 |"))
    low, high = (float(x) for x in row.split("[")[1].split("]")[0].split(","))
    assert "| -0.100 |" in row and "| 2 / 4 |" in row and low == pytest.approx(-0.3) and high == pytest.approx(0.3)
    # each run against its equal-compute control; taught runs against their teacher
    control = sections["Paired differences on the test slices: against long_labelled"]
    assert "| long_thr09 | student_r1 | -0.050 | [-0.050, -0.050] | 0 / 6 |" in control and "| warmstart |" not in control
    assert "against warmstart_labelled\n" not in text  # the reference's section covers it
    # and against a control of equal wall time (also_against)
    walltime = sections["Paired differences on the test slices: against warmstart_labelled_walltime"]
    assert "| mean_teacher | student_r1 | +0.040 | [+0.040, +0.040] | 6 / 0 |" in walltime
    teacher = sections["Paired differences on the test slices: against their teacher, long_labelled student_r1"]
    assert "| strong_teacher | student_r1 | +0.050 |" in teacher
    best = sections["Paired differences on the test slices: every final model against the r50 radiologist"]
    assert "`warmstart r50` (the best radiologist by validation mask AP)" in best
    assert "| long_thr09 | student_r1 | +0.250 |" in best and "| warmstart | r101 |" not in best
    # thresholds chosen on validation, what each round kept, each model's validation curve
    assert "| warmstart | r50 | 0.3 | 0.620 | 0.607 |" in sections["Score thresholds chosen on the validation split"]
    kept = sections["Pseudo-labels"]
    assert "| warmstart | pseudolabels_r1 | partition | 7 of 8 | 21 | 3.00 | 2 |" in kept
    assert "| warmstart | pseudolabels_r2 | partition | 6 of 8 | 18 | 3.00 | 2 |" in kept
    assert "| warmstart_labelled |" not in kept  # a labelled-only run's pool labels (older pipelines) went unread
    curves = sections["Validation during training"]
    assert "`r50`:" in curves and "| 300 | 2.0 | - | 0.250 |" in curves and "| 601 |" not in curves


def test_tables_bootstrap_slices_when_a_test_slice_has_no_patient(tmp_path, caplog):
    """The tables group slices as the pipeline report does (d2ct.pipeline.report.eval_groups): a test
    slice missing from the manifest makes the bootstrap resample slices, with a warning naming it,
    instead of leaving that slice out of the comparison."""
    holdout = _holdout(tmp_path)
    exp = _experiment(tmp_path, ["r50"], extra=[f"data.root={holdout}"])
    _run(exp, "warmstart_labelled", {"r50": [0.4] * 6, "student_r1": [0.5] * 6})
    runs = tables.Runs(exp)
    assert runs.groups() == ({f"{i}.png": f"pt_{i // 2}" for i in range(6)}, "patients")
    (holdout / "manifest.csv").write_text("holdout,file,patient\n" + "".join(
        f"test,{i}.png,pt_{i // 2}\n" for i in range(5)))
    with caplog.at_level("WARNING"):
        assert runs.groups() == ({f"{i}.png": f"{i}.png" for i in range(6)}, "slices")
    assert "'5.png' has no row" in caplog.text


def test_patient_bootstrap_resamples_patients_not_slices():
    mean, low, high = tables.patient_bootstrap([0.1] * 6, ["a", "a", "b", "b", "c", "c"])
    assert (mean, low, high) == pytest.approx((0.1, 0.1, 0.1))
    diff = [0.2] * 10 + [-0.2] * 2  # one patient all better, another all worse: the interval spans both
    mean, low, high = tables.patient_bootstrap(diff, ["a"] * 10 + ["b"] * 2)
    assert mean == pytest.approx(0.2 * 8 / 12) and low == pytest.approx(-0.2) and high == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------
# the flip-TTA bench's parts (its predictions: tools/predict.py, monkeypatched)
# ------------------------------------------------------------------------------------------------
def _instances_file(path: Path, weights: Path, flip: bool, names=("a.png", "b.png")) -> None:
    from d2ct.engine.predictor import prediction_source

    images = [{"name": n, "height": 4, "width": 4, "scores": [0.9], "rles": [{"size": [4, 4], "counts": "04000"}]}
              for n in names]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": prediction_source(weights, flip), "images": images}))


def test_flip_tta_reuses_matching_predictions_and_predicts_the_rest(tmp_path, monkeypatch):
    from experiments.openkbp import flip_tta

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_best.pth").write_bytes(b"weights")
    saved, work = tmp_path / "run" / "student_r1_instances.json", tmp_path / "work"
    _instances_file(saved, model / "model_best.pth", flip=False)
    predicted = []

    def fake_predict(cmd, **kwargs):  # tools/predict.py: writes the --instances file
        predicted.append(cmd)
        _instances_file(Path(cmd[cmd.index("--instances") + 1]), model / "model_best.pth", "--flip-tta" in cmd)

    monkeypatch.setattr(flip_tta.subprocess, "run", fake_predict)
    names = ["a.png", "b.png"]
    args = (model, tmp_path / "images", names, saved)
    plain = flip_tta.model_instances(*args, work / "plain.json", False, tmp_path / "plain.log")
    assert predicted == [] and set(plain) == set(names)  # the run's own plain predictions
    flip = flip_tta.model_instances(*args, work / "flip.json", True, tmp_path / "flip.log")
    assert len(predicted) == 1 and "--flip-tta" in predicted[0] and set(flip) == set(names)
    assert (work / "flip.txt").read_text().split() == names
    flip_tta.model_instances(*args, work / "flip.json", True, tmp_path / "flip.log")
    assert len(predicted) == 1  # resumed: predicted once
    (model / "model_best.pth").write_bytes(b"retrained")  # stale everywhere: predicted again
    flip_tta.model_instances(*args, work / "plain.json", False, tmp_path / "plain.log")
    assert len(predicted) == 2 and "--flip-tta" not in predicted[1]


def test_flip_tta_table_pairs_plain_and_flip():
    from experiments.openkbp import flip_tta

    row = {"model": "long_labelled student_r1", "threshold": "0.5", "ARI": (0.6, 0.62), "diff": (0.02, -0.01, 0.05),
           "better_worse": (50, 30), "Dice": (0.6, 0.61), "recall": (0.7, None), "AP": (19.6, 20.1),
           "structures": (3.0, 3.5), "truth_structures": 3.9}
    text = flip_tta.table([row], 82, 28)
    assert "82 held-out test slices" in text and "28 test patients" in text and "(the truth has 3.90)" in text
    assert ("| long_labelled student_r1 | 0.5 | 0.600 -> 0.620 | +0.020 | [-0.010, +0.050] | 50 / 30 "
            "| 0.600 -> 0.610 | - | 19.6 -> 20.1 | 3.00 -> 3.50 |") in text


def test_flip_tta_refuses_an_unfinished_run(tmp_path):
    from experiments.openkbp import flip_tta

    with pytest.raises(SystemExit, match="not a finished run .*--only long_labelled first"):
        flip_tta.main(["--runs", str(tmp_path), "--only", "long_labelled"])


def _hybrid_maps():
    """A Mask R-CNN map with two structures that cover part of the U-Net's foreground, and the U-Net's
    map: one structure under both Mask R-CNN ones plus a piece of its own."""
    import numpy as np

    inst = np.zeros((12, 12), np.uint8)
    inst[1:4, 1:4] = 1     # 9 px, inside the U-Net's structure 1
    inst[1:4, 6:9] = 2     # 9 px, its right part outside the U-Net foreground
    unet = np.zeros((12, 12), np.uint8)
    unet[1:5, 1:8] = 1     # covers instance 1 and the left part of instance 2, plus row 4
    unet[8:11, 1:4] = 2    # a structure the Mask R-CNN missed
    return inst, unet


def test_hybrid_fill_keeps_the_instances_and_adds_what_the_unet_saw_alone():
    import numpy as np

    from experiments.openkbp.hybrid import combine

    inst, unet = _hybrid_maps()
    out = combine(inst, unet, "fill", min_area=1)
    # the instances stay whole and apart; the missed structure is new; the U-Net leftover of its
    # structure 1 (row 4 and columns 4-5) becomes one more structure
    assert len({out[2, 2], out[2, 7], out[9, 2], out[4, 1]}) == 4 and 0 not in {out[2, 2], out[2, 7], out[9, 2]}
    assert (out[1:4, 6:9] == out[2, 7]).all() and (out[1:4, 1:4] == out[2, 2]).all()
    assert (out[8:11, 1:4] == out[9, 2]).all() and out[0].max() == 0
    assert out.dtype == np.uint8 and len(np.unique(out)) == 5


def test_hybrid_fill_trim_drops_instance_pixels_outside_the_unet_foreground():
    from experiments.openkbp.hybrid import combine

    inst, unet = _hybrid_maps()
    out = combine(inst, unet, "fill_trim", min_area=1)
    assert out[2, 8] == 0 and out[2, 7] > 0 and out[2, 6] == out[2, 7]   # column 8 is outside the U-Net
    assert (out[1:4, 1:4] == out[2, 2]).all()


def test_hybrid_grow_floods_the_connected_unet_foreground_from_the_instances():
    import numpy as np

    from experiments.openkbp.hybrid import combine

    inst, unet = _hybrid_maps()
    out = combine(inst, unet, "grow", min_area=1)
    # the U-Net's structure 1 is shared out between the two instances: no leftover structure
    assert set(np.unique(out[1:5, 1:8])) == {out[2, 2], out[2, 7]} and out[4, 1] == out[2, 2] and out[4, 7] == out[2, 7]
    assert (out[1:4, 6:9] == out[2, 7]).all()               # instance 2 keeps its pixels outside the U-Net
    assert out[9, 2] not in (0, out[2, 2], out[2, 7]) and len(np.unique(out)) == 4


def test_hybrid_drops_small_leftovers_and_checks_its_inputs():
    import numpy as np

    from experiments.openkbp.hybrid import combine

    inst, unet = _hybrid_maps()
    assert len(np.unique(combine(inst, unet, "fill", min_area=10))) == 2   # only the 13-pixel leftover is as large
    assert (combine(np.zeros_like(inst), unet, "grow", min_area=1) > 0).sum() == (unet > 0).sum()
    with pytest.raises(ValueError, match="rule 'vote'"):
        combine(inst, unet, "vote")
    with pytest.raises(ValueError, match="shapes"):
        combine(inst, unet[:5], "fill")


def test_hybrid_chooses_rule_and_threshold_on_validation_only():
    import numpy as np
    from pycocotools import mask as mask_utils

    from d2ct.postprocess.submission import PostprocessOptions
    from experiments.openkbp.hybrid import choose_on_validation

    inst, unet = _hybrid_maps()
    truth = np.where(unet > 0, unet, 0).astype(np.uint8)
    truth[1:4, 6:9] = 3
    rles = []
    for k in (1, 2):
        r = mask_utils.encode(np.asfortranarray((inst == k).astype(np.uint8)))
        r["counts"] = r["counts"].decode()
        rles.append(r)
    instances = {"a": (rles, np.array([0.9, 0.3]))}
    chosen = choose_on_validation(instances, ["a"], [truth], [unet], PostprocessOptions(min_area=1, fallback_top_k=0),
                                  [0.2, 0.5])
    assert set(chosen["scores"]) == {(r, t) for r in ("alone", "fill", "fill_trim", "grow") for t in (0.2, 0.5)}
    assert chosen["alone"] == ("alone", 0.2)   # at 0.5 instance 2 (score 0.3) is lost
    assert chosen["scores"][chosen["hybrid"]] == max(v for k, v in chosen["scores"].items() if k[0] != "alone")
    assert chosen["scores"][chosen["hybrid"]] > chosen["scores"][chosen["alone"]]


def test_hybrid_refuses_a_missing_unet(tmp_path):
    from experiments.openkbp import hybrid

    with pytest.raises(SystemExit, match="no U-Net checkpoint .*--only unet first"):
        hybrid.main(["--runs", str(tmp_path)])


# ------------------------------------------------------------------------------------------------
# the driver for real: two variants through the pipeline, sharing their radiologists
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_driver_end_to_end_two_variants_share_the_radiologists(tmp_path):
    from d2ct.data.phantom import write_phantom_dataset

    data = tmp_path / "phantom"
    write_phantom_dataset(data, n_train=14, n_labelled=6, n_test=3, size=96, seed=1, progress=False)
    (tmp_path / "tiny.yaml").write_text(
        "reference: labelled\n"
        "variants:\n"
        "  main: {sets: ['radiologists.*.threshold=0.0'], control: labelled}\n"
        "  labelled: {sets: ['radiologists.*.threshold=0.0', final.pseudo_labels=false]}\n")
    runs, out = tmp_path / "runs", tmp_path / "T.md"
    tiny = [f"data.root={data}", "data.phantom=null", "pseudolabel.min_area=1", "baseline.enabled=false",
            "opts=[" + ", ".join(f"'{o}'" for o in TINY_OPTS + ["TEST.EVAL_PERIOD", "2"]) + "]"]
    driver = [sys.executable, str(ROOT / "experiments/openkbp/run.py"), "--config", "configs/demo/pipeline.yaml",
              "--variants", str(tmp_path / "tiny.yaml"), "--runs", str(runs), "--radiologists", "r50",
              "--out", str(out), "--set", *tiny]

    def drive(*only):
        proc = subprocess.run([*driver, "--only", *only], cwd=ROOT, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    drive("main")
    weights = runs / "radiologists" / "r50" / "model_final.pth"
    trained = weights.stat().st_mtime_ns
    assert not (runs / "main_r50" / "radiologists").exists()  # trained in the shared folder
    log = drive("labelled")
    assert weights.stat().st_mtime_ns == trained  # reused, not trained again
    assert f"{weights.parent}: already trained with these settings" in log
    assert not (runs / "labelled_r50" / "logs" / "r50.log").exists()  # no training log of its own
    text = out.read_text()
    assert "| main | r50 |" in text and "| main | student_r1 |" in text and "| labelled | student_r1 |" in text
    section = text.split("## Paired differences on the test slices\n", 1)[1].split("\n## ")[0]
    assert "`labelled student_r1` (the labelled-only control) on the same 3 slices" in section
    assert "3 test slices" in section and "| main | student_r1 |" in section
    assert "| labelled | student_r1 |" not in section
    # run again: the pipeline skips every finished stage of both runs
    log = drive("main", "labelled")
    assert log.count("stage report       done (skipped)") == 2


def _pipeline_yaml_files():
    """Every committed pipeline config: the product's (configs/) and the lab's (experiments/)."""
    import yaml

    files = sorted(ROOT.glob("configs/**/*.yaml")) + sorted(ROOT.glob("experiments/**/*.yaml"))
    return [f for f in files if isinstance(yaml.safe_load(f.read_text()), dict)
            and "radiologists" in yaml.safe_load(f.read_text())]


@pytest.mark.parametrize("path", _pipeline_yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_pipeline_config_loads(path):
    """A renamed key (final.threshold -> final.teach_threshold) must not leave a prepared run broken."""
    cfg = load_pipeline_config(str(path))
    for entry in cfg["radiologists"] + [cfg["final"]]:
        if entry.get("config"):
            assert (ROOT / entry["config"]).is_file(), f"{path}: {entry['config']} does not exist"


def test_phantom_variants_are_valid_demo_pipeline_configs(tmp_path):
    """experiments/phantom/variants.yaml on configs/demo/pipeline.yaml: every run valid, each pair's
    control has the same start, student config and augmentation, labelled slices only."""
    spec = run.load_variants(ROOT / "experiments" / "phantom" / "variants.yaml")
    exp = run.Experiment(runs=tmp_path / "runs", config="configs/demo/pipeline.yaml", spec=spec,
                         predict_threshold="val", extra=["radiologists_dir=output/demo/radiologists"])
    _train_named_models(exp)
    configs = {v: exp.pipeline_config(v) for v in exp.variants}
    # the strong teachers: the two 1,690-iteration labelled-only students, fused
    strong = configs["strong_ensemble_noisy"]
    assert [r["dir"] for r in strong["radiologists"]] == [
        str(tmp_path / "runs" / v / "student_r1") for v in ("warm_labelled_1690", "warm_labelled_1690_seed7")]
    assert strong["pseudolabel"]["mode"] == "ensemble" and {r["threshold"] for r in strong["radiologists"]} == {0.6}
    assert exp.taught_by()["warm_labelled_1690"] == ["strong_ensemble_noisy", "strong_labelled",
                                                     "strong_ensemble_noisy_seed7", "strong_labelled_seed7",
                                                     "strong_ensemble_noisy_posonly",
                                                     "strong_ensemble_noisy_posonly_seed7",
                                                     "strong_ensemble_noisier", "strong_labelled_noisier",
                                                     "strong_ensemble_noisier_seed7",
                                                     "strong_labelled_noisier_seed7",
                                                     "strong_ensemble_noisier_seed11",
                                                     "strong_labelled_noisier_seed11",
                                                     "strong_ensemble_noisy_seed11", "strong_labelled_seed11"]
    # model noise: the student and its control carry the same, the paper's rates
    noisier = configs["strong_ensemble_noisier"]["final"]["opts"]
    assert noisier[-4:] == ["D2CT.MODEL_NOISE.DROP_PATH", 0.2, "D2CT.MODEL_NOISE.BOX_HEAD_DROPOUT", 0.5]
    assert exp.variants["strong_ensemble_noisier"]["also_against"] == ["strong_ensemble_noisy"]
    assert configs["strong_ensemble_noisy_posonly"]["final"]["opts"][:2] == ["D2CT.PSEUDO_NEGATIVES", "ignore"]
    assert spec["reference"] in configs and spec["title"].startswith("Students and their equal-compute controls")
    for variant, v in exp.variants.items():
        cfg = configs[variant]
        assert cfg["radiologists_dir"] == "output/demo/radiologists" and cfg["predict"]["score_threshold"] == "val"
        if v["control"]:
            control = configs[v["control"]]
            online = "D2CT.MEAN_TEACHER.ENABLED" in cfg["final"]["opts"]  # pool labelled during training
            assert control["final"]["pseudo_labels"] is False and cfg["final"]["pseudo_labels"] is (not online)
            assert control["final"]["init"] == cfg["final"]["init"] and control["final"]["config"] == cfg["final"]["config"]
            assert _seed(cfg) == _seed(control), variant
            noise = [(o, cfg["final"]["opts"][i + 1]) for i, o in enumerate(cfg["final"]["opts"]) if "MODEL_NOISE" in str(o)]
            assert noise == [(o, control["final"]["opts"][i + 1]) for i, o in enumerate(control["final"]["opts"])
                             if "MODEL_NOISE" in str(o)], variant
            if online:  # the strong policy makes the pool's strong views; labelled slices get the control's
                assert "all" not in cfg["final"]["opts"] and "D2CT.AUGMENT.STUDENT.ENABLED" not in control["final"]["opts"]
            else:
                assert ("D2CT.AUGMENT.STUDENT.ENABLED" in cfg["final"]["opts"]) == (
                    "D2CT.AUGMENT.STUDENT.ENABLED" in control["final"]["opts"]), variant


def test_prepare_holdout_leaves_the_phantom_to_the_pipeline(tmp_path, monkeypatch):
    spec = run.load_variants(ROOT / "experiments" / "phantom" / "variants.yaml")
    exp = run.Experiment(runs=tmp_path, config="configs/demo/pipeline.yaml", spec=spec,
                         extra=[f"data.root={tmp_path / 'phantom'}"])
    monkeypatch.setattr(run.subprocess, "run", lambda *a, **k: pytest.fail(f"make_holdout called: {a}"))
    run.prepare_holdout(exp, tmp_path / "no-openkbp-here")
    assert not (tmp_path / "phantom").exists()


# --- experiments/abdomen: the same driver on the challenge's own domain (two folds of one patient)

def _abdomen_experiment(tmp_path: Path, fold: str) -> run.Experiment:
    spec = run.load_variants(ROOT / "experiments" / "abdomen" / "variants.yaml")
    return run.Experiment(runs=tmp_path / fold, config="experiments/abdomen/pipeline_abdomen.yaml", spec=spec,
                          predict_threshold="val", extra=[f"data.root=datasets/abdomen_holdout_{fold}"])


def test_abdomen_variants_are_an_equal_compute_pair_on_two_folds(tmp_path):
    """The student and its labelled-only control share start, config and schedule; the two
    radiologists share a schedule and differ only in their starting weights; each fold has its own
    hold-out recipe (one patient each)."""
    recipes = []
    for fold in ("test01", "test07"):
        exp = _abdomen_experiment(tmp_path, fold)
        assert [(v, exp.variants[v]["control"]) for v in exp.variants if exp.variants[v]["control"]] == [
            ("ensemble_student", "labelled"), ("ensemble_student_seed7", "labelled_seed7"),
            ("ensemble_student_seed11", "labelled_seed11")]
        for name, seed in (("ensemble_student", None), ("ensemble_student_seed7", [7]), ("ensemble_student_seed11", [11])):
            student, control = (exp.pipeline_config(v) for v in (name, exp.variants[name]["control"]))
            assert student["data"]["root"] == control["data"]["root"] == f"datasets/abdomen_holdout_{fold}"
            assert student["pseudolabel"]["mode"] == "ensemble" and control["final"]["pseudo_labels"] is False
            assert student["final"]["init"] == control["final"]["init"] == "best"
            assert student["final"]["config"] == control["final"]["config"]
            opts = [dict(zip(c["final"]["opts"][::2], c["final"]["opts"][1::2])) for c in (student, control)]
            assert opts[0] == {**opts[1], "D2CT.AUGMENT.STUDENT.ENABLED": True} and opts[1]["SOLVER.MAX_ITER"] == 300
            assert _seed(student) == _seed(control) == seed
        scratch, ct = control["radiologists"]
        assert ct["opts"][:2] == ["MODEL.WEIGHTS", "datasets/ct_pretrained/openkbp_r50.pth"]
        assert ct["opts"][2:] == scratch["opts"] and ct["config"] == scratch["config"]
        recipes.append(run.holdout_options(exp, student["data"]["root"]))
    assert recipes[0] != recipes[1] and {r["test_fraction"] for r in recipes} == {0.5}
    assert run.holdout_options(exp, "datasets/elsewhere") == run.HOLDOUT_DEFAULT


def test_prepare_holdout_follows_the_variants_holdouts(tmp_path, monkeypatch):
    exp = _abdomen_experiment(tmp_path, "test07")
    exp.extra = [f"data.root={tmp_path / 'fold'}"]
    exp.spec = {**exp.spec, "holdouts": {str(tmp_path / "fold"): {"test_fraction": 0.5, "group_by": "patient", "seed": 3}}}
    seen = []
    monkeypatch.setattr(run.subprocess, "run", lambda cmd, **kw: seen.append(cmd))
    run.prepare_holdout(exp, tmp_path / "source")
    [cmd] = seen
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "fold") and cmd[cmd.index("--seed") + 1] == "3"
    assert cmd[cmd.index("--test-fraction") + 1] == "0.5" and cmd[cmd.index("--data") + 1] == str(tmp_path / "source")
    (tmp_path / "fold").mkdir()  # made: not made again
    run.prepare_holdout(exp, tmp_path / "source")
    (tmp_path / "fold" / "holdout.json").write_text(json.dumps({"test_fraction": 0.5, "group_by": "patient", "seed": 3}))
    run.prepare_holdout(exp, tmp_path / "source")
    assert len(seen) == 1
    # a folder made with another recipe is an error naming its record and the option that differs
    (tmp_path / "fold" / "holdout.json").write_text(json.dumps({"test_fraction": 0.5, "group_by": "patient", "seed": 0}))
    with pytest.raises(SystemExit, match=r"fold/holdout.json: .*seed: 0 there, 3 asked"):
        run.prepare_holdout(exp, tmp_path / "source")


def _per_image(path: Path, ari: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["name,ARI,ARI_fg,Dice,Dice_all,Recall50,Precision50,n_true,n_pred,tp50"]
    rows += [f"{k},{v},{v / 2},0.5,0.5,0.5,0.25,4,4,2" for k, v in ari.items()]
    path.write_text("\n".join(rows) + "\n")


def test_abdomen_folds_table_pools_the_folds_and_pairs_the_models(tmp_path):
    from experiments.abdomen import folds

    spec = run.load_variants(ROOT / "experiments" / "abdomen" / "variants.yaml")
    scores = {  # fold -> model -> slice -> all-pixel ARI
        "test01": {"baseline": [0.1, 0.2], "r50": [0.3, 0.3], "r50ct": [0.5, 0.4], "student_r1": [0.5, 0.5],
                   "ensemble_student": [0.6, 0.4], "unet": [0.7, 0.7]},
        "test07": {"baseline": [0.2, 0.2, 0.2], "r50": [0.2, 0.3, 0.4], "r50ct": [0.4, 0.5, 0.6],
                   "student_r1": [0.5, 0.6, 0.7], "ensemble_student": [0.6, 0.7, 0.5], "unet": [0.3, 0.3, 0.3]},
    }
    for fold, models in scores.items():
        runs = tmp_path / fold
        for m, v in models.items():
            ari = {f"{i}.png": x for i, x in enumerate(v)}
            where = {"student_r1": runs / "labelled" / "evaluate" / "student_r1",
                     "ensemble_student": runs / "ensemble_student" / "evaluate" / "student_r1",
                     "unet": runs / "unet" / "evaluate"}.get(m, runs / "labelled" / "evaluate" / m)
            _per_image(where / "per_image.csv", ari)
        (runs / "labelled" / "evaluate" / "table.json").write_text(json.dumps(
            [{"model": m} for m in ("baseline", "r50", "r50ct", "student_r1")]))
    text = folds.table([tmp_path / "test01", tmp_path / "test07"], spec, [("r50ct", "r50"), ("labelled", "unet")])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    # per-fold means, then the pooled means over the five slices
    assert rows["labelled (control)"].startswith("| labelled (control) | 0.500 | 0.600 | 0.560 | 0.280 |")
    assert rows["unet"].startswith("| unet | 0.700 | 0.300 | 0.460 |")
    # the student minus its control: +0.1 -0.1 and +0.1 +0.1 -0.2: means 0 and 0, wins on 3 of 5 slices
    assert rows["ensemble_student - labelled"].endswith("| +0.000 | +0.000 | +0.000 [-0.120, +0.100] | 3 of 5 |")
    assert "| r50ct - r50 | +0.150 | +0.200 | +0.180 [" in text and "| 5 of 5 |" in rows["r50ct - r50"]
    assert "unet - labelled" in rows and "r50ct - labelled" in rows and "labelled - unet" not in rows


def test_abdomen_folds_refuse_an_unfinished_fold(tmp_path):
    from experiments.abdomen import folds

    spec = run.load_variants(ROOT / "experiments" / "abdomen" / "variants.yaml")
    with pytest.raises(SystemExit, match="reference run 'labelled' is not finished"):
        folds.table([tmp_path / "test01"], spec, [])


def test_phantom_seeds_pool_the_per_slice_differences_over_seeds(tmp_path):
    from experiments.phantom import seeds

    scores = {  # run -> slice ARIs (three slices)
        "s": [0.5, 0.6, 0.7], "c": [0.4, 0.6, 0.9],  # seed 42: +0.1, 0, -0.2 (mean -0.033)
        "s_seed7": [0.6, 0.6, 0.6], "c_seed7": [0.3, 0.5, 0.5],  # seed 7: +0.3, +0.1, +0.1 (mean +0.167)
    }
    for run_name, v in scores.items():
        _per_image(tmp_path / run_name / "evaluate" / "student_r1" / "per_image.csv",
                   {f"{i}.png": x for i, x in enumerate(v)})
    text = seeds.table(tmp_path, [("s", "c")], ["", "_seed7"])
    row = next(line for line in text.splitlines() if line.startswith("| s - c |"))
    # averaged over the seeds per slice: +0.2, +0.05, -0.05: mean +0.067, first wins on 2 of 3
    assert row.startswith("| s - c | -0.033 | +0.167 | +0.067 [") and row.endswith("| 2 of 3 |")
    assert "| pair | seed 42 | seed 7 |" in text
    with pytest.raises(SystemExit, match="s_seed11"):
        seeds.table(tmp_path, [("s", "c")], ["", "_seed11"])


def test_pseudo_label_quality_rows_name_their_teachers():
    """Two runs with different teacher sets must not share an "ensemble of 2" row in the tables."""
    from experiments.openkbp.tables import rule_of_teachers

    assert rule_of_teachers("ensemble of 2 >= 0.6", ["a", "b"]) == "ensemble of a+b >= 0.6"
    assert rule_of_teachers("consensus of 3 (2 agree, or one >= 0.9)", ["r50", "r101", "x101"]) == \
        "consensus of r50+r101+x101 (2 agree, or one >= 0.9)"
    assert rule_of_teachers("a >= 0.5", ["a", "b"]) == "a >= 0.5"  # one radiologist: already named


def test_f1_of_precision_and_recall():
    from experiments.openkbp.tables import f1_score

    assert f1_score(0.6, 0.4) == pytest.approx(0.48) and f1_score(0.0, 0.0) == 0.0 and f1_score(None, 0.5) is None
