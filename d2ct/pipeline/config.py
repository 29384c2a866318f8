"""The pipeline's own YAML config (configs/pipeline.yaml, configs/demo/pipeline.yaml).

It names the data set, the three radiologist configs and their pseudo-label thresholds, the
pseudo-labelling mode and the final config; the training configs themselves are Detectron2
YAML files. ``KEY=VALUE`` overrides address nested keys with dots
(``pseudolabel.mode=consensus``, ``radiologists.0.threshold=0.8``); values are read as YAML.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import yaml

from d2ct.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "output_dir": "output/pipeline",
    "num_gpus": 1,
    # Trainings that do not wait for each other (the radiologists; a round-1 student and its
    # control) run this many at a time. On a CPU each gets an equal share of the cores (at least
    # one thread): on a few cores several small trainings use them better than one (bench/RESULTS.md).
    # With GPUs each gets its own num_gpus GPUs: as many run at once as the visible GPUs allow.
    "parallel_trainings": 1,
    # CPU, parallel_trainings > 1: when fewer trainings are left running than started, those still
    # running take the freed threads. Faster on a few cores, but a training's thread count then
    # changes at a step that depends on timing, so its model is not bit-for-bit reproducible.
    "rebalance_threads": False,
    "data": {
        "name": "phantom",
        "root": None,
        "phantom": None,  # {n_train, n_labelled, n_test, size, seed}: generate the data set first
        "val_fraction": 0.2,
        "split_seed": 0,
        "group_by": None,  # a manifest column (e.g. patient) kept whole on one side of the train/val split
        "manifest": None,  # default <root>/manifest.csv
        "eval_split": "auto",  # test (needs test labels), val, or auto: test when labelled, else val
    },
    "baseline": {"enabled": True, "preset": "clahe_tv", "workers": 2},
    # each {name, config, threshold, opts}; or {name, dir, threshold}: a model trained before (by
    # tools/train_net.py or another run: a folder with config.yaml and model_final.pth) used as a
    # teacher as it is, never trained or removed by this run
    "radiologists": [],
    # Where the radiologists are trained (default <output_dir>/radiologists). Point it at another
    # run's folder to compare pseudo-labelling variants on the same trained radiologists: models
    # already trained there are reused, never retrained or removed by this run.
    "radiologists_dir": None,
    "pseudolabel": {
        "mode": "partition",
        "min_area": 10,
        "seed": 0,
        "rounds": 1,
        "flip_tta": False,
        "batch_size": 4,
        "limit": 0,
        "min_votes": 2,
        "single_model_score": 0.9,
        # partition mode: instances scored from ignore_below up to the model's threshold become
        # ignore regions in the final training (null: dropped, the published method)
        "ignore_below": None,
    },
    # The students: round k's student (student_r<k>) trains on the labelled + pseudolabels_r<k>
    # slices; the last round's student is the final model. init: "scratch" (the final config's
    # MODEL.WEIGHTS, the published method), "best" (the teachers' model with the highest validation
    # mask AP: a warm start, a student that begins where its best teacher stopped) or a radiologist's
    # name. Rounds after the first start from the previous student unless init is "scratch".
    # teach_threshold: the score a student's instances need to become pseudo-labels when it teaches
    # the next round (pseudolabel.rounds >= 2). pseudo_labels: false trains the students on the
    # labelled images alone (the ablation that shows what pseudo-labels add). labelled_repeat: the
    # labelled split is listed this many times in DATASETS.TRAIN, so a few hundred human labels are
    # not outnumbered by several times as many pseudo-labelled slices. control: true also trains
    # control_r1, the round-1 student's labelled-only control of equal compute (same config, opts,
    # start and iterations, labelled split alone), and the report gives the paired per-slice
    # difference: what the unlabelled pool added, with a bootstrap interval.
    "final": {"config": None, "teach_threshold": 0.7, "opts": [], "init": "scratch", "pseudo_labels": True,
              "labelled_repeat": 1, "control": False},
    # score_threshold: a number, or "val": each model's threshold is chosen from threshold_grid by
    # its mean ARI on the validation split (predict/thresholds.json), so models are compared at
    # their best rather than at one calibration
    "predict": {"flip_tta": False, "score_threshold": 0.5, "threshold_grid": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                "min_area": 5, "fallback_top_k": 3, "batch_size": 4},
    "report": {"overlays": 6},
    "opts": [],  # KEY VALUE overrides applied to every training config (before each model's own opts)
}

def online_teacher(cfg: dict) -> bool:
    """Whether the students learn the pool online (``D2CT.MEAN_TEACHER.ENABLED`` set true in the
    pipeline's opts or final.opts; the last setting wins)."""
    value = False
    for opts in (cfg.get("opts") or [], cfg["final"].get("opts") or []):
        for key, v in zip(opts[::2], opts[1::2]):
            if key == "D2CT.MEAN_TEACHER.ENABLED":
                value = str(v).strip().lower() == "true"
    return value


RADIOLOGIST_KEYS = ("name", "config", "dir", "threshold", "opts")
# model names the pipeline gives its own models (final, final_r2, ...) and the baseline
RESERVED_NAMES = ("baseline",)
RESERVED_PREFIX = "student_r"
# keys that were renamed: the old name gets a message saying the new one
RENAMED_KEYS = {"final.threshold": "final.teach_threshold"}
STAGES = ("data", "baseline", "radiologists", "pseudolabel", "final", "predict", "evaluate", "report")


def _merge(base: dict, update: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if where + key in RENAMED_KEYS:
            raise ConfigError(f"pipeline key {where + key!r} is now {RENAMED_KEYS[where + key]!r}")
        if key not in base:
            raise ConfigError(f"unknown pipeline key {where + key!r} (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def _set(cfg: dict, dotted: str, value: Any) -> None:
    node: Any = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise ConfigError(f"override {dotted!r}: {part!r} is not an index of the list") from None
        elif isinstance(node, dict) and part in node and node[part] is not None:
            node = node[part]
        elif isinstance(node, dict) and part in node:
            node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"unknown pipeline key {dotted!r}")
    if dotted in RENAMED_KEYS:
        raise ConfigError(f"pipeline key {dotted!r} is now {RENAMED_KEYS[dotted]!r}")
    last = parts[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"override {dotted!r}: {last!r} is not an index of the list") from None
    elif isinstance(node, dict) and (last in node or (node in cfg["radiologists"] and last in RADIOLOGIST_KEYS)):
        node[last] = value
    else:
        raise ConfigError(f"unknown pipeline key {dotted!r}")


def load_pipeline_config(path: str | None, overrides: Sequence[str] = ()) -> dict:
    """Defaults <- YAML file <- KEY=VALUE overrides; validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"pipeline config not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        cfg = _merge(cfg, data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        _set(cfg, key.strip(), yaml.safe_load(raw))
    validate(cfg, path or "<defaults>")
    return cfg


def _is_score(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _check_trained_dir(r: dict, i: int, source: str) -> None:
    """A radiologist given as a folder: it must hold a finished training and be named explicitly
    (its folder is often just ``final``); its config is the one it was trained with."""
    where = f"{source}: radiologists[{i}].dir {r['dir']}"
    if "name" not in r:
        raise ConfigError(f"{source}: radiologists[{i}] with a 'dir' needs a 'name'")
    if r.get("opts"):
        raise ConfigError(f"{source}: radiologists[{i}]: 'opts' apply to training; a radiologist given by "
                          "'dir' is not trained")
    folder = Path(r["dir"])
    if not folder.is_dir():
        raise ConfigError(f"{where} does not exist")
    for needed in ("config.yaml", "model_final.pth"):
        if not (folder / needed).exists():
            raise ConfigError(f"{where} has no {needed}: give the output folder of a finished training")


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


# dotted key -> (check, what a valid value is); checked before anything else uses the values
_SCHEMA: dict[str, tuple] = {
    "output_dir": (_is_text, "a folder path"),
    "num_gpus": (lambda v: _is_int(v, 1), "a whole number of at least 1"),
    "parallel_trainings": (lambda v: _is_int(v, 1), "a whole number of at least 1"),
    "rebalance_threads": (lambda v: isinstance(v, bool), "true or false"),
    "data.name": (_is_text, "a non-empty name"),
    "data.root": (_is_text, "the data set folder"),
    "data.phantom": (lambda v: v is None or isinstance(v, dict), "a mapping of phantom settings or null"),
    "data.val_fraction": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                          "a number in [0, 1)"),
    "data.split_seed": (_is_int, "a whole number >= 0"),
    "data.group_by": (lambda v: v is None or _is_text(v), "a manifest column name or null"),
    "data.manifest": (lambda v: v is None or _is_text(v), "a file path or null"),
    "baseline.enabled": (lambda v: isinstance(v, bool), "true or false"),
    "baseline.preset": (_is_text, "a preset name"),
    "baseline.workers": (lambda v: _is_int(v, 1), "a whole number of at least 1"),
    "radiologists": (lambda v: isinstance(v, list), "a list of radiologists"),
    "radiologists_dir": (lambda v: v is None or _is_text(v), "a folder path or null"),
    "pseudolabel.min_area": (_is_int, "a whole number >= 0"),
    "pseudolabel.seed": (_is_int, "a whole number >= 0"),
    "pseudolabel.rounds": (lambda v: _is_int(v, 1), "a whole number of at least 1"),
    "pseudolabel.flip_tta": (lambda v: isinstance(v, bool), "true or false"),
    "pseudolabel.batch_size": (lambda v: _is_int(v, 1), "a whole number of at least 1"),
    "pseudolabel.limit": (_is_int, "a whole number >= 0 (0: the whole pool)"),
    "pseudolabel.min_votes": (lambda v: _is_int(v, 1), "a whole number of at least 1"),
    "pseudolabel.single_model_score": (lambda v: _is_score(v), "a score in [0, 1]"),
    "final.teach_threshold": (lambda v: _is_score(v), "a score in [0, 1]"),
    "final.init": (_is_text, "scratch, best or a radiologist's name"),
    "final.pseudo_labels": (lambda v: isinstance(v, bool), "true or false"),
    "final.labelled_repeat": (lambda v: _is_int(v, 1), "a whole number of at least 1"),
    "final.control": (lambda v: isinstance(v, bool), "true or false"),
    "predict.flip_tta": (lambda v: isinstance(v, bool), "true or false"),
    "predict.min_area": (_is_int, "a whole number >= 0"),
    "predict.fallback_top_k": (_is_int, "a whole number >= 0"),
    "predict.batch_size": (lambda v: _is_int(v, 1), "a whole number of at least 1"),
    "report.overlays": (_is_int, "a whole number >= 0"),
}


def _check_schema(cfg: dict, source: str) -> None:
    for dotted, (check, wanted) in _SCHEMA.items():
        node = cfg
        for part in dotted.split("."):
            node = node[part]
        if not check(node):
            raise ConfigError(f"{source}: {dotted} must be {wanted}, got {node!r}")
    for i, r in enumerate(cfg["radiologists"]):
        if not isinstance(r, dict):
            continue  # named below
        if "threshold" in r and not _is_score(r["threshold"]):
            raise ConfigError(f"{source}: radiologists[{i}].threshold must be a score in [0, 1], got {r['threshold']!r}")
        for key in ("name", "config", "dir"):
            if key in r and not _is_text(r[key]):
                raise ConfigError(f"{source}: radiologists[{i}].{key} must be a non-empty string, got {r[key]!r}")


def validate(cfg: dict, source: str) -> None:
    data = cfg["data"]
    if not data.get("root"):
        raise ConfigError(f"{source}: data.root is required (the data set folder)")
    _check_schema(cfg, source)
    if not data.get("root"):
        raise ConfigError(f"{source}: data.root is required (the data set folder)")
    if data["eval_split"] not in ("auto", "test", "val"):
        raise ConfigError(f"{source}: data.eval_split must be auto, test or val, got {data['eval_split']!r}")
    rads = cfg["radiologists"]
    if not rads:
        raise ConfigError(f"{source}: radiologists: give at least one {{name, config, threshold}}")
    names = set()
    for i, r in enumerate(rads):
        if not isinstance(r, dict) or ("config" in r) == ("dir" in r):
            raise ConfigError(f"{source}: radiologists[{i}] needs a 'config' (a model to train) or a 'dir' "
                              "(a model trained before), not both")
        unknown = sorted(set(r) - set(RADIOLOGIST_KEYS))
        if unknown:
            raise ConfigError(f"{source}: radiologists[{i}]: unknown key(s) {', '.join(unknown)} "
                              f"(known: {', '.join(RADIOLOGIST_KEYS)})")
        if "dir" in r:
            _check_trained_dir(r, i, source)
        r.setdefault("name", Path(r.get("config", "")).stem.replace("radiologist_", ""))
        if r["name"] in RESERVED_NAMES or str(r["name"]).startswith(RESERVED_PREFIX):
            raise ConfigError(f"{source}: radiologists[{i}]: the name {r['name']!r} is the pipeline's own "
                              f"(baseline, {RESERVED_PREFIX}<k>); choose another")
        r.setdefault("threshold", 0.7)
        r.setdefault("opts", [])
        if not isinstance(r["opts"], list) or len(r["opts"]) % 2:
            raise ConfigError(f"{source}: radiologists[{i}].opts must be a list of KEY, VALUE pairs")
        if r["name"] in names:
            raise ConfigError(f"{source}: two radiologists are named {r['name']!r}")
        names.add(r["name"])
        if "config" in r and not Path(r["config"]).exists():
            raise ConfigError(f"{source}: radiologists[{i}].config {r['config']} does not exist")
    if not cfg["final"].get("config") or not Path(cfg["final"]["config"]).exists():
        raise ConfigError(f"{source}: final.config {cfg['final'].get('config')!r} does not exist")
    init = cfg["final"]["init"]
    if init not in ("scratch", "best") and init not in names:
        raise ConfigError(f"{source}: final.init must be scratch, best or a radiologist's name "
                          f"({', '.join(sorted(names))}), got {init!r}")
    if cfg["final"]["control"] and cfg["final"]["pseudo_labels"] is False and not online_teacher(cfg):
        raise ConfigError(f"{source}: final.control trains a labelled-only control next to a student that "
                          "learns from pseudo-labels; with final.pseudo_labels false the student is that control")
    if not isinstance(cfg["final"]["pseudo_labels"], bool):
        raise ConfigError(f"{source}: final.pseudo_labels must be true or false")
    repeat = cfg["final"]["labelled_repeat"]
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ConfigError(f"{source}: final.labelled_repeat must be a whole number of at least 1, got {repeat!r}")
    if cfg["pseudolabel"]["mode"] not in ("partition", "consensus", "ensemble"):
        raise ConfigError(f"{source}: pseudolabel.mode must be partition, consensus or ensemble")
    ignore = cfg["pseudolabel"]["ignore_below"]
    if ignore is not None:
        if isinstance(ignore, bool) or not isinstance(ignore, (int, float)) or ignore < 0:
            raise ConfigError(f"{source}: pseudolabel.ignore_below must be a score >= 0 or null, got {ignore!r}")
        if cfg["pseudolabel"]["mode"] == "consensus":
            raise ConfigError(f"{source}: pseudolabel.ignore_below needs pseudolabel.mode partition or ensemble")
        teach = [cfg["final"]["teach_threshold"]] if int(cfg["pseudolabel"]["rounds"]) > 1 else []
        low = min([r["threshold"] for r in rads] + teach)
        if ignore >= low:
            raise ConfigError(f"{source}: pseudolabel.ignore_below ({ignore}) must be below every pseudo-label "
                              f"threshold (radiologists' and, with rounds >= 2, final.teach_threshold; lowest {low})")
    threshold, grid = cfg["predict"]["score_threshold"], cfg["predict"]["threshold_grid"]
    if threshold != "val" and not _is_score(threshold):
        raise ConfigError(f"{source}: predict.score_threshold must be a score in [0, 1] or val, got {threshold!r}")
    if not isinstance(grid, list) or not grid or not all(_is_score(t) for t in grid):
        raise ConfigError(f"{source}: predict.threshold_grid must be a non-empty list of scores in [0, 1], got {grid!r}")
    for key, opts in (("opts", cfg["opts"]), ("final.opts", cfg["final"]["opts"])):
        if not isinstance(opts, list) or len(opts) % 2:
            raise ConfigError(f"{source}: {key} must be a list of KEY, VALUE pairs")
