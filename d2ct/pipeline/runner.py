"""The whole method as resumable stages.

data -> baseline -> radiologists -> pseudolabel -> final -> predict -> evaluate -> report

The rounds of the method are named artefacts under ``output_dir``: the radiologists (the teachers
of round 1) -> ``pseudolabels_r1/`` -> ``student_r1/`` (trained on the labelled + pseudo-labelled
slices) -> ``pseudolabels_r2/`` (labelled by student_r1) -> ``student_r2/`` -> ...; the last student
is the final model, whose predictions make ``submission.csv``.

The data stage decides the split once and writes it to ``data/splits_final.json``; every later
stage and every training run reads it from there.

Each stage records a marker in ``output_dir/stages/<stage>.json`` (with a fingerprint of the
settings it ran with, config files included) once its outputs are complete; a stage whose marker
matches is skipped, and after a stage runs every later stage runs too. Each folder a stage fills
records the settings it was made with (:mod:`d2ct.pipeline.provenance`): a stage that runs reuses
or resumes a folder made with its current settings (a killed training continues from its last
checkpoint) and rebuilds one made with other settings, so outputs always belong to the settings
shown in the report. ``from_stage`` re-runs a stage and everything after it from scratch.

Training, pseudo-labelling and prediction run the command-line tools as subprocesses with
``--num-gpus``: the same commands a user would type, each in a clean process, on one or
several GPUs (or CPU processes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from d2ct.errors import D2CTError, DataError
from d2ct.utils.fileio import atomic_write_json, atomic_write_text, read_json
from d2ct.utils.resources import THREADS_FILE_ENV, cpu_threads, visible_gpus

from .config import STAGES, online_teacher
from .provenance import claim_folder, file_sha256, fingerprint

logger = logging.getLogger("d2ct.pipeline")
# the tools the stages run, as modules (``python -m``): no need for the project's tools/ folder,
# so an installed (non-editable) d2ct runs the pipeline too
TOOLS = {"train_net.py": "d2ct.engine.train_net", "pseudolabel.py": "d2ct.pseudolabel.cli",
         "predict.py": "d2ct.engine.predict"}


POLL_SECONDS = 1.0  # how often trainings running at once are checked


class StageError(D2CTError):
    pass


def training_slots(jobs: int, num_gpus: int, threads: int, gpus: list[str]) -> list[dict[str, str]]:
    """The environment of each of up to ``jobs`` trainings that run at once: an equal share of
    ``threads`` CPU threads (at least one) and, on a GPU host, its own ``num_gpus`` of ``gpus``; there
    at most ``len(gpus) // num_gpus`` slots (fewer than ``jobs`` when the GPUs run out)."""
    if gpus:
        if num_gpus > len(gpus):
            raise StageError(f"num_gpus {num_gpus}: this host shows {len(gpus)} GPU(s) ({','.join(gpus)}): lower "
                             "num_gpus (or hide the GPUs, CUDA_VISIBLE_DEVICES=, to train on the CPU)")
        jobs = min(jobs, len(gpus) // num_gpus)
    share = str(max(1, threads // jobs))
    slots = []
    for i in range(jobs):
        env = {"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * num_gpus:(i + 1) * num_gpus])
        slots.append(env)
    return slots


def config_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a Detectron2 YAML config and the local files its ``_BASE_`` chain names, so an
    edited config file (or base) counts as changed settings."""
    import yaml

    h = hashlib.sha256()
    seen = set()
    todo = [Path(path)]
    while todo:
        p = todo.pop()
        if p.resolve() in seen:
            continue
        seen.add(p.resolve())
        try:
            text = p.read_bytes()
        except OSError:  # a model-zoo base name: fixed by the installed Detectron2
            h.update(str(p).encode())
            continue
        h.update(text)
        try:
            base = (yaml.safe_load(text) or {}).get("_BASE_")
        except (yaml.YAMLError, AttributeError):
            base = None
        if isinstance(base, str):
            todo.append(p.parent / base)
    return h.hexdigest()


def data_folder_digest(root: Path) -> str:
    """A cheap digest of a data set folder: the files at its top level by content (labels, annotated
    lists, manifest) and every image by name and size."""
    h = hashlib.sha256()
    if not root.is_dir():
        return "missing"
    for p in sorted(root.iterdir()):
        if p.is_file():
            h.update(p.name.encode())
            h.update(file_sha256(p).encode())
        elif p.is_dir():
            for f in sorted(p.iterdir()):
                h.update(f"{p.name}/{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def config_key_at_default(key: str, value) -> bool:
    """Whether ``config.<A>.<B>`` of :meth:`Pipeline.training_settings` holds d2ct's default value
    (a training config key added to d2ct after a model was trained)."""
    import yaml

    from d2ct.config.setup import get_d2ct_cfg

    if not key.startswith("config."):
        return False
    node = yaml.safe_load(get_d2ct_cfg().dump())
    for part in key.split(".")[1:]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return node == value


class Pipeline:
    def __init__(self, cfg: dict, config_path: str | None = None, python: str = sys.executable):
        self.cfg = cfg
        self.config_path = config_path
        self.python = python
        self.out = Path(cfg["output_dir"])
        self.data_root = Path(cfg["data"]["root"])
        self.name = cfg["data"]["name"]
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------
    # bookkeeping
    # ------------------------------------------------------------------------------------------
    def _marker(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def _radiologist_settings(self, r: dict) -> dict:
        if r.get("dir"):  # trained before: what it is, by its checkpoints' size and time
            stats = {f.name: [f.stat().st_size, f.stat().st_mtime_ns]
                     for f in (Path(r["dir"]) / "model_best.pth", Path(r["dir"]) / "model_final.pth") if f.exists()}
            return {"name": r["name"], "dir": str(Path(r["dir"]).resolve()), "checkpoints": stats}
        return {"name": r["name"], "config": r["config"], "config_digest": config_digest(r["config"]), "opts": r["opts"]}

    def _stage_settings(self, stage: str) -> dict:
        """What a stage's outputs depend on: its own settings and every earlier stage's (config file
        contents included), so an edited config or data set is a change like any other."""
        c = self.cfg
        data = dict(c["data"])
        if not data.get("phantom"):  # a data set on disk: its files are part of the settings
            data["files"] = data_folder_digest(self.data_root)
        upstream = {
            "data": {"data": data},
            "baseline": {"baseline": c["baseline"]},
            "radiologists": {"radiologists": [self._radiologist_settings(r) for r in c["radiologists"]],
                             "opts": c["opts"], "radiologists_dir": c.get("radiologists_dir")},
            "pseudolabel": {"pseudolabel": {k: v for k, v in c["pseudolabel"].items() if k != "rounds"},
                            "thresholds": {r["name"]: r["threshold"] for r in c["radiologists"]}},
            # control off is left out: runs made before the key existed keep their fingerprint
            "final": {"final": {k: v for k, v in c["final"].items() if k != "control" or v},
                      "final_config_digest": config_digest(c["final"]["config"]),
                      "rounds": c["pseudolabel"]["rounds"]},
            "predict": {"predict": c["predict"]},
            "evaluate": {},
            "report": {"report": c["report"]},
        }
        # a stage depends on its own settings and on every earlier stage's
        settings = {}
        for s in STAGES:
            settings[s] = upstream[s]
            if s == stage:
                break
        return settings

    def is_done(self, stage: str) -> bool:
        marker = self._marker(stage)
        if not marker.exists():
            return False
        try:
            return read_json(marker).get("fingerprint") == fingerprint(self._stage_settings(stage))
        except ValueError:
            return False

    def _mark_done(self, stage: str, seconds: float, outputs: dict) -> None:
        atomic_write_json(self._marker(stage), {
            "stage": stage, "fingerprint": fingerprint(self._stage_settings(stage)), "seconds": round(seconds, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "outputs": outputs,
        })

    def stage_dirs(self, stage: str) -> list[Path]:
        if stage == "radiologists":
            return [self.radiologists_root()]
        if stage == "pseudolabel":
            return sorted(self.out.glob("pseudolabels_r*"))
        if stage == "final":
            return sorted(self.out.glob("student_r*")) + sorted(self.out.glob("control_r*"))
        return [self.out / stage]

    def reset_from(self, stage: str) -> None:
        """Forget ``stage`` and every later stage: markers and their output folders."""
        for s in STAGES[STAGES.index(stage):]:
            self._marker(s).unlink(missing_ok=True)
            for d in self.stage_dirs(s):
                inside = d.resolve().is_relative_to(self.out.resolve())  # never another run's folders
                if d.exists() and inside and d.resolve() != self.data_root.resolve():
                    logger.info("--from %s: removing %s", stage, d)
                    shutil.rmtree(d)

    def _start_tool(self, tool: str, args: list, log_name: str, env: dict[str, str] | None = None):
        """Start one tool as a subprocess writing to ``logs/<log_name>.log``: (process, log file, path)."""
        cmd = [self.python, "-m", TOOLS[tool], *[str(a) for a in args]]
        log_path = self.out / "logs" / f"{log_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        logger.info("$ %s%s", f"{shown} " if shown else "", " ".join(cmd))
        log = open(log_path, "a")
        log.write(f"\n$ {shown + ' ' if shown else ''}{' '.join(cmd)}\n")
        log.flush()
        # in the caller's folder: the config's relative paths are relative to it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env} if env else None)
        return proc, log, log_path

    @staticmethod
    def _check_exit(tool: str, proc: subprocess.Popen, log_path: Path) -> None:
        if proc.returncode != 0:
            tail = "".join(open(log_path).readlines()[-25:])
            raise StageError(f"{tool} failed (exit {proc.returncode}); log: {log_path}\n{tail}")

    def _run_tool(self, tool: str, args: list, log_name: str) -> None:
        proc, log, log_path = self._start_tool(tool, args, log_name)
        with log:
            try:
                proc.wait()
            except BaseException:  # Ctrl-C: the child stops too (a training resumes from its checkpoint)
                proc.kill()
                proc.wait()
                raise
        self._check_exit(tool, proc, log_path)

    def _run_tools_at_once(self, jobs: list[tuple[str, list, str]]) -> None:
        """Run (tool, args, log_name) jobs ``parallel_trainings`` at a time, each in its own slot of
        threads (and GPUs). A failed job lets the others finish (their work is kept) and is raised
        once all have ended; an interruption stops them all."""
        wanted = min(int(self.cfg["parallel_trainings"]), len(jobs))
        gpus, num_gpus, threads = visible_gpus(), int(self.cfg["num_gpus"]), cpu_threads()
        slots = training_slots(wanted, num_gpus, threads, gpus)
        n = len(slots)
        if n < wanted:
            logger.warning("parallel_trainings %d: only %d at a time fit on this host's %d GPU(s) at num_gpus %d",
                           int(self.cfg["parallel_trainings"]), n, len(gpus), num_gpus)
        logger.info("%d trainings, %d at a time (%s each)", len(jobs), n,
                    ", ".join(f"{k}={v}" for k, v in slots[0].items() if k != "MKL_NUM_THREADS"))
        shares = {}  # rebalance_threads on a CPU: slot -> its threads file
        follow = bool(self.cfg["rebalance_threads"]) and not gpus
        pending, running, failures, free = list(jobs), {}, [], list(range(n))
        try:
            while pending or running:
                while pending and free:
                    slot = free.pop(0)
                    tool, args, log_name = pending.pop(0)
                    env = dict(slots[slot])
                    if follow:  # the training follows this file (d2ct.engine.trainer.ThreadShare)
                        shares[slot] = self.out / "logs" / f"{log_name}.threads"
                        shares[slot].parent.mkdir(parents=True, exist_ok=True)
                        atomic_write_text(shares[slot], env["OMP_NUM_THREADS"] + "\n")
                        env[THREADS_FILE_ENV] = str(shares[slot])
                    running[slot] = (tool, log_name, *self._start_tool(tool, args, log_name, env))
                # fewer trainings left than slots: the freed threads go to those still running
                share = str(max(1, threads // max(1, len(running))))
                raised = [slot for slot in running if slot in shares and shares[slot].read_text().strip() != share]
                for slot in raised:
                    atomic_write_text(shares[slot], share + "\n")
                if raised:
                    logger.info("rebalance_threads: %s now %s thread(s) each",
                                ", ".join(running[s][1] for s in raised), share)
                time.sleep(POLL_SECONDS)
                for slot, (tool, log_name, proc, log, log_path) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    log.close()
                    del running[slot]
                    free.append(slot)
                    try:
                        self._check_exit(tool, proc, log_path)
                        logger.info("%s finished", log_name)
                    except StageError as e:
                        logger.error("%s failed (exit %d; log %s); the other trainings go on", log_name,
                                     proc.returncode, log_path)
                        failures.append(e)
        finally:  # interrupted: stop the rest (each resumes from its last checkpoint on the next run)
            for _, _, proc, log, _ in running.values():
                proc.terminate()
            for _, _, proc, log, _ in running.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()
        if failures:
            raise StageError("\n".join(str(e) for e in failures))

    # ------------------------------------------------------------------------------------------
    # data
    # ------------------------------------------------------------------------------------------
    def dataset(self):
        from d2ct.data.challenge import ChallengeDataset

        return ChallengeDataset.open(self.data_root)

    def eval_split(self) -> str:
        wanted = self.cfg["data"]["eval_split"]
        if wanted != "auto":
            return wanted
        test = self.dataset().test_split()
        return "test" if test is not None and test.labels_path is not None else "val"

    def _split_options(self) -> dict:
        data = self.cfg["data"]
        return {"val_fraction": data["val_fraction"], "seed": data["split_seed"],
                "group_by": data.get("group_by") or None, "manifest": data.get("manifest") or None}

    def split_file(self) -> Path:
        """The split, decided once by the data stage (every later stage and training run reads it)."""
        return self.out / "data" / "splits_final.json"

    def splits(self) -> dict[str, list[str]]:
        from d2ct.data.splits import read_splits

        return read_splits(self.split_file())["splits"]

    def split_digest(self) -> str:
        """What the split file says, by content (not where it lies, so runs sharing radiologists agree)."""
        from d2ct.data.splits import read_splits

        record = read_splits(self.split_file())
        return fingerprint({"splits": record["splits"], "data_digest": record["data_digest"]})

    def _split_images(self, split: str) -> tuple[Path, list[str], Callable[[str], np.ndarray | None]]:
        from d2ct.data.register import split_names

        ds, names = split_names(self.dataset(), split, splits=self.splits())
        if ds is None or not names:
            raise StageError(f"{self.data_root}: the {split} split is empty ({self.split_file()})")
        return ds.image_dir, names, ds.label_map

    def eval_images(self) -> tuple[Path, list[str], Callable[[str], np.ndarray | None]]:
        """(image folder, names, truth label map by name) of the split the pipeline scores."""
        return self._split_images(self.eval_split())

    def stage_data(self) -> dict:
        from d2ct.data.coco import dataset_dicts, to_coco_json
        from d2ct.data.register import split_names
        from d2ct.data.splits import check_names, make_splits, write_splits

        data = self.cfg["data"]
        if data.get("phantom"):
            from d2ct.data.phantom import write_phantom_dataset

            write_phantom_dataset(self.data_root, **data["phantom"])
        ds = self.dataset()
        out = self.out / "data"
        record = make_splits(ds, **self._split_options())
        check_names(record, ds, self.split_file())
        write_splits(self.split_file(), record)
        counts = {}
        for split in ("train", "val", "unlabelled", "test"):
            split_ds, names = split_names(ds, split, splits=record["splits"])
            if split_ds is None or not names:
                continue
            with_annotations = split != "unlabelled" and split_ds.labels_path is not None
            dicts = dataset_dicts(split_ds, names, with_annotations=with_annotations)
            atomic_write_json(out / f"{self.name}_{split}.json",
                              to_coco_json(dicts, description=f"{self.name} {split}"), indent=None)
            counts[split] = {"images": len(names), "instances": sum(len(d.get("annotations", [])) for d in dicts)}
        from d2ct.visualization.overlay import overlay_grid

        preview = [(ds.image_path(n), ds.label_map(n), n) for n in ds.labelled_names[:8]]
        overlay_grid(preview, out / "preview.png", title=f"{self.name}: labelled slices")
        atomic_write_json(out / "summary.json", {"root": str(self.data_root), "shape": list(ds.shape),
                                                 "eval_split": self.eval_split(), "splits": counts,
                                                 "split_file": str(self.split_file())})
        return {"summary": str(out / "summary.json"), "splits": counts, "split_file": str(self.split_file())}

    # ------------------------------------------------------------------------------------------
    # classical baseline
    # ------------------------------------------------------------------------------------------
    def stage_baseline(self) -> dict:
        from d2ct.baseline.watershed import run_baseline

        b = self.cfg["baseline"]
        if not b["enabled"]:
            return {"skipped": True}
        folder, names, _ = self.eval_images()
        out = self.out / "baseline"
        settings = {"preset": b["preset"], "images": fingerprint(names), "split": self.split_digest()}
        if claim_folder(out, settings, what="baseline predictions") and (out / "predictions.csv").exists():
            logger.info("%s: made with these settings: reused", out / "predictions.csv")
        else:
            run_baseline(folder, out / "predictions.csv", b["preset"], names=names, workers=int(b["workers"]))
        return {"predictions": str(out / "predictions.csv")}

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------
    def _train_opts(self, output_dir: Path, train_sets: list[str], pseudo: list[str] | None = None,
                    model_opts: list | None = None) -> list[str]:
        opts = [
            "OUTPUT_DIR", str(output_dir),
            "D2CT.DATA_NAME", self.name,
            "D2CT.DATA_ROOT", str(self.data_root),
            "D2CT.SPLIT_FILE", str(self.split_file()),
            "DATASETS.TRAIN", "(" + "".join(f"'{s}'," for s in train_sets) + ")",
            "DATASETS.TEST", f"('{self.name}_val',)",
            "D2CT.PSEUDO_LABELS", json.dumps(pseudo or []),
        ]
        return opts + [str(o) for o in self.cfg["opts"]] + [str(o) for o in (model_opts or [])]

    def training_settings(self, config: str, opts: list[str]) -> dict:
        """What a trained model depends on: its whole merged config (bases and overrides included),
        the split and the pseudo-labels by content, and a local starting checkpoint by content. Paths
        that only say where things lie (OUTPUT_DIR, the split and pseudo-label files) are left out, so
        runs that share a radiologists_dir agree on what is the same model."""
        import yaml

        from d2ct.config import setup_cfg

        cfg = yaml.safe_load(setup_cfg(config, opts, quiet=True).dump())
        cfg.pop("OUTPUT_DIR", None)
        cfg["MODEL"].pop("DEVICE", None)  # the same model whether this host trains it on a GPU or not
        cfg["D2CT"].pop("SPLIT_FILE", None)
        pseudo = cfg["D2CT"].pop("PSEUDO_LABELS", [])
        weights = cfg["MODEL"].get("WEIGHTS")
        if weights and Path(weights).is_file():
            cfg["MODEL"]["WEIGHTS"] = "sha256:" + file_sha256(weights)
        return {"config": cfg, "split": self.split_digest(), "pseudo_labels": [file_sha256(p) for p in pseudo]}

    def _claim_training(self, config: str, output_dir: Path, train_sets: list[str], pseudo: list[str] | None = None,
                        model_opts: list | None = None) -> list | None:
        """The train_net arguments for one model, or None when ``output_dir`` holds a finished training
        with these settings. One that holds an unfinished training is resumed from its last
        checkpoint; one made with other settings is removed first, unless it lies outside this
        run's folder: then it is an error."""
        opts = self._train_opts(output_dir, train_sets, pseudo, model_opts)
        owned = output_dir.resolve().is_relative_to(self.out.resolve())
        if claim_folder(output_dir, self.training_settings(config, opts), owned=owned, what="a trained model",
                        at_default=config_key_at_default):
            if (output_dir / "model_final.pth").exists():
                logger.info("%s: already trained with these settings", output_dir)
                return None
            logger.info("%s: resuming an unfinished training with the same settings", output_dir)
        return ["--config", config, "--num-gpus", self.cfg["num_gpus"], "--resume", *opts]

    def train(self, config: str, output_dir: Path, train_sets: list[str], pseudo: list[str] | None = None,
              model_opts: list | None = None) -> Path:
        """Train one model (skipped when already trained, resumed when unfinished)."""
        args = self._claim_training(config, output_dir, train_sets, pseudo, model_opts)
        if args is not None:
            self._run_tool("train_net.py", args, output_dir.name)
        return output_dir

    def train_all(self, specs: list[dict]) -> list[Path]:
        """Train models that do not depend on each other (each spec: :meth:`train`'s arguments): one
        after another, or ``parallel_trainings`` at a time."""
        if int(self.cfg["parallel_trainings"]) <= 1 or len(specs) <= 1:
            return [self.train(s["config"], s["output_dir"], s["train_sets"], s.get("pseudo"), model_opts=s.get("model_opts"))
                    for s in specs]
        jobs = []
        for spec in specs:
            args = self._claim_training(**spec)
            if args is not None:
                jobs.append(("train_net.py", args, spec["output_dir"].name))
        if jobs:
            self._run_tools_at_once(jobs)
        return [spec["output_dir"] for spec in specs]

    def radiologists_root(self) -> Path:
        return Path(self.cfg.get("radiologists_dir") or self.out / "radiologists")

    def radiologist_dirs(self) -> list[Path]:
        return [Path(r["dir"]) if r.get("dir") else self.radiologists_root() / r["name"]
                for r in self.cfg["radiologists"]]

    def stage_radiologists(self) -> dict:
        outputs, specs = {}, []
        for r, out in zip(self.cfg["radiologists"], self.radiologist_dirs()):
            if r.get("dir"):  # trained before, elsewhere: a teacher as it is
                logger.info("radiologist %s: trained before (%s): used as it is", r["name"], out)
            else:
                specs.append(dict(config=r["config"], output_dir=out, train_sets=[f"{self.name}_train"],
                                  model_opts=r["opts"]))
            outputs[r["name"]] = str(out)
        self.train_all(specs)
        return outputs

    # ------------------------------------------------------------------------------------------
    # rounds: teachers -> pseudolabels_r1 -> student_r1 -> pseudolabels_r2 -> student_r2 -> ...
    # (round 1 is taught by the radiologists, round k by student k-1; the last student is final)
    # ------------------------------------------------------------------------------------------
    def rounds(self) -> int:
        return int(self.cfg["pseudolabel"]["rounds"])

    def pseudolabel_dir(self, round_: int) -> Path:
        return self.out / f"pseudolabels_r{round_}"

    def student_name(self, round_: int) -> str:
        return f"student_r{round_}"

    def student_dir(self, round_: int) -> Path:
        return self.out / self.student_name(round_)

    def control_name(self) -> str | None:
        """The round-1 student's labelled-only control of equal compute (final.control), or None."""
        return "control_r1" if self.cfg["final"].get("control") else None

    def final_model_name(self) -> str:
        """The model whose predictions make the submission: the last round's student."""
        return self.student_name(self.rounds())

    def teachers(self, round_: int) -> list[tuple[str, Path, float]]:
        """(name, folder, score threshold) of the models that label the pool in ``round_``."""
        if round_ == 1:
            return [(r["name"], d, r["threshold"]) for r, d in zip(self.cfg["radiologists"], self.radiologist_dirs())]
        return [(self.student_name(round_ - 1), self.student_dir(round_ - 1), self.cfg["final"]["teach_threshold"])]

    def _pseudolabel(self, round_: int) -> Path:
        from d2ct.engine.predictor import trained_weights

        p = self.cfg["pseudolabel"]
        out = self.pseudolabel_dir(round_)
        teachers = self.teachers(round_)
        mode = p["mode"] if round_ == 1 else "partition"  # one teacher: it labels the whole pool
        settings = {"round": round_, "mode": mode, "split": self.split_digest(),
                    "teachers": [{"name": n, "threshold": t, "weights_sha256": file_sha256(trained_weights(d))}
                                 for n, d, t in teachers],
                    "pseudolabel": {k: v for k, v in p.items() if k not in ("rounds", "mode")}}
        if claim_folder(out, settings, what="pseudo-labels") and (out / "pseudo_labels.json").exists() \
                and (out / "stats.json").exists():
            logger.info("%s: made with these settings: reused", out)
            return out
        args = ["--models", *[d for _, d, _ in teachers], "--names", *[n for n, _, _ in teachers],
                "--thresholds", *[t for _, _, t in teachers], "--mode", mode,
                "--data", self.data_root,
                "--out", out, "--min-area", p["min_area"], "--seed", p["seed"], "--batch-size", p["batch_size"],
                "--num-gpus", self.cfg["num_gpus"], "--min-votes", p["min_votes"],
                "--single-model-score", p["single_model_score"]]
        if p["flip_tta"]:
            args.append("--flip-tta")
        if p["limit"]:
            args += ["--limit", p["limit"]]
        if p["ignore_below"] is not None:
            args += ["--ignore-below", p["ignore_below"]]
        self._run_tool("pseudolabel.py", args, out.name)
        return out

    def stage_pseudolabel(self) -> dict:
        if not self.cfg["final"]["pseudo_labels"]:
            # a labelled-only run (or an online teacher): labelling the pool would cost the radiologists'
            # inference over every pool slice for files no student reads
            logger.info("final.pseudo_labels is false: the pool is not labelled (no student would use it)")
            return {"pseudo_labels": None}
        out = self._pseudolabel(1)
        return {"pseudo_labels": str(out / "pseudo_labels.json"), "stats": read_json(out / "stats.json")}

    def final_init_weights(self, round_: int) -> str | None:
        """The checkpoint the round's student starts from, or None (its config's MODEL.WEIGHTS).

        ``final.init: best`` picks the radiologist with the highest validation mask AP (its
        model_best.json); a name picks that one. The weights must fit the student's
        architecture: a different backbone would load only in part, so it is an error."""
        init = self.cfg["final"]["init"]
        if init == "scratch":
            return None
        if round_ > 1:
            teacher = self.student_dir(round_ - 1)
        else:
            from d2ct.pseudolabel.radiologists import Radiologist

            dirs = {r["name"]: d for r, d in zip(self.cfg["radiologists"], self.radiologist_dirs())}
            if init == "best":
                aps = {n: Radiologist.from_output_dir(d, name=n).ap for n, d in dirs.items()}
                init_name = max(aps, key=aps.get)
                logger.info("student round 1 starts from radiologist %s, the best by validation mask AP "
                            "(%.1f)", init_name, aps[init_name])
            else:
                init_name = init
            teacher = dirs[init_name]
        from d2ct.engine.predictor import load_trained

        teacher_cfg, weights = load_trained(teacher)
        final_cfg = self._final_cfg()
        for key in ("RESNETS.DEPTH", "RESNETS.NUM_GROUPS", "RESNETS.WIDTH_PER_GROUP", "RESNETS.NORM",
                    "RESNETS.STRIDE_IN_1X1", "RESNETS.RES2_OUT_CHANNELS", "FPN.NORM", "ROI_BOX_HEAD.NAME", "ROI_BOX_HEAD.NUM_CONV"):
            section, field = key.split(".")
            a, b = teacher_cfg.MODEL[section][field], final_cfg.MODEL[section][field]
            if a != b:
                raise StageError(
                    f"final.init={init}: {teacher} has MODEL.{key}={a!r} but the final config "
                    f"{self.cfg['final']['config']} has {b!r}; its weights would load only in part. Name a "
                    f"radiologist with the final model's architecture in final.init, or use final.init=scratch")
        return weights

    def _final_cfg(self):
        from d2ct.config import setup_cfg

        return setup_cfg(self.cfg["final"]["config"], [str(o) for o in self.cfg["opts"] + self.cfg["final"]["opts"]])

    def stage_final(self) -> dict:
        outputs = {}
        for round_ in range(1, self.rounds() + 1):
            folder = self._pseudolabel(round_) if self.cfg["final"]["pseudo_labels"] else None
            opts = list(self.cfg["final"]["opts"])
            weights = self.final_init_weights(round_)
            if weights:
                opts += ["MODEL.WEIGHTS", weights]
            train_sets, pseudo = [f"{self.name}_train"], None
            if not self.cfg["final"]["pseudo_labels"]:
                logger.info("round %d: final.pseudo_labels is false: the student trains on the labelled images%s",
                            round_, ", and on the pool through its online teacher (D2CT.MEAN_TEACHER)"
                            if online_teacher(self.cfg) else " only")
            elif read_json(folder / "stats.json")["labelled_images"] == 0:
                logger.warning("round %d: no pool image kept a pseudo-label above the thresholds; the student "
                               "trains on the labelled images only", round_)
            else:
                repeat = int(self.cfg["final"]["labelled_repeat"])
                train_sets = train_sets * repeat + [f"{self.name}_pseudo"]
                pseudo = [str(folder / "pseudo_labels.json")]
                if repeat > 1:
                    logger.info("round %d: the labelled split is listed %d times next to the pseudo-labels",
                                round_, repeat)
            specs = [dict(config=self.cfg["final"]["config"], output_dir=self.student_dir(round_),
                          train_sets=train_sets, pseudo=pseudo, model_opts=opts)]
            names = [self.student_name(round_)]
            if round_ == 1 and self.control_name():
                # equal compute: the student's config, opts and start; the labelled split alone
                logger.info("round 1: training %s, the student's labelled-only control (final.control)",
                            self.control_name())
                control_opts = opts + (["D2CT.MEAN_TEACHER.ENABLED", False] if online_teacher(self.cfg) else [])
                specs.append(dict(config=self.cfg["final"]["config"], output_dir=self.out / self.control_name(),
                                  train_sets=[f"{self.name}_train"], pseudo=None, model_opts=control_opts))
                names.append(self.control_name())
            for name, out in zip(names, self.train_all(specs)):
                outputs[name] = str(out)
        return outputs

    # ------------------------------------------------------------------------------------------
    # predictions of every model on the evaluation split
    # ------------------------------------------------------------------------------------------
    def models(self) -> list[tuple[str, Path]]:
        """(name, folder) of every model the run scores: the radiologists, each round's student, then
        the labelled-only control when final.control is on."""
        models = [(r["name"], d) for r, d in zip(self.cfg["radiologists"], self.radiologist_dirs())]
        models += [(self.student_name(k), self.student_dir(k)) for k in range(1, self.rounds() + 1)]
        if self.control_name():
            models.append((self.control_name(), self.out / self.control_name()))
        return models

    def slice_shape(self) -> tuple[int, int]:
        """(H, W) of the data set's slices, from the data stage's summary."""
        return tuple(read_json(self.out / "data" / "summary.json")["shape"])

    def val_images(self) -> tuple[Path, list[str], Callable[[str], np.ndarray | None]]:
        """(image folder, names, truth label map by name) of the validation split."""
        if not self.splits()["val"]:
            raise StageError(f"{self.data_root}: the validation split is empty: predict.score_threshold "
                             "val needs one (data.val_fraction)")
        return self._split_images("val")

    def _predict_instances(self, name: str, model_dir: Path, folder: Path, names: list[str],
                           out: Path) -> dict[str, tuple[list[dict], np.ndarray]]:
        """Every scored instance of one model on ``names`` (name -> (RLEs, scores)), kept in
        ``out/<name>_instances.json``. Label maps are flattened from them, so a new threshold needs no
        model. Saved instances are reused when they cover ``names`` and were made with this
        checkpoint (by content) and flip TTA setting; otherwise predicted again."""
        from d2ct.engine.predictor import prediction_source, source_changes, trained_weights
        from d2ct.postprocess.submission import load_instances, read_instances

        pr = self.cfg["predict"]
        instances = out / f"{name}_instances.json"
        if instances.exists():
            try:
                saved, loaded = read_instances(instances)
            except DataError as e:  # damaged outside d2ct (its writes are atomic): keep it aside, predict again
                aside = instances.with_name(instances.name + ".unreadable")
                instances.replace(aside)
                logger.warning("%s; moved to %s: predicting again", e, aside)
                saved, loaded = None, {}
            if not set(names) <= set(loaded):
                logger.info("%s: %d slice(s) missing: predicting again", instances, len(set(names) - set(loaded)))
            elif saved is None:  # saved before d2ct recorded what instances were made with
                logger.info("%s: reused as saved (no record of its checkpoint; --from predict predicts again)",
                            instances)
                return loaded
            else:
                changed = source_changes(saved, prediction_source(trained_weights(model_dir), pr["flip_tta"]))
                if not changed:
                    return loaded
                logger.info("%s: made with another %s: predicting again", instances, " and ".join(changed))
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "images.txt", "\n".join(names) + "\n")
        args = ["--model", model_dir, "--input", folder, "--list", out / "images.txt", "--instances", instances,
                "--batch-size", pr["batch_size"], "--num-gpus", self.cfg["num_gpus"]]
        if pr["flip_tta"]:
            args.append("--flip-tta")
        self._run_tool("predict.py", args, f"predict_{name}" if out.name == "predict" else f"predict_{name}_{out.name}")
        return load_instances(instances)

    def stage_predict(self) -> dict:
        from d2ct.postprocess.submission import PostprocessOptions, label_maps_from_instances, write_submission
        from d2ct.postprocess.threshold import best_threshold, threshold_scores

        pr = self.cfg["predict"]
        folder, names, _ = self.eval_images()
        out = self.out / "predict"
        tune = pr["score_threshold"] == "val"
        if tune:
            val_folder, val_names, val_truth_of = self.val_images()
            val_truth = [val_truth_of(n) for n in val_names]
            if self.eval_split() == "val":
                logger.warning("predict.score_threshold val: the thresholds are chosen on the split the "
                               "scores are reported on, so those scores are optimistic")
        # min_area and fallback are the config's; the score threshold is set per model below
        post = PostprocessOptions(min_area=pr["min_area"], fallback_top_k=pr["fallback_top_k"])
        shape = self.slice_shape()
        thresholds, outputs = {}, {}
        for name, model_dir in self.models():
            instances = self._predict_instances(name, model_dir, folder, names, out)
            if tune:
                val_instances = self._predict_instances(name, model_dir, val_folder, val_names, out / "val")
                scores = threshold_scores(val_instances, val_names, val_truth, post, pr["threshold_grid"])
                thresholds[name] = {"threshold": best_threshold(scores), "chosen_on": "val",
                                    "val_ARI": {f"{t:g}": round(v, 4) for t, v in scores.items()}}
                logger.info("%s: score threshold %g (validation ARI %.3f; %s)", name, thresholds[name]["threshold"],
                            max(scores.values()), ", ".join(f"{t:g}: {v:.3f}" for t, v in scores.items()))
            else:
                thresholds[name] = {"threshold": float(pr["score_threshold"]), "chosen_on": "config"}
            options = dataclasses.replace(post, score_threshold=thresholds[name]["threshold"])
            csv = out / f"{name}.csv"
            maps = label_maps_from_instances(instances, names, options, shape=shape)
            write_submission(csv, names, maps)
            outputs[name] = str(csv)
        atomic_write_json(out / "thresholds.json", thresholds)
        submission = self.out / "submission.csv"
        shutil.copyfile(out / f"{self.final_model_name()}.csv", str(submission) + ".tmp")
        os.replace(str(submission) + ".tmp", submission)
        outputs["submission"] = str(submission)
        outputs["thresholds"] = str(out / "thresholds.json")
        return outputs

    # ------------------------------------------------------------------------------------------
    # scores
    # ------------------------------------------------------------------------------------------
    def stage_evaluate(self) -> dict:
        from d2ct.data.labels_csv import read_labels_csv
        from d2ct.evaluation.coco_ap import coco_ap, label_map_to_rles
        from d2ct.evaluation.report import evaluate_label_maps, write_report
        from d2ct.postprocess.submission import load_instances

        _, names, truth_of = self.eval_images()
        truth = [truth_of(n) for n in names]
        if any(t is None for t in truth):
            raise StageError(f"the {self.eval_split()} split has no labels: nothing to evaluate against")
        shape = truth[0].shape
        gt_rles = [label_map_to_rles(t)[0] for t in truth]
        sources = []
        if self.cfg["baseline"]["enabled"]:
            sources.append(("baseline", self.out / "baseline" / "predictions.csv", None))
        for name, _ in self.models():
            sources.append((name, self.out / "predict" / f"{name}.csv", self.out / "predict" / f"{name}_instances.json"))
        thresholds_file = self.out / "predict" / "thresholds.json"
        thresholds = read_json(thresholds_file) if thresholds_file.exists() else {}
        table = []
        for name, csv, instances_file in sources:
            pred = read_labels_csv(csv, expected_pixels=shape[0] * shape[1])
            maps = [pred.label_map(n, shape) for n in names]
            result = evaluate_label_maps(names, truth, maps, with_ap=instances_file is None)
            summary = dict(result.summary)
            if instances_file is not None:  # mask AP on the scored instances, before flattening
                inst = load_instances(instances_file)
                preds = [list(zip(inst[n][0], inst[n][1].tolist())) for n in names]
                summary.update(coco_ap(gt_rles, preds, [shape] * len(names)))
            write_report(type(result)(result.per_image, summary), self.out / "evaluate" / name, title=name)
            row = {"model": name, **summary}
            if name in thresholds:  # the score threshold its label maps were flattened at
                row["threshold"] = thresholds[name]["threshold"]
            table.append(row)
        atomic_write_json(self.out / "evaluate" / "table.json", table)
        return {"table": str(self.out / "evaluate" / "table.json")}

    def stage_report(self) -> dict:
        from .report import write_pipeline_report

        path = write_pipeline_report(self)
        return {"report": str(path)}

    # ------------------------------------------------------------------------------------------
    def run(self, from_stage: str | None = None, until: str | None = None) -> dict:
        if from_stage:
            self.reset_from(from_stage)
        self.out.mkdir(parents=True, exist_ok=True)
        last = STAGES.index(until) if until else len(STAGES) - 1
        results = {}
        for stage in STAGES[: last + 1]:
            if self.is_done(stage) and not results:  # after a stage has run, every later one runs too
                logger.info("stage %-12s done (skipped)", stage)
                self.timings[stage] = read_json(self._marker(stage)).get("seconds", 0.0)
                continue
            logger.info("stage %-12s running", stage)
            start = time.time()
            outputs = getattr(self, f"stage_{stage}")()
            seconds = time.time() - start
            self.timings[stage] = seconds
            self._mark_done(stage, seconds, outputs)
            logger.info("stage %-12s finished in %.0f s", stage, seconds)
            results[stage] = outputs
        return results
