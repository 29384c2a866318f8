#!/usr/bin/env python
"""The real-data experiments of the README: the whole method on OpenKBP, and its variants.

Runs tools/run_pipeline.py for each variant in turn (each resumable: run this again after a kill
and finished stages are skipped), then writes bench/OPENKBP.md with one score table over all
variants and each run's training table. Variants share the trained radiologists of the main run
(``radiologists_dir``); a two-round variant starts from a copy of its one-round run (``rounds2``: ``main``;
``warmstart_rounds2``: ``warmstart``).

  python bench/openkbp_experiments.py                         # CPU configs, every variant
  python bench/openkbp_experiments.py --only main consensus   # a subset, in this order
  python bench/openkbp_experiments.py --table-only            # rebuild bench/OPENKBP.md from what has run
  python bench/openkbp_experiments.py --radiologists r50 r101 --only warmstart_labelled warmstart_ignore
      # two of the three teachers (a smaller CPU budget); run folders get the suffix _r50+r101
  python bench/openkbp_experiments.py --predict-threshold val --out bench/OPENKBP_val_threshold.md
      # each model's score threshold chosen on the validation split (flattened again, nothing retrained);
      # without the option the runs are flattened at the config's 0.5 again

Variants: ``main`` (partition, 1 round, pseudo-label threshold 0.7: the published method),
``consensus`` (every radiologist labels the whole pool; structures kept where two agree),
``rounds2`` (the round-1 final model pseudo-labels the pool again and a second final model trains),
``thr05`` (partition with pseudo-label threshold 0.5: more, noisier labels), ``warmstart`` (the
final model starts from the best radiologist's weights and trains 600 iterations on labelled +
pseudo-labelled slices) and ``warmstart_labelled`` (its control: the same start and schedule on the
labelled slices alone, which shows what the pseudo-labels add beyond the extra iterations),
``warmstart_repeat3`` (the warm start with the labelled split listed three times, so the human
labels weigh as much as the pseudo-labels), ``warmstart_thr09`` (the warm start on pseudo-labels
kept above score 0.9 only: fewer, cleaner labels), ``warmstart_ignore`` (the warm start with the
teachers' uncertain instances, scored 0.3-0.7, as ignore regions instead of background) and
``warmstart_consensus`` (the warm start on consensus pseudo-labels) and ``warmstart_rounds2`` (the
round-1 warm-started final model pseudo-labels the pool again; a second final model starts from it),
``warmstart_thr09_ignore`` (structures at 0.9 and above, 0.3-0.9 as ignore regions),
``warmstart_thr095`` (threshold 0.95), ``warmstart_thr09_repeat3`` (threshold 0.9 with the labelled
split listed three times), and runs with twice the final budget (1,200 iterations,
``configs/cpu/final_warmstart_long.yaml``): ``long_labelled`` (the control), ``long_thr09``,
``long_consensus`` and ``long_labelled_seed7`` (the control with another training seed: how far two
runs of one recipe land apart). ``strong_teacher`` and ``strong_teacher_labelled``: ``long_labelled``'s
final model is the only radiologist (a stronger teacher); a student starts from it and trains 600
iterations with its pseudo-labels, a control the same on the labelled slices alone;
``strong_teacher_seed7`` and ``strong_teacher_labelled_seed7`` repeat both with another training seed.
``second_generation`` and ``second_generation_labelled``: the same with ``strong_teacher``'s final
model (the student) as the teacher.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2ct.utils.fileio import atomic_write_text, read_json  # noqa: E402

SOURCE = Path("/work/shared/data/openkbp_fewshot")


def taught_by(name: str, teacher: str) -> list[str]:
    """Settings of a run whose only radiologist (called ``name``, threshold 0.8) is the final model of
    the run ``teacher``; its final model starts from that teacher and trains 600 iterations."""
    return [f"radiologists=[{{name: {name}, dir: @{teacher}/final, threshold: 0.8}}]",
            "final.config=configs/cpu/final_warmstart.yaml", "final.init=best"]


STRONG_TEACHER = "r50_2400"  # the R50 radiologist's 1,200 iterations and long_labelled's 1,200
STRONG_TEACHER_RUN = taught_by(STRONG_TEACHER, "long_labelled")
SECOND_GENERATION = "student_3000"  # strong_teacher's final model: 600 more iterations with pseudo-labels
SECOND_GENERATION_RUN = taught_by(SECOND_GENERATION, "strong_teacher")
# "@<variant>" in a setting stands for that variant's run folder
VARIANTS = {
    "main": [],
    "consensus": ["pseudolabel.mode=consensus"],
    "rounds2": ["pseudolabel.rounds=2"],
    "thr05": ["radiologists.*.threshold=0.5"],
    "warmstart": ["final.config=configs/cpu/final_warmstart.yaml", "final.init=best"],
    "warmstart_labelled": ["final.config=configs/cpu/final_warmstart.yaml", "final.init=best",
                           "final.pseudo_labels=false"],
    "warmstart_repeat3": ["final.config=configs/cpu/final_warmstart.yaml", "final.init=best",
                          "final.labelled_repeat=3"],
    "warmstart_thr09": ["final.config=configs/cpu/final_warmstart.yaml", "final.init=best",
                        "radiologists.*.threshold=0.9"],
    "warmstart_ignore": ["final.config=configs/cpu/final_warmstart.yaml", "final.init=best",
                         "pseudolabel.ignore_below=0.3"],
    "warmstart_consensus": ["final.config=configs/cpu/final_warmstart.yaml", "final.init=best",
                            "pseudolabel.mode=consensus"],
    "warmstart_rounds2": ["final.config=configs/cpu/final_warmstart.yaml", "final.init=best",
                          "pseudolabel.rounds=2"],
    "warmstart_thr09_ignore": ["final.config=configs/cpu/final_warmstart.yaml", "final.init=best",
                               "radiologists.*.threshold=0.9", "pseudolabel.ignore_below=0.3"],
    "warmstart_thr095": ["final.config=configs/cpu/final_warmstart.yaml", "final.init=best",
                         "radiologists.*.threshold=0.95"],
    "warmstart_thr09_repeat3": ["final.config=configs/cpu/final_warmstart.yaml", "final.init=best",
                                "radiologists.*.threshold=0.9", "final.labelled_repeat=3"],
    # twice the final budget (1,200 iterations): does the control start to overfit the few labelled
    # slices while the pseudo-labelled model keeps improving?
    "long_labelled": ["final.config=configs/cpu/final_warmstart_long.yaml", "final.init=best",
                      "final.pseudo_labels=false"],
    "long_thr09": ["final.config=configs/cpu/final_warmstart_long.yaml", "final.init=best",
                   "radiologists.*.threshold=0.9"],
    "long_consensus": ["final.config=configs/cpu/final_warmstart_long.yaml", "final.init=best",
                       "pseudolabel.mode=consensus"],
    # the control again with another training seed (data order and augmentation): how far two runs of
    # the same recipe land apart, the yardstick for every difference between variants above
    "long_labelled_seed7": ["final.config=configs/cpu/final_warmstart_long.yaml", "final.init=best",
                            "final.pseudo_labels=false", "final.opts=[SEED, 7]"],
    # a stronger teacher: long_labelled's final model (the R50 radiologist trained 1,200 more
    # iterations on the labelled slices; better pseudo-labels on the validation slices than any
    # radiologist) is the only radiologist, at threshold 0.8 (precision 0.75 / recall 0.67 on the
    # validation slices: the pseudo-label quality section). The student
    # starts from it and trains 600 iterations; its control does the same on the labelled slices alone.
    "strong_teacher": STRONG_TEACHER_RUN,
    "strong_teacher_labelled": [*STRONG_TEACHER_RUN, "final.pseudo_labels=false"],
    # the same student and control with another training seed: is the student's lead over its
    # control larger than two runs of one recipe land apart?
    "strong_teacher_seed7": [*STRONG_TEACHER_RUN, "final.opts=[SEED, 7]"],
    "strong_teacher_labelled_seed7": [*STRONG_TEACHER_RUN, "final.pseudo_labels=false", "final.opts=[SEED, 7]"],
    # a second generation: the student above teaches in its turn (same threshold, same schedule); its
    # control starts from it too and trains on the labelled slices alone. Does a student pass its teacher?
    "second_generation": SECOND_GENERATION_RUN,
    "second_generation_labelled": [*SECOND_GENERATION_RUN, "final.pseudo_labels=false"],
}


def own_teachers(variant: str) -> bool:
    """Whether a variant names its own teachers (a radiologists= setting) instead of the config's."""
    return any(item.startswith("radiologists=") for item in VARIANTS[variant])


# two-round variants: their first round is this variant's, copied when it has finished
ROUND1_OF = {"rounds2": "main", "warmstart_rounds2": "warmstart"}
# groups of variants whose round-1 pseudo-labels are the same (same models, thresholds, mode and
# seed): the first one to finish them shares its folder with the others instead of labelling the pool again
SAME_PSEUDOLABELS = (("main", "warmstart", "warmstart_labelled", "warmstart_repeat3", "long_labelled",
                      "long_labelled_seed7"),
                     ("warmstart_thr09", "warmstart_thr09_repeat3", "long_thr09"),
                     ("consensus", "warmstart_consensus", "long_consensus"),
                     ("strong_teacher", "strong_teacher_labelled", "strong_teacher_seed7",
                      "strong_teacher_labelled_seed7"),
                     ("second_generation", "second_generation_labelled"))
COLUMNS = [("ARI", "ARI (all pixels)"), ("ARI_fg", "ARI (truth fg)"), ("Dice", "Dice"),
           ("Recall50", "recall@0.5"), ("AP", "mask AP"), ("AP50", "AP50"), ("Precision50", "precision@0.5"),
           ("n_pred", "instances"), ("fg_px", "foreground px / slice"), ("threshold", "score threshold")]


def run_dir(base: Path, variant: str, tag: str = "") -> Path:
    """A variant's output folder; ``tag`` names a teacher subset (``_r50+r101``)."""
    return base.parent / f"{base.name}{tag}" if variant == "main" else base.parent / f"{base.name}{tag}_{variant}"


def radiologists(args) -> list[dict]:
    """The pipeline config's radiologists, or the subset named by --radiologists (in config order)."""
    import yaml

    config = yaml.safe_load(Path(ROOT / args.config).read_text())["radiologists"]
    wanted = getattr(args, "radiologists", None)
    if not wanted:
        return config
    unknown = sorted(set(wanted) - {r["name"] for r in config})
    if unknown:
        raise SystemExit(f"--radiologists: {', '.join(unknown)} not in {args.config} "
                         f"({', '.join(r['name'] for r in config)})")
    return [r for r in config if r["name"] in wanted]


def teacher_tag(args) -> str:
    return "_" + "+".join(r["name"] for r in radiologists(args)) if getattr(args, "radiologists", None) else ""


def _copy_radiologist_predictions(args, base: Path, out: Path, tag: str) -> None:
    """Every variant scores the same radiologists (the main run's) on the same test (and validation)
    slices: take their saved instances from a run that has them instead of predicting again (the
    pipeline flattens label maps from instances at the run's own threshold)."""
    names = [r["name"] for r in radiologists(args)]
    files = [f"{folder}{n}_instances.json" for folder in ("", "val/") for n in names]
    # the same radiologists in runs with all teachers or this subset: this subset's runs first
    others = [run_dir(base, v, t) for t in dict.fromkeys((tag, "")) for v in VARIANTS]
    for f in files:
        if (out / "predict" / f).exists():
            continue
        for other in others:
            done = other / "predict" / f
            if other != out and (other / "stages" / "predict.json").exists() and done.exists():
                print(f"[openkbp] {out.name}: predict/{f} is {other.name}'s: copying it", flush=True)
                (out / "predict" / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(done, out / "predict" / f)
                break


def _copy_pool_predictions(base: Path, out: Path, tag: str) -> None:
    """The radiologists' raw predictions on the pool (pseudolabels/cache/<model>.json) do not depend
    on the variant: every variant with these teachers starts from the most complete cache of any
    other run (partition runs hold each model's group, consensus runs the whole pool); the
    pseudo-labelling tool predicts only what is missing and checks the settings they were made with."""
    best: dict[str, tuple[int, Path]] = {}
    for other in [run_dir(base, v, tag) for v in VARIANTS]:
        if other == out:
            continue
        for cache in sorted((other / "pseudolabels" / "cache").glob("*.json")):
            try:
                images = len(read_json(cache).get("images", []))
            except ValueError:
                continue
            if images > best.get(cache.name, (0, None))[0]:
                best[cache.name] = (images, cache)
    for name, (images, cache) in best.items():
        print(f"[openkbp] {out.name}: {images} pool predictions of {cache.stem} are {cache.parents[2].name}'s: "
              "copying them", flush=True)
        (out / "pseudolabels" / "cache").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache, out / "pseudolabels" / "cache" / name)


def pipeline_sets(args, variant: str) -> list[str]:
    """The run_pipeline.py --set items of one variant's run."""
    base = Path(args.output)
    tag = teacher_tag(args)
    out = run_dir(base, variant, tag)
    teachers = radiologists(args)
    sets = [f"output_dir={out}"]
    if tag:  # first: the variant's per-radiologist settings below apply to this subset
        sets.append("radiologists=" + json.dumps(teachers))
    for item in VARIANTS[variant]:  # radiologists.*.KEY=V: the same setting for every teacher
        for other in VARIANTS:  # "@long_labelled/final": that run's final model
            item = item.replace(f"@{other}/", f"{run_dir(base, other, tag)}/")
        if item.startswith("radiologists.*."):
            sets += [item.replace("*", str(i), 1) for i in range(len(teachers))]
        else:
            sets.append(item)
    if getattr(args, "predict_threshold", None) is not None:
        sets.append(f"predict.score_threshold={args.predict_threshold}")
    if out != base:  # the main run's radiologists, trained once
        sets.append(f"radiologists_dir={base / 'radiologists'}")
    return sets


def run_variant(args, variant: str) -> None:
    base = Path(args.output)
    tag = teacher_tag(args)
    out = run_dir(base, variant, tag)
    sets = pipeline_sets(args, variant)
    round1 = run_dir(base, ROUND1_OF[variant], tag) if variant in ROUND1_OF else None
    if round1 is not None and (round1 / "final" / "model_final.pth").exists():
        for folder in ("pseudolabels", "final"):  # round 1 has run already: copy it, do not redo it
            if not (out / folder).exists():
                print(f"[openkbp] {variant}: round 1 is {round1.name}'s: copying {round1 / folder}", flush=True)
                # its periodic checkpoints are not needed: round 2 starts from model_best/model_final
                shutil.copytree(round1 / folder, out / folder, ignore=shutil.ignore_patterns("model_0*.pth"))
    same = next((group for group in SAME_PSEUDOLABELS if variant in group), ())
    if same and not (out / "pseudolabels" / "stats.json").exists():
        for other in same:
            done = run_dir(base, other, tag) / "pseudolabels"
            if other != variant and (done / "stats.json").exists() and (done / "pseudo_labels.json").exists():
                print(f"[openkbp] {variant}: pseudo-labels are {other}'s: copying {done}", flush=True)
                shutil.rmtree(out / "pseudolabels", ignore_errors=True)  # a partial one of a killed run
                shutil.copytree(done, out / "pseudolabels")
                break
    if not own_teachers(variant):  # the config's radiologists: their predictions are made already
        if not (out / "pseudolabels").exists():
            _copy_pool_predictions(base, out, tag)
        _copy_radiologist_predictions(args, base, out, tag)
    cmd = [sys.executable, str(ROOT / "tools/run_pipeline.py"), "--config", args.config, "--set", *sets]
    print(f"[openkbp] {variant}: $ {' '.join(cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"[openkbp] {variant}: done in {(time.time() - start) / 3600:.2f} h", flush=True)


def _fmt(v, percent: bool = False) -> str:
    if isinstance(v, int):
        return str(v)
    return "-" if v is None else f"{v:.1f}" if percent else f"{v:.3f}"


def foreground_pixels(label_csv: Path) -> float | None:
    """Mean number of labelled (non-zero) pixels per slice of a challenge-layout label CSV: how much
    of each slice a model calls structure, next to the truth's."""
    if not label_csv.exists():
        return None
    import pandas as pd

    frame = pd.read_csv(label_csv, index_col=0)
    return round(float((frame.to_numpy() > 0).sum(0).mean()), 1)


VAL_COLUMNS = [("segm/AP", "mask AP", 1), ("segm/AP50", "AP50", 1), ("ct/ARI", "ARI", 3),
               ("ct/ARI_fg", "ARI (truth fg)", 3), ("ct/Dice", "Dice", 3), ("ct/Recall50", "recall@0.5", 3)]


def validation_table(model_dir: Path, label: str | None = None) -> list[str]:
    """Every validation evaluation of one training run (metrics.json), with its speed and time (log.txt)."""
    metrics = model_dir / "metrics.json"
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().startswith("{")]
    evals = [r for r in rows if "segm/AP" in r]
    import yaml

    from d2ct.engine.checkpoint import iterations_trained

    max_iter = int(yaml.safe_load((model_dir / "config.yaml").read_text())["SOLVER"]["MAX_ITER"])
    speed = ""
    log = model_dir / "log.txt"
    if log.exists():
        for line in log.read_text().splitlines():
            if "Overall training speed:" in line or "Total training time:" in line:
                speed += " " + line.split("INFO: ", 1)[-1].strip() + "."
    out = [f"`{label or model_dir.name}`:{speed}", "",
           "| iterations | " + " | ".join(t for _, t, _ in VAL_COLUMNS) + " |", "|---|" + "---|" * len(VAL_COLUMNS)]
    for r in evals:
        out.append(f"| {iterations_trained(r['iteration'], max_iter)} | " + " | ".join(f"{r[k]:.{d}f}" if k in r else "-" for k, _, d in VAL_COLUMNS) + " |")
    return out + [""]


def _holdout(args) -> Path:
    """The held-out data set folder (manifest.csv, test-labels.csv.gz): --holdout or its default."""
    return Path(getattr(args, "holdout", ROOT / "datasets/openkbp_holdout"))


def test_patients(args) -> dict[str, str]:
    """Held-out test slice -> its patient (the holdout's manifest.csv); empty before the holdout exists."""
    import csv

    manifest = _holdout(args) / "manifest.csv"
    if not manifest.exists():
        return {}
    with open(manifest, newline="") as fh:
        return {row["file"]: row["patient"] for row in csv.DictReader(fh) if row.get("holdout") == "test"}


def patient_bootstrap(diff, patients, n: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-slice differences and its 95% interval, resampling whole patients: slices of one
    patient are not independent, so resampling slices would make the interval too narrow."""
    import numpy as np

    diff = np.asarray(diff, float)
    ids = sorted(set(patients))
    index = {pid: i for i, pid in enumerate(ids)}
    of = np.array([index[pid] for pid in patients])
    sums = np.bincount(of, weights=diff, minlength=len(ids))
    counts = np.bincount(of, minlength=len(ids))
    picks = np.random.default_rng(seed).integers(0, len(ids), size=(n, len(ids)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


# the labelled-only control of each schedule: a pseudo-labelled run is compared with the control
# that had the same start and number of iterations
CONTROLS = {"long_labelled": ("long_thr09", "long_consensus", "long_labelled_seed7"),
            "strong_teacher_labelled": ("strong_teacher",),
            "strong_teacher_labelled_seed7": ("strong_teacher_seed7",),
            "second_generation_labelled": ("second_generation",)}


def taught_runs() -> dict[str, tuple[str, ...]]:
    """teacher run -> the runs taught by its final model (a radiologist "dir: @<teacher>/final"), in
    VARIANTS order: each is compared with that teacher."""
    runs: dict[str, tuple[str, ...]] = {}
    for variant, settings in VARIANTS.items():
        for item in settings:
            found = re.match(r"radiologists=.*dir: @(\w+)/final", item)
            if found:
                runs[found[1]] = runs.get(found[1], ()) + (variant,)
    return runs


def paired_differences(args, reference: tuple[str, str] = ("warmstart_labelled", "final"),
                       variants: tuple[str, ...] | None = None, *, what: str = "the labelled-only control",
                       heading: str | None = None) -> list[str]:
    """Every model's per-slice ARI minus the reference model's (``what``: the labelled-only control
    by default), on the same test slices, with a patient-bootstrap 95% interval. ``variants``: only
    these runs' final models (default: every run, the radiologists included)."""
    import csv

    base, tag = Path(args.output), teacher_tag(args)

    def per_image(variant: str, model: str) -> dict[str, float] | None:
        f = run_dir(base, variant, tag) / "evaluate" / model / "per_image.csv"
        if not f.exists():
            return None
        with open(f, newline="") as fh:
            return {row["name"]: float(row["ARI"]) for row in csv.DictReader(fh)}

    ref, patient = per_image(*reference), test_patients(args)
    if ref is None or not patient:
        return []
    models: list[tuple[str, str]] = []
    for variant in variants or VARIANTS:
        out = run_dir(base, variant, tag)
        names = [r["name"] for r in radiologists(args)] if not models and variants is None else []
        models += [(variant, m) for m in names + sorted(d.name for d in (out / "evaluate").glob("final*") if d.is_dir())
                   if (variant, m) != reference and (out / "evaluate" / m / "per_image.csv").exists()]
    if not models:
        return []
    heading = heading or "## Paired differences on the test slices" + (f": against {reference[0]}" if variants else "")
    lines = [heading, "",
             f"Per-slice ARI (all pixels) minus that of `{reference[0]} {reference[1]}` ({what}) "
             f"on the same {len(ref)} slices; 95% interval from 10,000 bootstrap resamples of the "
             f"{len(set(patient.get(n) for n in ref))} test patients (seed 0). An interval that contains 0 is "
             "not a difference these slices can show.", "",
             "| run | model | mean difference | 95% interval | slices better / worse |", "|---|---|---|---|---|"]
    for variant, model in models:
        scores = per_image(variant, model)
        names = [n for n in ref if n in scores and n in patient]
        diff = [scores[n] - ref[n] for n in names]
        mean, low, high = patient_bootstrap(diff, [patient[n] for n in names])
        better, worse = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
        lines.append(f"| {variant} | {model} | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] | {better} / {worse} |")
    return lines + [""]


def against_best_radiologist(args) -> list[str]:
    """Every final model against the radiologist with the best validation mask AP (the issue's bar:
    the final model beats the best single radiologist), scored in the first run that evaluated it."""
    base, tag = Path(args.output), teacher_tag(args)
    names = [r["name"] for r in radiologists(args)]
    aps: dict[str, float] = {}
    for variant in VARIANTS:
        stats = run_dir(base, variant, tag) / "pseudolabels" / "stats.json"
        if stats.exists():
            aps = {r["name"]: r["ap"] for r in read_json(stats).get("radiologists", []) if r.get("ap") is not None}
        if aps:
            break
    best = max(names, key=lambda n: aps.get(n, float("-inf"))) if aps else names[0]
    scored = next((v for v in VARIANTS if (run_dir(base, v, tag) / "evaluate" / best / "per_image.csv").exists()), None)
    if scored is None:
        return []
    return paired_differences(args, (scored, best), tuple(VARIANTS), what="the best radiologist by validation mask AP",
                              heading=f"## Paired differences on the test slices: every final model against the {best} radiologist")


def pseudo_label_counts(args) -> list[str]:
    """What each run's pseudo-labelling kept of the pool (pseudolabels*/stats.json, every round)."""
    base, tag = Path(args.output), teacher_tag(args)
    rows = []
    for variant in VARIANTS:
        for stats in sorted(run_dir(base, variant, tag).glob("pseudolabels*/stats.json")):
            s = read_json(stats)
            rows.append(f"| {variant} | {stats.parent.name} | {s['mode']} | {s['labelled_images']} of {s['pool_images']} "
                        f"| {s['instances']} | {s['instances_per_image']:.2f} | {s.get('ignore_regions', 0)} |")
    if not rows:
        return []
    return ["## Pseudo-labels", "", "| run | folder | mode | pool slices kept | structures | per slice | ignore regions |",
            "|---|---|---|---|---|---|---|", *rows, ""]


QUALITY_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)


def pseudo_label_quality_section(args) -> list[str]:
    """The pseudo-labelling rules applied to the radiologists' saved instances on the validation
    slices, where the truth is known (d2ct.pseudolabel.quality): what each rule keeps, how much of
    it is real and how much real structure it misses. Needs a run that chose its thresholds on
    validation (it holds predict/val/<radiologist>_instances.json)."""
    from d2ct.pipeline.config import load_pipeline_config
    from d2ct.pipeline.report import pseudo_label_quality_rows
    from d2ct.pipeline.runner import Pipeline

    base, tag = Path(args.output), teacher_tag(args)
    rows, sources, val_names = [], [], []
    for variant in VARIANTS:  # every set of teachers once (the config's radiologists; a variant's own)
        out = run_dir(base, variant, tag)
        stats = out / "pseudolabels" / "stats.json"
        if not stats.exists():
            continue
        cfg = load_pipeline_config(args.config, pipeline_sets(args, variant))
        found = pseudo_label_quality_rows(Pipeline(cfg), read_json(stats), QUALITY_THRESHOLDS)
        if found is None:
            continue
        seen = {r["rule"] for r in rows}
        new = [r for r in found[1] if r["rule"] not in seen]
        if new:
            rows += new
            sources.append(f"`{out.name}`")
            val_names = found[0]
    if not rows:
        return []
    lines = ["## Pseudo-label quality on the validation split", "",
             f"The pseudo-labelling rules applied to the radiologists' instances on the {len(val_names)} "
             "validation slices, whose truth is known (`d2ct/pseudolabel/quality.py`; instances from "
             f"{', '.join(sources)}): slices kept (at least one structure), structures written, how many match a "
             "real one at IoU 0.5 (precision; a lower bound, as the contours are partial) and how many real "
             "structures of a kept slice they find (recall; the rest is taught as background). The "
             "validation split also chose each radiologist's best checkpoint, so these are a little optimistic.",
             "", "| rule | slices kept | structures per slice | truth per kept slice | precision@0.5 | recall@0.5 "
             "| ARI (kept slices) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rule']} | {r['kept']} of {r['slices']} | {r['per_slice']:.2f} | "
                     f"{r['truth_per_slice']:.2f} | {_fmt(r['precision50'])} | {_fmt(r['recall50'])} | {_fmt(r['ARI'])} |")
    return lines + [""]


def chosen_thresholds(args) -> list[str]:
    """Where a run chose its score thresholds on the validation split (predict/thresholds.json):
    the validation ARI at every threshold tried, so the reader sees how sharp the choice was."""
    base, tag = Path(args.output), teacher_tag(args)
    rows, grid, seen_teachers = [], None, False
    for variant in VARIANTS:
        path = run_dir(base, variant, tag) / "predict" / "thresholds.json"
        if not path.exists():
            continue
        chosen = {m: c for m, c in read_json(path).items() if c.get("chosen_on") == "val"}
        for model, c in chosen.items():
            if seen_teachers and not model.startswith("final"):
                continue  # the radiologists are the same in every run: shown once
            grid = grid or list(c["val_ARI"])
            rows.append(f"| {variant} | {model} | {c['threshold']:g} | "
                        + " | ".join(_fmt(c["val_ARI"].get(t)) for t in grid) + " |")
        seen_teachers = seen_teachers or bool(chosen)
    if not rows:
        return []
    return ["## Score thresholds chosen on the validation split", "",
            "Each model's label maps use the threshold with the best mean ARI (all pixels) on the validation "
            "slices (`predict.score_threshold: val`); its validation ARI at every threshold tried:", "",
            "| run | model | chosen | " + " | ".join(grid) + " |", "|---|---|---|" + "---|" * len(grid), *rows, ""]


def table(args) -> str:
    base = Path(args.output)
    lines = ["| run | model | " + " | ".join(t for _, t in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    details = []
    tag = teacher_tag(args)
    teachers_from = None  # baseline and radiologists are the same in every run: shown once
    finals = []
    for variant in VARIANTS:
        out = run_dir(base, variant, tag)
        table_json = out / "evaluate" / "table.json"
        if not table_json.exists():
            continue
        rows = read_json(table_json)
        for row in rows:
            if teachers_from is not None and not row["model"].startswith("final"):
                continue
            row = {**row, "fg_px": foreground_pixels(out / "predict" / f"{row['model']}.csv")}
            cells = [f"{row[k]:g}" if k == "threshold" and k in row else _fmt(row.get(k), k.startswith("AP") or k == "fg_px")
                     for k, _ in COLUMNS]
            lines.append(f"| {variant} | {row['model']} | " + " | ".join(cells) + " |")
        teachers_from = teachers_from or variant
        finals += [(variant, d) for d in sorted(out.glob("final*")) if d.is_dir()]
        report = out / "report" / "report.md"
        if report.exists():
            text = report.read_text()
            train = text.split("## Training", 1)[1].split("\n\n", 2)[1] if "## Training" in text else ""
            details += [f"### {variant}: training", "", train.strip(), ""]
        stages = sorted((out / "stages").glob("*.json"))
        hours = sum(read_json(p).get("seconds", 0) for p in stages) / 3600
        details += [f"{variant}: {len(stages)} stages finished, {hours:.2f} h of stage time "
                    f"(`{out / 'report' / 'report.md'}`)", ""]
    val = ["## Validation during training", "",
           "Each model on the validation patients (the split that picks its best checkpoint) at every "
           "evaluation; mask AP in %.", ""]
    names = [r["name"] for r in radiologists(args)]
    for label, model_dir in [(n, base / "radiologists" / n) for n in names] + [(f"{v} {d.name}", d) for v, d in finals]:
        val += validation_table(model_dir, label)
    if len(val) > 4:
        details += val
    summaries = [d / "data" / "summary.json" for d in [base] + [run_dir(base, v, tag) for v in VARIANTS]]
    summary = next((read_json(f) for f in summaries if f.exists()), {})
    head = [
        "# The method on real CT: OpenKBP few-shot (head and neck), CPU",
        "",
        "Written by `bench/openkbp_experiments.py` (command in the README).",
        f"Data: `{summary.get('root', '?')}`: splits " + ", ".join(
            f"{k} {v['images']}" for k, v in summary.get("splits", {}).items()) + "; scores on the held-out "
        "test patients.",
        f"Teachers: {', '.join(r['name'] for r in radiologists(args))}"
        + (" (a subset: `--radiologists`)" if tag else "") + ".",
        "",
    ]
    truth_fg = foreground_pixels(_holdout(args) / "test-labels.csv.gz")
    if truth_fg is not None:
        lines += ["", f"The truth has {truth_fg} foreground pixels per test slice (partial contours: at most 7 organs)."]
    paired = paired_differences(args)
    for control, variants in CONTROLS.items():
        paired += paired_differences(args, (control, "final"), variants)
    for teacher, variants in taught_runs().items():
        paired += paired_differences(args, (teacher, "final"), variants, what="their teacher",
                                     heading=f"## Paired differences on the test slices: against their teacher, {teacher} final")
    paired += against_best_radiologist(args)
    return "\n".join(head + lines + [""] + paired + chosen_thresholds(args) + pseudo_label_counts(args)
                     + pseudo_label_quality_section(args) + details)


def _threshold(text: str) -> str:
    if text != "val":
        try:
            if not 0 <= float(text) <= 1:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a score in [0, 1] or val, got {text!r}") from None
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--config", default="configs/cpu/pipeline_openkbp.yaml")
    p.add_argument("--output", default="output/cpu_pipeline", help="the main run's output_dir")
    p.add_argument("--source", type=Path, default=SOURCE, help="the OpenKBP few-shot folder")
    p.add_argument("--holdout", type=Path, default=ROOT / "datasets/openkbp_holdout")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="variants to run (default all)")
    p.add_argument("--radiologists", nargs="+", metavar="NAME",
                   help="train and use only these radiologists of the config (default all three); the run "
                        "folders get the suffix _<names> and the radiologists stay in <output>/radiologists")
    p.add_argument("--predict-threshold", type=_threshold, metavar="SCORE|val",
                   help="the score threshold that flattens every model's instances (default: the config's, "
                        "0.5); val: each model's own, chosen on the validation split. Only the predict, "
                        "evaluate and report stages run again (from saved instances)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "OPENKBP.md")
    args = p.parse_args(argv)
    text = None
    if not args.table_only:
        if not (args.holdout / "holdout.json").exists():
            subprocess.run([sys.executable, str(ROOT / "tools/make_holdout.py"), "--data", str(args.source),
                            "--out", str(args.holdout), "--test-fraction", "0.2", "--group-by", "patient",
                            "--seed", "0"], cwd=ROOT, check=True)
        for variant in args.only or list(VARIANTS):
            run_variant(args, variant)
            text = table(args)  # after each run: a long session keeps its tables so far
            atomic_write_text(args.out, text)
    # table() bootstraps every paired comparison: not again when the last run has just built it
    publish(args.out, text if text is not None else table(args))
    return 0


def publish(out: Path, text: str) -> None:
    """Write a bench table atomically, print it and where it went (the benches' common ending)."""
    atomic_write_text(out, text)
    print(text)
    print(json.dumps({"written": str(out)}))


if __name__ == "__main__":
    sys.exit(main())
