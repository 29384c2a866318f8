"""Online teacher-student training (``D2CT.MEAN_TEACHER``): Mean Teacher / Unbiased Teacher on Detectron2.

The offline method labels the pool once and trains a student on frozen pseudo-labels. Here the
teacher is an exponential moving average (EMA) of the student and labels the pool as training
goes (Tarvainen & Valpola 2017; Unbiased Teacher, Liu et al. 2021, built on Detectron2):

- each step takes a labelled batch (the usual losses) and an unlabelled batch of the same size;
- every unlabelled slice comes in two views from one read (:class:`TwoViewMapper`): the *weak*
  view (the teachers' mild policy, ``D2CT.AUGMENT``) and a *strong* view made from the weak one by
  the student's policy (``D2CT.AUGMENT.STUDENT``: scale, rotation, elastic, intensity, noise, blur,
  cutout), whose transforms are kept;
- the EMA teacher predicts the weak view; its instances scored at least ``SCORE_THRESHOLD`` are
  carried into the strong view through the same transforms (masks warped, boxes recomputed from
  them: :func:`pseudo_instances`), and the student learns them there; an unlabelled slice where the
  teacher finds nothing teaches background;
- only the losses in ``UNSUP_LOSSES`` count on the unlabelled batch (Unbiased Teacher keeps the
  classification losses: a pseudo box is not precise enough to regress to), each times
  ``UNSUP_WEIGHT``, after ``BURN_IN_ITERS`` steps of labelled data alone;
- after each optimiser step the teacher moves toward the student: ``t = d * t + (1 - d) * s``
  (``EMA_DECAY``); its weights are saved in every checkpoint (``mean_teacher``) so a killed run
  resumes with them. Evaluation, ``model_best.pth`` and prediction use the student, as for every
  other model.
"""
from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.engine import SimpleTrainer
from detectron2.structures import BitMasks, Instances
from detectron2.utils.events import get_event_storage

from d2ct.errors import ConfigError

from . import precision
from .mapper import CTDatasetMapper, read_model_image

logger = logging.getLogger(__name__)

LOSSES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")


def check_mean_teacher(cfg) -> None:
    """Errors that name the key, for a config with D2CT.MEAN_TEACHER.ENABLED."""
    mt = cfg.D2CT.MEAN_TEACHER
    if not mt.ENABLED:
        return
    if not mt.UNLABELLED_DATASETS:
        raise ConfigError("D2CT.MEAN_TEACHER.ENABLED needs D2CT.MEAN_TEACHER.UNLABELLED_DATASETS "
                          "(the registered pool, e.g. ('phantom_unlabelled',))")
    if not cfg.D2CT.AUGMENT.STUDENT.ENABLED:
        raise ConfigError("D2CT.MEAN_TEACHER.ENABLED needs D2CT.AUGMENT.STUDENT.ENABLED True: the student's "
                          "strong augmentation makes the strong view of each unlabelled slice")
    if not 0.0 < float(mt.EMA_DECAY) < 1.0:
        raise ConfigError(f"D2CT.MEAN_TEACHER.EMA_DECAY must lie strictly between 0 and 1, got {mt.EMA_DECAY!r}")
    if not 0.0 <= float(mt.SCORE_THRESHOLD) <= 1.0:
        raise ConfigError(f"D2CT.MEAN_TEACHER.SCORE_THRESHOLD must be a score from 0 to 1, got {mt.SCORE_THRESHOLD!r}")
    if float(mt.UNSUP_WEIGHT) < 0 or int(mt.BURN_IN_ITERS) < 0 or int(mt.MIN_AREA) < 0:
        raise ConfigError("D2CT.MEAN_TEACHER: UNSUP_WEIGHT, BURN_IN_ITERS and MIN_AREA must be >= 0")
    unknown = sorted(set(mt.UNSUP_LOSSES) - set(LOSSES))
    if unknown or not mt.UNSUP_LOSSES:
        raise ConfigError(f"D2CT.MEAN_TEACHER.UNSUP_LOSSES: {', '.join(unknown) or 'empty'}; "
                          f"choose from {', '.join(LOSSES)}")
    if not cfg.MODEL.MASK_ON:
        raise ConfigError("D2CT.MEAN_TEACHER needs MODEL.MASK_ON: pseudo-instances are masks")


class TwoViewMapper(CTDatasetMapper):
    """An unlabelled slice as two views: ``image`` (weak: the mild policy) and ``strong_image`` (the
    student's policy applied on top of the weak view), with ``strong_transforms``, which carry
    anything drawn on the weak view into the strong one."""

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        cfg = cfg.clone()  # no copy-paste: the teacher draws on the views after they are made
        cfg.defrost()
        cfg.D2CT.AUGMENT.STUDENT.COPY_PASTE_PROB = 0.0
        return super().from_config(cfg, is_train)

    def __call__(self, dataset_dict):
        image = read_model_image(dataset_dict["file_name"])
        weak = T.AugInput(image)
        self.augmentations(weak)
        strong = T.AugInput(weak.image.copy())
        strong_transforms = self.student_augmentations(strong)
        as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a.transpose(2, 0, 1)))  # noqa: E731
        return {"file_name": dataset_dict["file_name"], "image_id": dataset_dict.get("image_id"),
                "height": weak.image.shape[0], "width": weak.image.shape[1],
                "image": as_tensor(weak.image), "strong_image": as_tensor(strong.image),
                "strong_transforms": strong_transforms}


def build_unlabelled_loader(cfg):
    """The pool's loader (D2CT.MEAN_TEACHER.UNLABELLED_DATASETS): slices without annotations, kept
    (Detectron2's loader drops empty slices by default), two views each."""
    dicts = get_detection_dataset_dicts(list(cfg.D2CT.MEAN_TEACHER.UNLABELLED_DATASETS), filter_empty=False)
    if not dicts:
        raise ConfigError(f"D2CT.MEAN_TEACHER.UNLABELLED_DATASETS {list(cfg.D2CT.MEAN_TEACHER.UNLABELLED_DATASETS)} "
                          "hold no slices")
    # read in the main process: a second loader's worker processes forked beside the first one's
    # hung the first step (seen with DATALOADER.NUM_WORKERS 2); two views of a slice cost
    # milliseconds next to the teacher's and the student's passes
    return build_detection_train_loader(dataset=dicts, mapper=TwoViewMapper(cfg, is_train=True),
                                        total_batch_size=cfg.SOLVER.IMS_PER_BATCH, num_workers=0)


def pseudo_instances(found: Instances, strong_transforms, strong_size: tuple[int, int], threshold: float,
                     min_area: int = 0) -> Instances:
    """The teacher's instances on the weak view (``pred_masks`` pasted to the image, ``scores``,
    ``pred_classes``) as training targets on the strong view: scored >= ``threshold``, masks carried
    through ``strong_transforms``, boxes recomputed from the warped masks (tight after a rotation),
    structures left with fewer than ``min_area`` pixels (pushed out of the crop) dropped."""
    keep = found.scores >= threshold
    masks = found.pred_masks[keep].cpu().numpy().astype(np.uint8)
    classes = found.pred_classes[keep].cpu()
    warped = [strong_transforms.apply_segmentation(m) for m in masks]
    warped = np.stack(warped) if warped else np.zeros((0, *strong_size), np.uint8)
    big = warped.sum(axis=(1, 2)) >= max(min_area, 1)
    target = Instances(strong_size)
    bit = BitMasks(torch.from_numpy(warped[big] > 0))
    target.gt_masks = bit
    target.gt_boxes = bit.get_bounding_boxes()
    target.gt_classes = classes[torch.from_numpy(big)].long()
    return target


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher = decay * teacher + (1 - decay) * student, parameter by parameter; integer buffers
    (step counters) are copied."""
    student = getattr(student, "module", student)  # DistributedDataParallel
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, t in t_state.items():
        s = s_state[name].detach()
        if t.dtype.is_floating_point:
            t.mul_(decay).add_(s.to(t.dtype), alpha=1.0 - decay)
        else:
            t.copy_(s)


def make_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """The EMA teacher: a frozen copy of the (unwrapped) student, in eval mode."""
    teacher = copy.deepcopy(getattr(model, "module", model))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class MeanTeacherStep(SimpleTrainer):
    """One step of online teacher-student training (see the module docs); bfloat16 autocast on the
    CPU where ``bf16`` (as d2ct's CPUBF16Trainer), float32 otherwise."""

    def __init__(self, model, data_loader, unlabelled_loader, optimizer, teacher, cfg, bf16: bool = False):
        super().__init__(model, data_loader, optimizer)
        mt = cfg.D2CT.MEAN_TEACHER
        self.teacher = teacher
        self.unlabelled_loader = unlabelled_loader
        self._unlabelled_iter = None
        self.decay, self.threshold = float(mt.EMA_DECAY), float(mt.SCORE_THRESHOLD)
        self.weight, self.burn_in = float(mt.UNSUP_WEIGHT), int(mt.BURN_IN_ITERS)
        self.losses, self.min_area = tuple(mt.UNSUP_LOSSES), int(mt.MIN_AREA)
        self.bf16 = bf16

    def _teach(self, views: list[dict]) -> list[dict]:
        """The strong views with the teacher's instances on them."""
        from detectron2.layers.mask_ops import paste_masks_in_image

        self.teacher.eval()
        found = self.teacher.inference([{"image": v["image"]} for v in views], do_postprocess=False)
        batch = []
        for view, inst in zip(views, found):
            inst = inst.to("cpu")  # (no instances: an empty mask stack, as Detectron2's own postprocess)
            inst.pred_masks = paste_masks_in_image(inst.pred_masks[:, 0].float(), inst.pred_boxes,
                                                   inst.image_size, threshold=0.5)
            size = tuple(view["strong_image"].shape[1:])
            batch.append({"image": view["strong_image"],
                          "instances": pseudo_instances(inst, view["strong_transforms"], size, self.threshold,
                                                        self.min_area)})
        return batch

    def run_step(self):
        assert self.model.training, "[MeanTeacherStep] model was changed to eval mode!"
        if self._unlabelled_iter is None:
            self._unlabelled_iter = iter(self.unlabelled_loader)
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        unsupervised = self.iter >= self.burn_in and self.weight > 0
        views = next(self._unlabelled_iter) if unsupervised else None
        data_time = time.perf_counter() - start
        with precision.autocast(self.bf16):
            loss_dict = dict(self.model(data))
            if unsupervised:
                with torch.no_grad():
                    strong = self._teach(views)
                unsup = self.model(strong)
                loss_dict.update({f"{k}_unsup": v * self.weight for k, v in unsup.items() if k in self.losses})
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        if unsupervised:
            get_event_storage().put_scalar("pseudo_instances_per_slice",
                                    sum(len(s["instances"]) for s in strong) / max(len(strong), 1))
        self.optimizer.step()
        ema_update(self.teacher, self.model, self.decay)
