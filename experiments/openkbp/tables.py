"""The tables of the OpenKBP experiments, from the run folders of experiments/openkbp/run.py.

Everything is read from what the pipeline publishes in a run folder: ``evaluate/table.json`` and
``evaluate/<model>/per_image.csv`` (scores), ``predict/<model>.csv`` (label maps),
``predict/thresholds.json``, ``pseudolabels_r<k>/stats.json``, ``report/report.md``, the stage
markers, and each model's training folder (``metrics.json``, ``log.txt``) found through
:meth:`d2ct.pipeline.runner.Pipeline.models`; the models of a run are named as the pipeline names
them (the radiologists, then ``student_r1``, ``student_r2``, ...; the last student is the final model).

Sections: the score table (the baseline and radiologists once, from the first finished run, then
every run's students); per-slice paired differences with a 95% interval from a bootstrap over the
test patients: every model against the reference run's final model, each pseudo-labelled run
against its equal-compute control, each taught run against its teacher, every final model against
the best radiologist; the thresholds chosen on validation; what each round of pseudo-labelling
kept; the pseudo-labelling rules scored on the validation slices; each run's training table and
every model's validation curve.
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))

from d2ct.utils.fileio import atomic_write_text, read_json  # noqa: E402

COLUMNS = [("ARI", "ARI (all pixels)"), ("ARI_fg", "ARI (truth fg)"), ("Dice", "Dice"),
           ("Recall50", "recall@0.5"), ("AP", "mask AP"), ("AP50", "AP50"), ("Precision50", "precision@0.5"),
           ("n_pred", "instances"), ("fg_px", "foreground px / slice"), ("threshold", "score threshold")]
VAL_COLUMNS = [("segm/AP", "mask AP", 1), ("segm/AP50", "AP50", 1), ("ct/ARI", "ARI", 3),
               ("ct/ARI_fg", "ARI (truth fg)", 3), ("ct/Dice", "Dice", 3), ("ct/Recall50", "recall@0.5", 3)]
QUALITY_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _fmt(v, percent: bool = False) -> str:
    if isinstance(v, int):
        return str(v)
    return "-" if v is None else f"{v:.1f}" if percent else f"{v:.3f}"


def _cells(row: dict) -> list[str]:
    """One score-table row's cells, in COLUMNS order."""
    return [f"{row[k]:g}" if k == "threshold" and k in row else _fmt(row.get(k), k.startswith("AP") or k == "fg_px")
            for k, _ in COLUMNS]


def foreground_pixels(label_csv: Path) -> float | None:
    """Mean number of labelled (non-zero) pixels per slice of a challenge-layout label CSV."""
    if not label_csv.exists():
        return None
    import pandas as pd

    frame = pd.read_csv(label_csv, index_col=0)
    return round(float((frame.to_numpy() > 0).sum(0).mean()), 1)


def patient_bootstrap(diff, patients, n: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-slice differences and its 95% interval, resampling whole patients (the library's
    :func:`d2ct.evaluation.metrics.group_bootstrap`, which the pipeline report uses too)."""
    from d2ct.evaluation.metrics import group_bootstrap

    return group_bootstrap(diff, patients, n=n, seed=seed)


class Runs:
    """The finished run folders of an experiment (run.Experiment), in the variants file's order."""

    def __init__(self, exp):
        self.exp = exp
        self.done = [v for v in exp.variants if (exp.run_dir(v) / "evaluate" / "table.json").exists()]
        self.peers = [p for p in exp.peers if (exp.peer_dir(p) / "run.json").exists()]
        self._cfg: dict = {}

    def cfg(self, variant: str) -> dict:
        if variant not in self._cfg:
            self._cfg[variant] = self.exp.pipeline_config(variant)
        return self._cfg[variant]

    def pipeline(self, variant: str):
        from d2ct.pipeline.runner import Pipeline

        return Pipeline(self.cfg(variant))

    def students(self, variant: str) -> list[str]:
        return [f"student_r{k}" for k in range(1, int(self.cfg(variant)["pseudolabel"]["rounds"]) + 1)]

    def final(self, variant: str) -> str:
        return self.students(variant)[-1]

    def per_image(self, variant: str, model: str) -> dict[str, float] | None:
        """Per-slice ARI of a run's model, or of a peer (``variant`` and ``model`` both its name)."""
        if variant in self.exp.peers:
            f = self.exp.peer_dir(variant) / "evaluate" / "per_image.csv"
        else:
            f = self.exp.run_dir(variant) / "evaluate" / model / "per_image.csv"
        if not f.exists():
            return None
        with open(f, newline="") as fh:
            return {row["name"]: float(row["ARI"]) for row in csv.DictReader(fh)}

    def data_root(self) -> Path | None:
        return self.pipeline(self.done[0]).data_root if self.done else None

    def groups(self) -> tuple[dict[str, str], str]:
        """(test slice -> the group the bootstrap resamples, the groups' name): the pipeline
        report's own grouping (:func:`d2ct.pipeline.report.eval_groups`: the manifest's data.group_by
        column, patients, or each slice on its own, with a warning saying why)."""
        from d2ct.pipeline.report import eval_groups

        if not self.done:
            return {}, "slices"
        names = list(self.per_image(self.done[0], self.final(self.done[0])) or {})
        groups, unit = eval_groups(self.pipeline(self.done[0]), names)
        return dict(zip(names, groups)), unit


def paired_differences(runs: Runs, reference: tuple[str, str], models: list[tuple[str, str]], heading: str,
                       what: str) -> list[str]:
    """Each model's per-slice ARI minus the reference model's on the same test slices, with a
    95% interval from a bootstrap over the test groups (patients)."""
    ref = runs.per_image(*reference)
    group, unit = runs.groups()
    models = [m for m in models if m != reference and runs.per_image(*m) is not None]
    if ref is None or not group or not models:
        return []
    lines = [heading, "",
             f"Per-slice ARI (all pixels) minus that of `{reference[0]} {reference[1]}` ({what}) "
             f"on the same {len(ref)} slices; 95% interval from 10,000 bootstrap resamples of the "
             f"{len(set(group.get(n) for n in ref))} test {unit} (seed 0). An interval that contains 0 is "
             "not a difference these slices can show.", "",
             "| run | model | mean difference | 95% interval | slices better / worse |", "|---|---|---|---|---|"]
    for variant, model in models:
        scores = runs.per_image(variant, model)
        names = [n for n in ref if n in scores and n in group]
        diff = [scores[n] - ref[n] for n in names]
        mean, low, high = patient_bootstrap(diff, [group[n] for n in names])
        better, worse = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
        lines.append(f"| {variant} | {model} | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] | {better} / {worse} |")
    return lines + [""]


def paired_sections(runs: Runs) -> list[str]:
    exp, done = runs.exp, runs.done
    students = [(v, m) for v in done for m in runs.students(v)]
    out: list[str] = []
    reference = exp.spec.get("reference")
    if reference in done and done:
        first = done[0]
        teachers = [(first, name) for name, _ in runs.pipeline(first).models() if not name.startswith(("student_r", "control_r"))]
        out += paired_differences(runs, (reference, runs.final(reference)),
                                  teachers + students + [(p, p) for p in runs.peers],
                                  "## Paired differences on the test slices", "the labelled-only control")
    controls: dict[str, list[str]] = {}
    for variant in done:
        spec = exp.variants[variant]
        # the equal-compute control, then any other labelled-only run it is paired with (equal wall time)
        for control in [spec["control"], *spec["also_against"]]:
            if control and control != reference and control in done:
                controls.setdefault(control, []).append(variant)
    for control, variants in controls.items():
        # also_against may name a run that learns from the pool too (model noise on or off, say)
        from d2ct.pipeline.config import online_teacher

        cfg = runs.cfg(control)
        labelled_only = cfg["final"]["pseudo_labels"] is False and not online_teacher(cfg)
        out += paired_differences(runs, (control, runs.final(control)), [(v, runs.final(v)) for v in variants],
                                  f"## Paired differences on the test slices: against {control}",
                                  "the labelled-only control" if labelled_only else "a run that also learns from the pool")
    for teacher, variants in exp.taught_by().items():
        if teacher in done:
            model = runs.final(teacher)
            out += paired_differences(runs, (teacher, model), [(v, runs.final(v)) for v in variants if v in done],
                                      f"## Paired differences on the test slices: against their teacher, {teacher} {model}",
                                      "their teacher")
    for peer in runs.peers:  # the bar: the final models against the peer
        out += paired_differences(runs, (peer, peer), students,
                                  f"## Paired differences on the test slices: every final model against the {peer} peer",
                                  f"the {peer} peer, trained on the labelled slices alone")
    return out + against_best_radiologist(runs, students)


def against_best_radiologist(runs: Runs, students: list[tuple[str, str]]) -> list[str]:
    """Every student against the radiologist with the best validation mask AP (the issue's bar),
    scored in the first run that evaluated it."""
    aps: dict[str, float] = {}
    for variant in runs.done:  # the config's teachers: not a variant that names its own
        stats = runs.exp.run_dir(variant) / "pseudolabels_r1" / "stats.json"
        names = {r["name"] for r in runs.cfg(variant)["radiologists"] if "dir" not in r}
        if stats.exists() and names:
            aps = {r["name"]: r["ap"] for r in read_json(stats).get("radiologists", [])
                   if r.get("ap") is not None and r["name"] in names}
        if aps:
            break
    if not aps:
        return []
    best = max(aps, key=aps.get)
    scored = next((v for v in runs.done if runs.per_image(v, best) is not None), None)
    if scored is None:
        return []
    return paired_differences(runs, (scored, best), students,
                              f"## Paired differences on the test slices: every final model against the {best} radiologist",
                              "the best radiologist by validation mask AP")


def pseudo_label_counts(runs: Runs) -> list[str]:
    """What each run's pseudo-labelling kept of the pool (pseudolabels_r<k>/stats.json, every round)."""
    rows = []
    for variant in runs.done:
        if not runs.cfg(variant)["final"]["pseudo_labels"]:
            continue  # labelled-only or online: pool labels in its folder (made by older pipelines) went unread
        folders = sorted(runs.exp.run_dir(variant).glob("pseudolabels_r*/stats.json"), key=lambda p: int(p.parent.name[14:]))
        for stats in folders:
            s = read_json(stats)
            rows.append(f"| {variant} | {stats.parent.name} | {s['mode']} | {s['labelled_images']} of {s['pool_images']} "
                        f"| {s['instances']} | {s['instances_per_image']:.2f} | {s.get('ignore_regions', 0)} |")
    if not rows:
        return []
    return ["## Pseudo-labels", "", "| run | folder | mode | pool slices kept | structures | per slice | ignore regions |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def f1_score(precision, recall):
    """Harmonic mean of precision and recall; None when either is unknown, 0 when both are 0."""
    if precision is None or recall is None:
        return None
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def rule_of_teachers(rule: str, teachers: list[str]) -> str:
    """A pseudo-labelling rule's row name with its teachers named: "ensemble of 2 >= 0.6" becomes
    "ensemble of a+b >= 0.6", so two runs with different teacher sets do not share a row; a single
    radiologist's rule ("a >= 0.6") already names it."""
    if any(rule.startswith(f"{t} >=") for t in teachers):
        return rule
    return re.sub(r"\bof (\d+)\b", lambda m: f"of {'+'.join(teachers)}" if int(m.group(1)) == len(teachers) else m.group(0),
                  rule, count=1)


def pseudo_label_quality_section(runs: Runs) -> list[str]:
    """The pseudo-labelling rules applied to the radiologists' saved instances on the validation
    slices (d2ct.pipeline.report.pseudo_label_quality_rows): needs runs that chose their
    thresholds on validation (predict/val/<radiologist>_instances.json)."""
    from d2ct.pipeline.report import pseudo_label_quality_rows

    rows, sources, val_names = [], [], []
    for variant in runs.done:  # every set of teachers once
        stats = runs.exp.run_dir(variant) / "pseudolabels_r1" / "stats.json"
        if not stats.exists():
            continue
        found = pseudo_label_quality_rows(runs.pipeline(variant), read_json(stats), QUALITY_THRESHOLDS)
        if found is None:
            continue
        teachers = [r["name"] for r in runs.cfg(variant)["radiologists"]]
        found_rows = [{**r, "rule": rule_of_teachers(r["rule"], teachers)} for r in found[1]]
        seen = {r["rule"] for r in rows}
        new = [r for r in found_rows if r["rule"] not in seen]
        if new:
            rows += new
            sources.append(f"`{runs.exp.run_dir(variant).name}`")
            val_names = found[0]
    if not rows:
        return []
    lines = ["## Pseudo-label quality on the validation split", "",
             f"The pseudo-labelling rules applied to the radiologists' instances on the {len(val_names)} "
             "validation slices, whose truth is known (`d2ct/pseudolabel/quality.py`; instances from "
             f"{', '.join(sources)}): slices kept (at least one structure), structures written, how many match a "
             "real one at IoU 0.5 (precision; a lower bound, as the contours are partial) and how many real "
             "structures of a kept slice they find (recall; the rest is taught as background). The "
             "validation split also chose each radiologist's best checkpoint, so these are a little optimistic."
             " F1: of that precision and recall (the rule that picks a teacher threshold on validation).",
             "", "| rule | slices kept | structures per slice | truth per kept slice | precision@0.5 | recall@0.5 "
             "| F1 | ARI (kept slices) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rule']} | {r['kept']} of {r['slices']} | {r['per_slice']:.2f} | "
                     f"{r['truth_per_slice']:.2f} | {_fmt(r['precision50'])} | {_fmt(r['recall50'])} | "
                     f"{_fmt(f1_score(r['precision50'], r['recall50']))} | {_fmt(r['ARI'])} |")
    return lines + [""]


def chosen_thresholds(runs: Runs) -> list[str]:
    """Where a run chose its score thresholds on the validation split (predict/thresholds.json):
    the validation ARI at every threshold tried."""
    rows, grid, seen_teachers = [], None, False
    for variant in runs.done:
        path = runs.exp.run_dir(variant) / "predict" / "thresholds.json"
        if not path.exists():
            continue
        chosen = {m: c for m, c in read_json(path).items() if c.get("chosen_on") == "val"}
        for model, c in chosen.items():
            if seen_teachers and not model.startswith("student_r"):
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


def validation_table(model_dir: Path, label: str | None = None) -> list[str]:
    """Every validation evaluation of one training run (metrics.json), with its speed and time (log.txt)."""
    import yaml

    from d2ct.engine.checkpoint import iterations_trained

    metrics = model_dir / "metrics.json"
    if not metrics.exists():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().startswith("{")]
    max_iter = int(yaml.safe_load((model_dir / "config.yaml").read_text())["SOLVER"]["MAX_ITER"])
    speed = ""
    log = model_dir / "log.txt"
    if log.exists():
        for line in log.read_text().splitlines():
            if "Overall training speed:" in line or "Total training time:" in line:
                speed += " " + line.split("INFO: ", 1)[-1].strip() + "."
    out = [f"`{label or model_dir.name}`:{speed}", "",
           "| iterations | " + " | ".join(t for _, t, _ in VAL_COLUMNS) + " |", "|---|" + "---|" * len(VAL_COLUMNS)]
    for r in (r for r in rows if "segm/AP" in r):
        out.append(f"| {iterations_trained(r['iteration'], max_iter)} | "
                   + " | ".join(f"{r[k]:.{d}f}" if k in r else "-" for k, _, d in VAL_COLUMNS) + " |")
    return out + [""]


def table(exp) -> str:
    """The whole results file of an experiment (run.Experiment) from its finished run folders."""
    runs = Runs(exp)
    lines = ["| run | model | " + " | ".join(t for _, t in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    details, curves = [], []
    for i, variant in enumerate(runs.done):
        out = exp.run_dir(variant)
        for row in read_json(out / "evaluate" / "table.json"):
            if i and not row["model"].startswith("student_r"):
                continue  # the baseline and radiologists are the same in every run: shown once
            row = {**row, "fg_px": foreground_pixels(out / "predict" / f"{row['model']}.csv")}
            lines.append(f"| {variant} | {row['model']} | " + " | ".join(_cells(row)) + " |")
        models = runs.pipeline(variant).models()
        curves += [(name, d) for name, d in models if i == 0 and not name.startswith("student_r")]
        curves += [(f"{variant} {name}", d) for name, d in models if name.startswith("student_r")]
        report = out / "report" / "report.md"
        if report.exists():
            text = report.read_text()
            train = text.split("## Training", 1)[1].split("\n\n", 2)[1] if "## Training" in text else ""
            details += [f"### {variant}: training", "", train.strip(), ""]
        stages = sorted((out / "stages").glob("*.json"))
        hours = sum(read_json(p).get("seconds", 0) for p in stages) / 3600
        details += [f"{variant}: {len(stages)} stages finished, {hours:.2f} h of stage time (`{report}`)", ""]
    for peer in runs.peers:  # a yardstick outside the method: its own row, its own training summary
        folder = exp.peer_dir(peer)
        done = read_json(folder / "run.json")
        row = {**done.get("scores", {}), "fg_px": foreground_pixels(folder / "submission.csv")}
        lines.append(f"| {peer} (peer) | {peer} | " + " | ".join(_cells(row)) + " |")
        best = done.get("best", {})
        details += [f"{peer} (peer, `{folder}`): {done.get('iterations')} iterations in "
                    f"{done.get('seconds', 0) / 3600:.2f} h, best validation ARI "
                    f"{_fmt(best.get('ARI'))} at iteration {best.get('iteration')}; options "
                    f"`{json.dumps(done.get('options', {}), sort_keys=True)}`", ""]
    val = ["## Validation during training", "",
           "Each model on the validation patients (the split that picks its best checkpoint) at every "
           "evaluation; mask AP in %.", ""]
    for label, model_dir in curves:
        val += validation_table(model_dir, label)
    if len(val) > 4:
        details += val
    summary = read_json(exp.run_dir(runs.done[0]) / "data" / "summary.json") if runs.done else {}
    teachers = exp.teachers or runs.cfg(runs.done[0])["radiologists"] if runs.done else exp.teachers or []
    head = [f"# {exp.spec.get('title') or 'Experiment results'}", "",
            f"Written by `experiments/openkbp/run.py` (commands in {exp.spec.get('commands', 'experiments/openkbp/README.md')}).",
            f"Data: `{summary.get('root', '?')}`: splits " + ", ".join(
                f"{k} {v['images']}" for k, v in summary.get("splits", {}).items()) + "; scores on the held-out "
            "test patients.",
            f"Teachers: {', '.join(r['name'] for r in teachers)}" + (" (a subset: `--radiologists`)" if exp.teachers else "")
            + ".", ""]
    truth_fg = foreground_pixels(runs.data_root() / "test-labels.csv.gz") if runs.done else None
    if truth_fg is not None:
        note = exp.spec.get("truth_note")
        lines += ["", f"The truth has {truth_fg} foreground pixels per test slice{f' ({note})' if note else ''}."]
    return "\n".join(head + lines + [""] + paired_sections(runs) + chosen_thresholds(runs) + pseudo_label_counts(runs)
                     + pseudo_label_quality_section(runs) + details)


def publish(out: Path, text: str, quiet: bool = False) -> None:
    """Write a results file atomically; print it and where it went unless ``quiet``."""
    atomic_write_text(out, text)
    if not quiet:
        print(text)
        print(json.dumps({"written": str(out)}))
