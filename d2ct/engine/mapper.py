"""Dataset mapper for CT slices: grayscale reading, CT-suited augmentation, RLE masks.

Slices are single-channel; Mask R-CNN backbones (and their ImageNet weights) take three
channels, so the grey level is replicated into all three and the config's PIXEL_MEAN/STD
use one value for all channels. Replicating costs nothing at the first convolution and keeps
the standard pretrained weights usable unchanged.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from d2ct.data.images import read_slice, slice_to_uint8  # noqa: F401  (slice_to_uint8: re-exported)
from d2ct.data.augment import is_pseudo_labelled
from d2ct.errors import ConfigError

logger = logging.getLogger(__name__)

# Intensity jitter beyond this changes what a grey level means in HU: it needs an explicit flag.
MAX_SAFE_INTENSITY_JITTER = 0.10
# gt_classes of an ignore region. Detectron2's ROI heads already treat a -1 label as "ignore":
# proposals matched to such an instance (IoU >= the foreground threshold) are sampled neither as
# foreground nor as background, so they add no box, class or mask loss.
IGNORE_CLASS = -1


def read_model_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8: the slice's grey level replicated into three channels."""
    gray = slice_to_uint8(read_slice(path))
    return np.repeat(gray[:, :, None], 3, axis=2)


def build_ct_augmentation(cfg, is_train: bool) -> list:
    """Resize (scale jitter through INPUT.MIN_SIZE_TRAIN), flips, small rotations, mild intensity jitter."""
    augs = utils.build_augmentation(cfg, is_train)  # ResizeShortestEdge (+ RandomFlip per INPUT.RANDOM_FLIP)
    augs = [a for a in augs if not isinstance(a, T.RandomFlip)]  # flips come from D2CT.AUGMENT
    aug_cfg = cfg.D2CT.AUGMENT
    if not is_train or not aug_cfg.ENABLED:
        return augs
    for name in ("BRIGHTNESS", "CONTRAST"):
        low, high = aug_cfg[name]
        if low > high or low <= 0:
            raise ConfigError(f"D2CT.AUGMENT.{name} must be [low, high] with 0 < low <= high, got {[low, high]}")
        if max(1 - low, high - 1) > MAX_SAFE_INTENSITY_JITTER + 1e-9 and not aug_cfg.UNRESTRICTED_INTENSITY:
            raise ConfigError(
                f"D2CT.AUGMENT.{name}={[low, high]} jitters intensities by more than "
                f"{MAX_SAFE_INTENSITY_JITTER:.0%}, which changes the HU meaning of grey levels; "
                "set D2CT.AUGMENT.UNRESTRICTED_INTENSITY True if that is intended"
            )
    if aug_cfg.HFLIP:
        augs.append(T.RandomFlip(horizontal=True, vertical=False))
    if aug_cfg.VFLIP:
        augs.append(T.RandomFlip(horizontal=False, vertical=True))
    if aug_cfg.ROTATION > 0:
        augs.append(T.RandomRotation([-aug_cfg.ROTATION, aug_cfg.ROTATION], expand=False, sample_style="range"))
    if tuple(aug_cfg.BRIGHTNESS) != (1.0, 1.0):
        augs.append(T.RandomBrightness(*aug_cfg.BRIGHTNESS))
    if tuple(aug_cfg.CONTRAST) != (1.0, 1.0):
        augs.append(T.RandomContrast(*aug_cfg.CONTRAST))
    return augs


def labelled_training_dicts(dataset_names) -> list[dict]:
    """The human-labelled slices (no teacher score, at least one structure) among the named
    training sets, each once: the copy-paste sources."""
    from detectron2.data import DatasetCatalog

    out, seen = [], set()
    for name in dict.fromkeys(dataset_names):
        for d in DatasetCatalog.get(name):
            anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
            if anns and not is_pseudo_labelled(d) and d["file_name"] not in seen:
                seen.add(d["file_name"])
                out.append({"file_name": d["file_name"], "annotations": anns})
    if not out:
        logger.warning("copy-paste: no human-labelled slice in %s: it is off", list(dataset_names))
    return out


class CTDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper with grayscale CT reading and CT augmentation.

    Boxes are recomputed from the transformed masks during training: after a rotation the
    transformed box would no longer be tight.

    Crowd annotations (COCO ``iscrowd`` 1: the pseudo-labels' uncertain instances) become ignore
    regions with ``crowd_as_ignore`` (``D2CT.CROWD_AS_IGNORE``): instances of class
    ``IGNORE_CLASS``, which the ROI heads leave out of their samples. The RPN sees their boxes
    like any other and learns them as objects: proposing a region is cheap, the heads decide.
    Without it they are dropped, as Detectron2's own mapper does, and the region is background.

    ``student_augmentations`` (``D2CT.AUGMENT.STUDENT``, see :mod:`d2ct.data.augment`) replace the
    teachers' policy for pseudo-labelled slices (``student_apply_to`` "pseudo") or for every
    slice ("all"); with ``copy_paste_prob`` such a slice first gets structures of a random slice
    of ``copy_paste_sources`` (human-labelled training dicts) pasted onto it. With ``mark_pseudo``
    (``D2CT.PSEUDO_NEGATIVES ignore``) a pseudo-labelled slice's instances get a ``gt_pseudo`` field,
    which :mod:`d2ct.modeling.pseudo_negatives` reads.
    """

    @configurable
    def __init__(self, is_train: bool = True, *, crowd_as_ignore: bool = True,
                 student_augmentations: list | None = None, student_apply_to: str = "pseudo",
                 copy_paste_prob: float = 0.0, copy_paste_sources: list[dict] | None = None,
                 mark_pseudo: bool = False, **kwargs):
        super().__init__(is_train, **kwargs)
        self.crowd_as_ignore = crowd_as_ignore
        self.mark_pseudo = mark_pseudo
        self.student_augmentations = T.AugmentationList(student_augmentations) if student_augmentations else None
        self.student_apply_to = student_apply_to
        self.copy_paste_prob = copy_paste_prob if copy_paste_sources else 0.0
        self.copy_paste_sources = copy_paste_sources or []
        if self.student_augmentations is not None:
            logger.info("[CTDatasetMapper] student augmentation for %s slices: %s%s",
                        "pseudo-labelled" if student_apply_to == "pseudo" else "all",
                        self.student_augmentations,
                        f"; copy-paste p={self.copy_paste_prob} from {len(self.copy_paste_sources)} labelled slices"
                        if self.copy_paste_prob else "")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = build_ct_augmentation(cfg, is_train)
        ret["recompute_boxes"] = bool(is_train and cfg.MODEL.MASK_ON)
        ret["crowd_as_ignore"] = bool(cfg.D2CT.CROWD_AS_IGNORE)
        ret["mark_pseudo"] = bool(is_train and cfg.D2CT.PSEUDO_NEGATIVES == "ignore")
        if is_train and cfg.D2CT.AUGMENT.STUDENT.ENABLED:
            from d2ct.data.augment import build_student_augmentation

            student = cfg.D2CT.AUGMENT.STUDENT
            ret["student_augmentations"] = build_student_augmentation(cfg)
            ret["student_apply_to"] = student.APPLY_TO
            if student.COPY_PASTE_PROB > 0:
                ret["copy_paste_prob"] = float(student.COPY_PASTE_PROB)
                ret["copy_paste_sources"] = labelled_training_dicts(cfg.DATASETS.TRAIN)
        return ret

    def _is_student_slice(self, dataset_dict: dict) -> bool:
        return (self.is_train and self.student_augmentations is not None
                and (self.student_apply_to == "all" or is_pseudo_labelled(dataset_dict)))

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_model_image(dataset_dict["file_name"])
        utils.check_image_size(dataset_dict, image)
        student = self._is_student_slice(dataset_dict)
        # before copy-paste adds human-labelled structures to the slice
        pseudo = self.is_train and self.mark_pseudo and is_pseudo_labelled(dataset_dict)
        if student and self.copy_paste_prob and np.random.rand() < self.copy_paste_prob:
            from d2ct.data.augment import copy_paste

            source = self.copy_paste_sources[np.random.randint(len(self.copy_paste_sources))]
            if source.get("file_name") != dataset_dict["file_name"]:
                image, dataset_dict["annotations"] = copy_paste(
                    image, dataset_dict.get("annotations", []), read_model_image(source["file_name"]),
                    source["annotations"])
        aug_input = T.AugInput(image)
        transforms = (self.student_augmentations if student else self.augmentations)(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            if self.crowd_as_ignore:
                for ann in dataset_dict["annotations"]:
                    if ann.get("iscrowd", 0):
                        ann["iscrowd"], ann["category_id"] = 0, IGNORE_CLASS
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
            if pseudo:  # read by d2ct.modeling.pseudo_negatives (D2CT.PSEUDO_NEGATIVES ignore)
                instances = dataset_dict["instances"]
                instances.gt_pseudo = torch.ones(len(instances), dtype=torch.bool)
        return dataset_dict
