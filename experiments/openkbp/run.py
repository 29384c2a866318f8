#!/usr/bin/env python
"""The OpenKBP experiments: every variant of experiments/openkbp/variants.yaml through the pipeline.

For each variant chosen, one ``tools/run_pipeline.py --config configs/cpu/pipeline_openkbp.yaml
--set output_dir=<runs>/<variant> radiologists_dir=<runs>/radiologists <the variant's sets>``
subprocess, in order; then the tables (experiments/openkbp/tables.py) over every run folder. All
variants share the radiologists of ``<runs>/radiologists``: the first run trains them, the others
reuse them (the pipeline never retrains or removes a shared model; one made with other settings is
an error). Resumable: run the same command again after a kill and the pipeline skips what is
finished. The held-out test patients (tools/make_holdout.py: 20% of the patients, seed 0, or what
the variants file's ``holdouts`` gives for the config's data.root) are prepared first when that
folder does not exist yet. The variants file's ``peers`` are yardsticks outside the method (the
U-Net of tools/train_unet.py), trained on the same split in ``<runs>/<peer>`` (a peer with a
finished run.json is not trained again; a killed one starts over) and scored beside the runs.
Another data set: --config, --variants and --source (experiments/abdomen/README.md).

  python experiments/openkbp/run.py --only main thr05
  python experiments/openkbp/run.py --radiologists r50 r101 --only warmstart_labelled warmstart
      # two of the three teachers: run folders <variant>_r50+r101
  python experiments/openkbp/run.py --only unet   # the U-Net peer (variants.yaml: peers)
  python experiments/openkbp/run.py --radiologists r50 r101 --predict-threshold val --out T.md --table-only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SOURCE = Path("/work/shared/data/openkbp_fewshot")
VARIANTS_FILE = HERE / "variants.yaml"
REFERENCE = re.compile(r"@(\w+)")  # "@<variant>": that variant's run folder


def _flat(items) -> list:
    """A variant's sets, with a YAML alias of another variant's sets (a nested list) spliced in."""
    return [x for item in items for x in (_flat(item) if isinstance(item, list) else [item])]


def _fold_appends(sets: list[str], where: str) -> list[str]:
    """``KEY+=[...]`` items merged into the last ``KEY=[...]`` before them, so a variant can reuse
    another's sets (a YAML alias) and add to its list: ``[*mean_teacher, "final.opts+=[SEED, 7]"]``.
    The lists are joined as text (the quoting of each part kept); the pipeline gets one KEY=[...]."""
    out: list[str] = []
    for item in sets:
        key, value = item.split("=", 1)
        if not key.endswith("+"):
            out.append(item)
            continue
        key = key[:-1]
        earlier = [i for i, s in enumerate(out) if s.split("=", 1)[0] == key]
        if not earlier:
            raise SystemExit(f"{where}: {item!r} appends to {key}, which no earlier item of its sets gives")
        base = out[earlier[-1]].split("=", 1)[1]
        parsed = []
        for text in (base, value):
            try:
                parsed.append(yaml.safe_load(text))
            except yaml.YAMLError:
                parsed.append(None)
            if not isinstance(parsed[-1], list):
                raise SystemExit(f"{where}: {key}+=: {text!r} is not a [list] (only lists can be appended to)")
        joined = (base.strip()[:-1].rstrip() + ", " + value.strip()[1:].lstrip()) if parsed[0] and parsed[1] else (
            base if parsed[0] else value)
        assert yaml.safe_load(joined) == parsed[0] + parsed[1], (base, value)
        out[earlier[-1]] = f"{key}={joined}"
    return out


# tools/make_holdout.py's options for a data.root the variants file's "holdouts" does not list
HOLDOUT_DEFAULT = {"test_fraction": 0.2, "group_by": "patient", "seed": 0}


def load_variants(path: Path = VARIANTS_FILE) -> dict:
    """{"reference": name, "variants": {name: {"sets": [...], "control": name | None, "also_against":
    [name, ...]}}}, checked: every control, also_against, reference and @-reference names a variant."""
    where = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"{where}: cannot read the variants ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict) or not data["variants"]:
        raise SystemExit(f"{where}: expected a mapping with a non-empty 'variants' mapping")
    variants = {}
    for name, v in data["variants"].items():
        if not re.fullmatch(r"\w+", str(name)) or not isinstance(v, dict) or set(v) - {"sets", "control", "also_against"}:
            raise SystemExit(f"{where}: variant {name!r}: expected a name of letters, digits and _ with "
                             "'sets' (a list of KEY=VALUE), an optional 'control' and 'also_against'")
        sets = _flat(v.get("sets") or [])
        if not all(isinstance(s, str) and "=" in s for s in sets):
            raise SystemExit(f"{where}: variant {name}: every item of 'sets' must be a KEY=VALUE string")
        sets = _fold_appends(sets, f"{where}: variant {name}")
        also = v.get("also_against") or []
        if not isinstance(also, list):
            raise SystemExit(f"{where}: variant {name}: 'also_against' must be a list of variant names")
        variants[name] = {"sets": sets, "control": v.get("control"), "also_against": also}
    named = [("reference", data.get("reference"))] if data.get("reference") else []
    for name, v in variants.items():
        named += [(f"{name}.control", v["control"])] if v["control"] else []
        named += [(f"{name}.also_against", other) for other in v["also_against"]]
        named += [(f"{name}.sets", m) for s in v["sets"] for m in REFERENCE.findall(s)]
    for what, other in named:
        if other not in variants:
            raise SystemExit(f"{where}: {what} names {other!r}, which is not a variant")
    peers = {}
    for name, v in (data.get("peers") or {}).items():
        args = v.get("args", []) if isinstance(v, dict) else None
        if (not re.fullmatch(r"\w+", str(name)) or name in variants or not isinstance(v, dict) or set(v) - {"args"}
                or not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args)):
            raise SystemExit(f"{where}: peer {name!r}: expected a name of letters, digits and _ that no variant "
                             "has, with 'args' (a list of tools/train_unet.py options)")
        peers[name] = {"args": [str(a) for a in args]}
    holdouts = {}
    for root, h in (data.get("holdouts") or {}).items():
        if not isinstance(h, dict) or set(h) - set(HOLDOUT_DEFAULT) or not all(
                isinstance(h.get(k, d), type(d)) and not isinstance(h.get(k, d), bool) for k, d in HOLDOUT_DEFAULT.items()):
            raise SystemExit(f"{where}: holdouts: {root!r}: expected a mapping of make_holdout options "
                             f"({', '.join(f'{k}: {type(d).__name__}' for k, d in HOLDOUT_DEFAULT.items())})")
        holdouts[str(root)] = {**HOLDOUT_DEFAULT, **h}
    return {"reference": data.get("reference"), "variants": variants, "peers": peers, "title": data.get("title"),
            "truth_note": data.get("truth_note", ""), "holdouts": holdouts, "commands": commands_readme(path)}


def commands_readme(variants_file: Path) -> str:
    """Where a variants file's commands are written: the README beside it (relative to the project),
    or this driver's own README for a file elsewhere."""
    readme = Path(variants_file).resolve().parent / "README.md"
    try:
        return str(readme.relative_to(ROOT)) if readme.is_file() else str((HERE / "README.md").relative_to(ROOT))
    except ValueError:  # a variants file outside the project
        return str(HERE.relative_to(ROOT) / "README.md")


def radiologist_subset(config: str, wanted: list[str] | None) -> list[dict] | None:
    """The config's radiologists named by --radiologists (in config order); None for all."""
    if not wanted:
        return None
    config_rads = yaml.safe_load((ROOT / config).read_text())["radiologists"]
    unknown = sorted(set(wanted) - {r["name"] for r in config_rads})
    if unknown:
        raise SystemExit(f"--radiologists: {', '.join(unknown)} not in {config} "
                         f"({', '.join(r['name'] for r in config_rads)})")
    return [r for r in config_rads if r["name"] in wanted]


@dataclass
class Experiment:
    """Where the runs lie and the settings every run gets (the command line of this driver)."""
    runs: Path
    config: str = "configs/cpu/pipeline_openkbp.yaml"
    spec: dict = field(default_factory=load_variants)
    teachers: list[dict] | None = None  # a --radiologists subset, or None: the config's
    predict_threshold: str | None = None
    extra: list[str] = field(default_factory=list)  # --set: after everything else, for every run

    @property
    def variants(self) -> dict:
        return self.spec["variants"]

    @property
    def peers(self) -> dict:
        return self.spec.get("peers", {})

    def peer_dir(self, peer: str) -> Path:
        """A peer's folder: <runs>/<peer> (it learns from the labelled slices alone: no teacher tag)."""
        return self.runs / peer

    @property
    def tag(self) -> str:
        return "_" + "+".join(r["name"] for r in self.teachers) if self.teachers else ""

    def run_dir(self, variant: str) -> Path:
        return self.runs / f"{variant}{self.tag}"

    def sets(self, variant: str) -> list[str]:
        """The run_pipeline.py --set items of one variant's run."""
        sets = [f"output_dir={self.run_dir(variant)}", f"radiologists_dir={self.runs / 'radiologists'}"]
        if self.teachers:  # first: the variant's own radiologists= or radiologists.*. apply after it
            sets.append("radiologists=" + json.dumps(self.teachers))
        n_teachers = len(self.teachers or yaml.safe_load((ROOT / self.config).read_text())["radiologists"])
        for item in self.variants[variant]["sets"]:
            item = REFERENCE.sub(lambda m: str(self.run_dir(m[1])), item)
            if item.startswith("radiologists.*."):
                own = [s for s in self.variants[variant]["sets"] if s.startswith("radiologists=")]
                count = len(yaml.safe_load(own[-1].split("=", 1)[1])) if own else n_teachers
                sets += [item.replace("*", str(i), 1) for i in range(count)]
            else:
                sets.append(item)
        if self.predict_threshold is not None:
            sets.append(f"predict.score_threshold={self.predict_threshold}")
        return sets + list(self.extra)

    def pipeline_config(self, variant: str) -> dict:
        from d2ct.pipeline.config import load_pipeline_config

        return load_pipeline_config(str(ROOT / self.config), self.sets(variant))

    def needs(self, variant: str) -> list[tuple[str, Path]]:
        """(variant, folder) of every other run's output a variant's settings name (``@X/...``)."""
        found = []
        for item in self.variants[variant]["sets"]:
            found += [(m[1], self.run_dir(m[1]) / m[2]) for m in re.finditer(r"@(\w+)/([\w./-]+)", item)]
        return found

    def taught_by(self) -> dict[str, list[str]]:
        """teacher variant -> the variants whose radiologist is one of its models (``dir: '@X/...'``)."""
        runs: dict[str, list[str]] = {}
        for variant, v in self.variants.items():
            for item in v["sets"]:
                for teacher in re.findall(r"dir:\s*['\"]?@(\w+)/", item) if item.startswith("radiologists=") else []:
                    runs.setdefault(teacher, []).append(variant)
        return runs


def command(exp: Experiment, variant: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools/run_pipeline.py"), "--config", exp.config, "--set", *exp.sets(variant)]


def run_variant(exp: Experiment, variant: str) -> None:
    for other, folder in exp.needs(variant):
        if not (folder / "model_final.pth").exists():
            raise SystemExit(f"{variant} needs {folder} (a model of the run {other}): run --only {other} first")
    _run_logged(variant, command(exp, variant), f"its logs: {exp.run_dir(variant) / 'logs'}")


def _run_logged(name: str, cmd: list[str], on_failure: str = "") -> None:
    """One run's subprocess, with its command line and time printed; a failure stops the driver."""
    print(f"[openkbp] {name}: $ {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"[openkbp] {name}: {Path(cmd[1]).relative_to(ROOT)} failed (exit {proc.returncode})"
                         + (f"; {on_failure}" if on_failure else ""))
    print(f"[openkbp] {name}: done in {(time.time() - start) / 3600:.2f} h", flush=True)


def peer_command(exp: Experiment, peer: str) -> list[str]:
    """tools/train_unet.py on the pipeline config's data, with its train/validation split (the same
    val_fraction, split_seed and group_by as every Mask R-CNN of the runs), then the peer's args."""
    from d2ct.pipeline.config import load_pipeline_config

    data = load_pipeline_config(str(ROOT / exp.config), exp.extra)["data"]
    cmd = [sys.executable, str(ROOT / "tools/train_unet.py"), "--data", str(data["root"]), "--out",
           str(exp.peer_dir(peer)), "--val-fraction", str(data["val_fraction"]), "--split-seed", str(data["split_seed"])]
    if data.get("group_by"):
        cmd += ["--group-by", str(data["group_by"])]
    if data.get("manifest"):
        cmd += ["--manifest", str(data["manifest"])]
    return cmd + exp.peers[peer]["args"]


def run_peer(exp: Experiment, peer: str) -> None:
    """Train and score a peer unless its folder holds a finished run (run.json, written last)."""
    if (exp.peer_dir(peer) / "run.json").exists():
        print(f"[openkbp] {peer}: finished before ({exp.peer_dir(peer)})", flush=True)
        return
    _run_logged(peer, peer_command(exp, peer))


def holdout_options(exp: Experiment, root: str) -> dict:
    """make_holdout's options for a data.root: the variants file's ``holdouts`` entry (keyed by the
    data.root as the config or --set writes it), else :data:`HOLDOUT_DEFAULT`."""
    return exp.spec.get("holdouts", {}).get(str(root), HOLDOUT_DEFAULT)


def prepare_holdout(exp: Experiment, source: Path) -> None:
    """tools/make_holdout.py from ``source`` into the config's data.root, when that does not exist
    (make_holdout writes its folder whole, so an existing one is finished), with
    :func:`holdout_options`."""
    from d2ct.pipeline.config import load_pipeline_config

    data = load_pipeline_config(str(ROOT / exp.config), exp.extra)["data"]
    if data["name"] == "phantom":
        return  # the pipeline's data stage generates the phantom itself
    opts = holdout_options(exp, data["root"])
    root = Path(data["root"])
    root = root if root.is_absolute() else ROOT / root
    if root.exists():
        made = root / "holdout.json"  # make_holdout's record of how the folder was made
        try:
            recorded = json.loads(made.read_text()) if made.exists() else {}
        except (OSError, ValueError) as e:
            raise SystemExit(f"{made}: unreadable ({e}); remove {root} to make it again") from None
        differ = {k: (recorded[k], v) for k, v in opts.items() if k in recorded and recorded[k] != v}
        if differ:
            raise SystemExit(f"{made}: {root} was made with other hold-out options than the variants file gives "
                             + ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in differ.items())
                             + f"; remove {root} or correct the variants file's holdouts")
        return
    subprocess.run([sys.executable, str(ROOT / "tools/make_holdout.py"), "--data", str(source), "--out", str(root),
                    "--test-fraction", str(opts["test_fraction"]), "--group-by", opts["group_by"],
                    "--seed", str(opts["seed"])], cwd=ROOT, check=True)


def _threshold(text: str) -> str:
    if text != "val":
        try:
            if not 0 <= float(text) <= 1:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a score in [0, 1] or val, got {text!r}") from None
    return text


def add_run_folder_arguments(p: argparse.ArgumentParser) -> None:
    """The options that find this driver's run folders (--config, --variants, --runs, --radiologists,
    --set), for the scripts that read finished runs (flip_tta.py, hybrid.py); :func:`experiment_of`."""
    p.add_argument("--config", default="configs/cpu/pipeline_openkbp.yaml")
    p.add_argument("--variants", type=Path, default=VARIANTS_FILE)
    p.add_argument("--runs", type=Path, default=Path.home() / "d2ct-runs" / "openkbp", help="as given to run.py")
    p.add_argument("--radiologists", nargs="+", metavar="NAME", help="as given to run.py")
    p.add_argument("--set", dest="extra", nargs="+", default=[], metavar="KEY=VALUE", help="as given to run.py")


def experiment_of(args: argparse.Namespace, spec: dict) -> Experiment:
    """The Experiment these command-line options name (run.py's own, or :func:`add_run_folder_arguments`')."""
    return Experiment(runs=args.runs.expanduser().resolve(), config=args.config, spec=spec,
                      teachers=radiologist_subset(args.config, args.radiologists),
                      predict_threshold=getattr(args, "predict_threshold", None), extra=args.extra)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cpu/pipeline_openkbp.yaml", help="the pipeline config every run starts from")
    p.add_argument("--variants", type=Path, default=VARIANTS_FILE, help="the variants file (default: %(default)s)")
    p.add_argument("--runs", type=Path, default=Path.home() / "d2ct-runs" / "openkbp",
                   help="run folders: <runs>/<variant>, shared radiologists in <runs>/radiologists (default: %(default)s)")
    p.add_argument("--source", type=Path, default=SOURCE, help="the OpenKBP few-shot folder the hold-out is made from")
    p.add_argument("--only", nargs="+", metavar="VARIANT",
                   help="variants (or peers) to run, in this order (default: all variants, then the peers)")
    p.add_argument("--radiologists", nargs="+", metavar="NAME",
                   help="only these radiologists of the config; run folders get the suffix _<names>")
    p.add_argument("--predict-threshold", type=_threshold, metavar="SCORE|val",
                   help="predict.score_threshold of every run; val: each model's own, chosen on the validation "
                        "split (only predict, evaluate and report run again)")
    p.add_argument("--set", dest="extra", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more pipeline overrides for every run, after the variant's")
    p.add_argument("--table-only", action="store_true", help="write the tables from the run folders; run nothing")
    p.add_argument("--out", type=Path, default=HERE / "results" / "OPENKBP.md", help="the results file (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from experiments.openkbp import tables

    args = parse_args(argv)
    args.out, args.source = args.out.resolve(), args.source.resolve()
    spec = load_variants(args.variants.resolve())
    known = [*spec["variants"], *spec["peers"]]
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        raise SystemExit(f"--only: {', '.join(unknown)} not in {args.variants} ({', '.join(known)})")
    exp = experiment_of(args, spec)
    os.chdir(ROOT)  # the pipeline config's paths (configs/..., datasets/...) are relative to the project
    text = None
    if not args.table_only:
        prepare_holdout(exp, args.source)
        for variant in args.only or known:
            (run_peer if variant in spec["peers"] else run_variant)(exp, variant)
            text = tables.table(exp)  # after each run: a long session keeps its tables so far
            tables.publish(args.out, text, quiet=True)
    tables.publish(args.out, text if text is not None else tables.table(exp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
