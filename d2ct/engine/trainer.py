"""Trainer: Detectron2's DefaultTrainer with CT data, d2ct evaluation and resumable best checkpoints."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import weakref

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from d2ct.modeling import apply_model_noise
from d2ct.utils.resources import THREADS_FILE_ENV
from d2ct.visualization.curves import plot_training_curves

from . import precision
from .checkpoint import AtomicCheckpointer, BestCheckpointer
from .mapper import CTDatasetMapper

logger = logging.getLogger(__name__)


def wrap_ddp(model, device: str):
    """DistributedDataParallel when there are several processes; CPU modules take no device_ids."""
    if comm.get_world_size() == 1:
        return model
    if device.startswith("cuda"):
        return create_ddp_model(model, broadcast_buffers=False)
    return create_ddp_model(model, broadcast_buffers=False, device_ids=None)


class CPUBF16Trainer(SimpleTrainer):
    """SimpleTrainer whose forward pass (model and losses) runs under bfloat16 autocast on the CPU.

    Detectron2's AMPTrainer asserts CUDA and scales the loss for float16; bfloat16 has float32's
    exponent range, so gradients cannot underflow and no GradScaler is needed: the backward pass
    and the optimiser step stay as in SimpleTrainer (float32 weights and gradients)."""

    def run_step(self):
        assert self.model.training, "[CPUBF16Trainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with precision.autocast(True):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_step_trainer(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """The object that runs one training step: AMPTrainer (CUDA, SOLVER.AMP.ENABLED), CPUBF16Trainer
    (CPU with native bfloat16, D2CT.CPU_BF16) or SimpleTrainer (float32)."""
    if cfg.SOLVER.AMP.ENABLED and str(cfg.MODEL.DEVICE).startswith("cuda"):
        return AMPTrainer(model, data_loader, optimizer)
    if precision.use_cpu_bf16(cfg):
        return CPUBF16Trainer(model, data_loader, optimizer)
    return SimpleTrainer(model, data_loader, optimizer)


class TrainingCurves(hooks.HookBase):
    """Writes training_curves.png from metrics.json after training (and at each evaluation)."""

    def __init__(self, output_dir: str, eval_period: int, title: str = ""):
        self._output_dir = output_dir
        self._period = eval_period
        self._title = title

    def _plot(self):
        metrics = os.path.join(self._output_dir, "metrics.json")
        if os.path.exists(metrics):
            try:
                plot_training_curves(metrics, os.path.join(self._output_dir, "training_curves.png"), self._title)
            except Exception as e:  # a plot must never stop training
                logger.warning("Could not plot training curves: %s", e)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if self._period > 0 and next_iter % self._period == 0 and next_iter != self.trainer.max_iter:
            self._plot()

    def after_train(self):
        self._plot()


class PruneCheckpoints(hooks.HookBase):
    """Keeps the newest ``keep`` periodic checkpoints (model_0000099.pth, ...) in ``output_dir``.

    Detectron2 keeps every one (about 175 MB each for an R50 from scratch, so 2 GB for a
    1200-iteration CPU run with CHECKPOINT_PERIOD 100). This looks at the files, not at what this
    process saved, so checkpoints left by a killed run are pruned after a resume too.
    model_final.pth and model_best.pth never match.
    """

    PATTERN = re.compile(r"model_(\d{7})\.pth")

    def __init__(self, output_dir: str, period: int, keep: int):
        self._output_dir = output_dir
        self._period = period
        self._keep = keep

    def after_step(self):
        if (self.trainer.iter + 1) % self._period == 0:
            prune_checkpoints(self._output_dir, self._keep)


class ThreadShare(hooks.HookBase):
    """Follows a file that holds this training's share of the CPU threads (one whole number).

    The pipeline runs several trainings side by side, each on its share of the cores; when one
    ends, it writes the larger share into the others' files (d2ct.pipeline.runner), so the last
    training does not go on with one thread beside idle cores. Read between steps, when changed."""

    def __init__(self, path: str):
        self._path = path
        self._seen = None

    def before_step(self):
        try:
            stamp = os.stat(self._path).st_mtime_ns
        except FileNotFoundError:
            return
        if stamp == self._seen:
            return
        self._seen = stamp
        try:
            with open(self._path) as f:
                threads = int(f.read().strip())
        except (OSError, ValueError):  # half written or not a number: try again when it changes
            return
        if threads >= 1 and threads != torch.get_num_threads():
            logger.info("CPU threads: %d -> %d (%s)", torch.get_num_threads(), threads, self._path)
            torch.set_num_threads(threads)


def prune_checkpoints(output_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` periodic checkpoints; returns the deleted names."""
    found = sorted((int(m.group(1)), name) for name in os.listdir(output_dir)
                   if (m := PruneCheckpoints.PATTERN.fullmatch(name)))
    doomed = [name for _, name in found[:-keep]] if keep > 0 else []
    for name in doomed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, name))
    if doomed:
        logger.info("Removed %d older checkpoint(s) (D2CT.CHECKPOINTS_TO_KEEP %d): %s", len(doomed), keep,
                    ", ".join(doomed))
    return doomed


class Trainer(DefaultTrainer):
    """DefaultTrainer for d2ct.

    Differences from Detectron2's: CT dataset mapper; CTSegmentationEvaluator (mask AP, ARI,
    Dice); checkpoints written atomically; the best checkpoint by D2CT.BEST_METRIC kept as
    model_best.pth with its scores in model_best.json; training curves as a PNG; and
    DistributedDataParallel on CPU processes (gloo) as well as GPUs.
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # D2CT.MEAN_TEACHER: an EMA teacher labels the pool online (d2ct.engine.mean_teacher); its
        # weights are set from the student's in resume_or_load, and saved in every checkpoint
        self.teacher = None
        if cfg.D2CT.MEAN_TEACHER.ENABLED:
            from .mean_teacher import make_teacher

            self.teacher = make_teacher(model)
        model = wrap_ddp(model, cfg.MODEL.DEVICE)
        if self.teacher is not None:
            from .mean_teacher import MeanTeacherStep, build_unlabelled_loader

            self._trainer = MeanTeacherStep(model, data_loader, build_unlabelled_loader(cfg), optimizer,
                                            self.teacher, cfg, bf16=precision.use_cpu_bf16(cfg))
        else:
            self._trainer = build_step_trainer(cfg, model, data_loader, optimizer)
        logger.info("Training step: %s%s", type(self._trainer).__name__,
                    ", channels-last" if cfg.D2CT.CHANNELS_LAST and cfg.MODEL.DEVICE.startswith("cpu") else "")
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
                                               **({"mean_teacher": self.teacher} if self.teacher is not None else {}))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model, with the student's model noise (D2CT.MODEL_NOISE: stochastic depth,
        box-head dropout; training mode only), channels-last on the CPU (D2CT.CHANNELS_LAST) and
        with its score, box and mask logit layers in float32 under bfloat16 autocast (D2CT.CPU_BF16)."""
        model = super().build_model(cfg)
        added = apply_model_noise(model, cfg)
        if added:
            logger.info("Model noise: %s", ", ".join(
                f"stochastic depth over {len(v)} blocks up to {max(v):g}" if k == "drop_path"
                else f"dropout {cfg.D2CT.MODEL_NOISE.BOX_HEAD_DROPOUT:g} in {len(v)} box-head layers"
                for k, v in added.items()))
        precision.prepare_model(model, cfg)
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=CTDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=CTDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        from d2ct.evaluation.evaluator import CTSegmentationEvaluator

        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        post = cfg.D2CT.POSTPROCESS
        return CTSegmentationEvaluator(
            dataset_name,
            output_dir=output_folder,
            score_threshold=post.SCORE_THRESHOLD,
            min_area=post.MIN_AREA,
            fallback_top_k=post.FALLBACK_TOP_K,
        )

    def build_hooks(self):
        ret = super().build_hooks()
        cfg = self.cfg
        if comm.is_main_process():
            # After the EvalHook (which stores the scores), before the PeriodicWriter.
            eval_index = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
            extra = {"role": cfg.D2CT.ROLE, "datasets_test": list(cfg.DATASETS.TEST)}
            if cfg.DATASETS.TEST and cfg.D2CT.BEST_METRIC:
                ret.insert(eval_index + 1, BestCheckpointer(
                    cfg.TEST.EVAL_PERIOD, self.checkpointer, cfg.D2CT.BEST_METRIC, cfg.OUTPUT_DIR, extra=extra))
            if cfg.D2CT.CHECKPOINTS_TO_KEEP > 0:
                save_index = next(i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicCheckpointer))
                ret.insert(save_index + 1, PruneCheckpoints(cfg.OUTPUT_DIR, cfg.SOLVER.CHECKPOINT_PERIOD,
                                                            cfg.D2CT.CHECKPOINTS_TO_KEEP))
            if cfg.D2CT.CURVES:
                ret.append(TrainingCurves(cfg.OUTPUT_DIR, cfg.TEST.EVAL_PERIOD, title=cfg.D2CT.ROLE or cfg.OUTPUT_DIR))
        if os.environ.get(THREADS_FILE_ENV) and comm.get_world_size() == 1 and not cfg.MODEL.DEVICE.startswith("cuda"):
            ret.insert(0, ThreadShare(os.environ[THREADS_FILE_ENV]))
        return ret

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.teacher is not None and self.start_iter == 0:  # a new run: the teacher starts as the student
            student = getattr(self.model, "module", self.model)
            self.teacher.load_state_dict(student.state_dict())
        if resume and self.start_iter > 0:
            logger.info("Resumed from %s at iteration %d of %d",
                        self.checkpointer.get_checkpoint_file(), self.start_iter, self.max_iter)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        # validation in bfloat16 too where training is (D2CT.CPU_BF16)
        with torch.no_grad(), precision.autocast(precision.use_cpu_bf16(cfg)):
            return super().test(cfg, model, evaluators)
