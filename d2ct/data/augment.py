"""Strong augmentation for the student (Noisy Student: Xie et al. 2020; copy-paste: Ghiasi et al. 2021).

A student that sees its pseudo-labelled slices through the same mild augmentation as its
teachers can at best copy them; Noisy Student gains only when the student is noised. This is
that noise, for ``D2CT.AUGMENT.STUDENT`` (applied by ``d2ct.engine.mapper.CTDatasetMapper`` to
pseudo-labelled slices, or to every slice):

- copy-paste: structures of a human-labelled slice pasted, pixels and masks, onto the slice at
  the same place (slices of one data set share their field of view); what they cover is taken
  out of the slice's own masks;
- large scale jitter: Detectron2's ``ResizeScale`` (0.5-2x) then ``FixedSizeCrop`` (pads with
  0, air in the CT window);
- left/right flip (as the teachers' policy), rotation up to 20 degrees (``RandomRotation``);
- elastic deformation (a smooth random displacement field; ``scipy.ndimage``);
- gamma, contrast and brightness within HU-safe limits (no grey level moves by more than
  ``MAX_SAFE_INTENSITY_JITTER`` of the window unless UNRESTRICTED_INTENSITY);
- Gaussian noise and blur; cutout (rectangles set to 0, masks untouched: the model must infer
  the hidden part from the rest).

Every geometric step is a Detectron2 ``Transform`` with an ``apply_segmentation``, so masks
follow the image exactly; the intensity steps leave masks alone.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from pycocotools import mask as mask_util
from scipy import ndimage

from d2ct.errors import ConfigError

logger = logging.getLogger(__name__)

# Intensity changes beyond this share of the grey range change what a grey level means in HU.
MAX_SAFE_INTENSITY_JITTER = 0.10


def is_pseudo_labelled(dataset_dict: dict) -> bool:
    """Whether a dataset dict holds pseudo-labels: their annotations carry the teacher's ``score``,
    human labels never do (d2ct.pseudolabel writes it; d2ct.data.coco.load_coco_dicts keeps it)."""
    return any("score" in a for a in dataset_dict.get("annotations", ()))


# ------------------------------------------------------------------------------------------------
# transforms Detectron2 lacks
# ------------------------------------------------------------------------------------------------
class ElasticTransform(T.Transform):
    """Warp by a displacement field: output pixel (y, x) takes input (y + dy, x + dx)."""

    def __init__(self, dy: np.ndarray, dx: np.ndarray):
        super().__init__()
        self._set_attributes(locals())

    def _warp(self, img: np.ndarray, order: int) -> np.ndarray:
        h, w = self.dy.shape
        if img.shape[:2] != (h, w):
            raise ValueError(f"ElasticTransform made for {h}x{w}, given {img.shape[:2]}")
        yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
        coords = np.stack([yy + self.dy, xx + self.dx])
        channels = img[..., None] if img.ndim == 2 else img
        out = np.stack([ndimage.map_coordinates(channels[..., c].astype(np.float32), coords, order=order,
                                                mode="constant", cval=0.0) for c in range(channels.shape[-1])], -1)
        if img.dtype == np.uint8:
            out = np.clip(np.rint(out), 0, 255)
        out = out.astype(img.dtype)
        return out[..., 0] if img.ndim == 2 else out

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return self._warp(img, order=1)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self._warp(segmentation, order=0)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        # forward map of a point, approximately: p_out = p_in - d(p_in). Only boxes use it and
        # the mapper recomputes boxes from the warped masks.
        h, w = self.dy.shape
        x = np.clip(np.rint(coords[:, 0]).astype(int), 0, w - 1)
        y = np.clip(np.rint(coords[:, 1]).astype(int), 0, h - 1)
        out = coords.astype(np.float32).copy()
        out[:, 0] -= self.dx[y, x]
        out[:, 1] -= self.dy[y, x]
        return out


class RandomElastic(T.Augmentation):
    """A smooth random displacement: white noise blurred by ``sigma`` (a fraction of the image side),
    scaled so the largest displacement is ``magnitude`` (a fraction of the side)."""

    def __init__(self, magnitude: float, sigma: float):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        side = max(h, w)
        fields = []
        for _ in range(2):
            f = ndimage.gaussian_filter(np.random.standard_normal((h, w)).astype(np.float32), self.sigma * side)
            f *= self.magnitude * side / max(float(np.abs(f).max()), 1e-6)
            fields.append(f.astype(np.float32))
        return ElasticTransform(*fields)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


class RandomGamma(T.Augmentation):
    """Grey level g -> 255 (g / 255) ** gamma, gamma log-uniform in [low, high]."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        gamma = float(np.exp(np.random.uniform(np.log(self.low), np.log(self.high))))
        lut = _to_uint8(255.0 * (np.arange(256) / 255.0) ** gamma)
        return T.ColorTransform(lambda img: lut[img] if img.dtype == np.uint8 else 255.0 * (img / 255.0) ** gamma)


class RandomGaussianNoise(T.Augmentation):
    """Additive Gaussian noise, its standard deviation uniform in [0, std] grey levels; one field for
    all channels (they hold the same grey level)."""

    def __init__(self, std: float):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        noise = np.random.standard_normal(image.shape[:2]).astype(np.float32) * np.random.uniform(0, self.std)
        return T.ColorTransform(lambda img: _to_uint8(img.astype(np.float32) + (noise[..., None] if img.ndim == 3 else noise)))


class RandomGaussianBlur(T.Augmentation):
    """Gaussian blur in the image plane, sigma uniform in [0, sigma] pixels."""

    def __init__(self, sigma: float):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        s = float(np.random.uniform(0, self.sigma))
        sigmas = (s, s, 0) if image.ndim == 3 else (s, s)
        return T.ColorTransform(lambda img: _to_uint8(ndimage.gaussian_filter(img.astype(np.float32), sigmas)))


class RandomCutout(T.Augmentation):
    """1..``holes`` rectangles, each side up to ``size`` of the image's, set to 0 (air); the
    masks are left as they are."""

    def __init__(self, holes: int, size: float):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        boxes = []
        for _ in range(np.random.randint(1, self.holes + 1)):
            bh, bw = (max(1, int(np.random.uniform(0.25, 1.0) * self.size * d)) for d in (h, w))
            y0, x0 = np.random.randint(0, h - bh + 1), np.random.randint(0, w - bw + 1)
            boxes.append((y0, y0 + bh, x0, x0 + bw))

        def cut(img):
            img = img.copy()
            for y0, y1, x0, x1 in boxes:
                img[y0:y1, x0:x1] = 0
            return img

        return T.ColorTransform(cut)


# ------------------------------------------------------------------------------------------------
# the student's policy
# ------------------------------------------------------------------------------------------------
def max_gamma_shift(low: float, high: float) -> float:
    """The largest change of a grey level (as a share of the range) that a gamma in [low, high] makes."""
    x = np.linspace(0, 1, 1001)
    return float(max(np.abs(x ** g - x).max() for g in (low, high)))


def _check_range(name: str, value, low_bound: float = 0.0) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"D2CT.AUGMENT.STUDENT.{name} must be [low, high], got {value!r}") from None
    if not low_bound < low <= high:
        raise ConfigError(f"D2CT.AUGMENT.STUDENT.{name} must be [low, high] with {low_bound:g} < low <= high, "
                          f"got {[low, high]}")
    return low, high


def _check_prob(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"D2CT.AUGMENT.STUDENT.{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def build_student_augmentation(cfg) -> list:
    """The student's augmentation list (see the module docs), checked; [] when disabled."""
    s = cfg.D2CT.AUGMENT.STUDENT
    if not s.ENABLED:
        return []
    if s.APPLY_TO not in ("pseudo", "all"):
        raise ConfigError(f"D2CT.AUGMENT.STUDENT.APPLY_TO must be 'pseudo' or 'all', got {s.APPLY_TO!r}")
    unrestricted = bool(cfg.D2CT.AUGMENT.UNRESTRICTED_INTENSITY)
    gamma = _check_range("GAMMA", s.GAMMA)
    shift = max_gamma_shift(*gamma)
    if shift > MAX_SAFE_INTENSITY_JITTER + 1e-9 and not unrestricted:
        raise ConfigError(f"D2CT.AUGMENT.STUDENT.GAMMA={list(gamma)} moves grey levels by up to {shift:.0%} of the "
                          f"window (more than {MAX_SAFE_INTENSITY_JITTER:.0%}), which changes their HU meaning; set "
                          "D2CT.AUGMENT.UNRESTRICTED_INTENSITY True if that is intended")
    intensity = {}
    for name in ("BRIGHTNESS", "CONTRAST"):
        intensity[name] = _check_range(name, s[name])
        low, high = intensity[name]
        if max(1 - low, high - 1) > MAX_SAFE_INTENSITY_JITTER + 1e-9 and not unrestricted:
            raise ConfigError(f"D2CT.AUGMENT.STUDENT.{name}={[low, high]} jitters intensities by more than "
                              f"{MAX_SAFE_INTENSITY_JITTER:.0%}, which changes the HU meaning of grey levels; set "
                              "D2CT.AUGMENT.UNRESTRICTED_INTENSITY True if that is intended")
    scale = _check_range("SCALE", s.SCALE)
    for name in ("ELASTIC_PROB", "NOISE_PROB", "BLUR_PROB", "CUTOUT_PROB", "COPY_PASTE_PROB"):
        _check_prob(name, s[name])
    for name in ("ROTATION", "ELASTIC_MAGNITUDE", "ELASTIC_SIGMA", "NOISE_STD", "BLUR_SIGMA", "CUTOUT_SIZE"):
        if float(s[name]) < 0:
            raise ConfigError(f"D2CT.AUGMENT.STUDENT.{name} must be >= 0, got {s[name]!r}")
    if s.CUTOUT_PROB > 0 and (int(s.CUTOUT_HOLES) < 1 or not 0 < s.CUTOUT_SIZE <= 1):
        raise ConfigError("D2CT.AUGMENT.STUDENT: cutout needs CUTOUT_HOLES >= 1 and 0 < CUTOUT_SIZE <= 1")

    size = int(max(cfg.INPUT.MIN_SIZE_TRAIN))  # the square the teachers' policy trains at
    augs: list = [T.ResizeScale(scale[0], scale[1], size, size), T.FixedSizeCrop((size, size), pad_value=0.0)]
    if cfg.D2CT.AUGMENT.HFLIP:
        augs.append(T.RandomFlip(horizontal=True, vertical=False))
    if cfg.D2CT.AUGMENT.VFLIP:
        augs.append(T.RandomFlip(horizontal=False, vertical=True))
    if s.ROTATION > 0:
        augs.append(T.RandomRotation([-s.ROTATION, s.ROTATION], expand=False, sample_style="range"))
    if s.ELASTIC_PROB > 0 and s.ELASTIC_MAGNITUDE > 0:
        augs.append(T.RandomApply(RandomElastic(s.ELASTIC_MAGNITUDE, s.ELASTIC_SIGMA), prob=s.ELASTIC_PROB))
    if gamma != (1.0, 1.0):
        augs.append(RandomGamma(*gamma))
    if intensity["BRIGHTNESS"] != (1.0, 1.0):
        augs.append(T.RandomBrightness(*intensity["BRIGHTNESS"]))
    if intensity["CONTRAST"] != (1.0, 1.0):
        augs.append(T.RandomContrast(*intensity["CONTRAST"]))
    if s.BLUR_PROB > 0 and s.BLUR_SIGMA > 0:
        augs.append(T.RandomApply(RandomGaussianBlur(s.BLUR_SIGMA), prob=s.BLUR_PROB))
    if s.NOISE_PROB > 0 and s.NOISE_STD > 0:
        augs.append(T.RandomApply(RandomGaussianNoise(s.NOISE_STD), prob=s.NOISE_PROB))
    if s.CUTOUT_PROB > 0:
        augs.append(T.RandomApply(RandomCutout(int(s.CUTOUT_HOLES), float(s.CUTOUT_SIZE)), prob=s.CUTOUT_PROB))
    return augs


# ------------------------------------------------------------------------------------------------
# copy-paste
# ------------------------------------------------------------------------------------------------
def _decode(segm: dict | list, h: int, w: int) -> np.ndarray:
    if isinstance(segm, dict):
        rle = segm if isinstance(segm.get("counts"), (str, bytes)) else mask_util.frPyObjects(segm, h, w)
        return mask_util.decode(rle).astype(bool)
    rles = mask_util.frPyObjects(segm, h, w)  # polygons
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def _encode(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def copy_paste(image: np.ndarray, annotations: list[dict], source_image: np.ndarray,
               source_annotations: Sequence[dict], rng: np.random.Generator | None = None,
               min_area: int = 1) -> tuple[np.ndarray, list[dict]]:
    """Paste a random non-empty subset of the source's structures (not its ignore regions) onto
    ``image`` at the same place: their pixels and their masks. The slice's own annotations lose
    what the pasted structures cover and are dropped when less than ``min_area`` pixels remain.
    Images of another size are left alone. Returns (image, annotations); inputs are not changed."""
    rng = rng or np.random.default_rng(np.random.randint(2 ** 31))
    h, w = image.shape[:2]
    candidates = [a for a in source_annotations if not a.get("iscrowd", 0) and a.get("category_id", 0) >= 0]
    if source_image.shape[:2] != (h, w) or not candidates:
        return image, annotations
    chosen = [a for a in candidates if rng.random() < 0.5] or [candidates[rng.integers(len(candidates))]]
    pasted = [_decode(a["segmentation"], h, w) for a in chosen]
    cover = np.logical_or.reduce(pasted)
    out_image = image.copy()
    out_image[cover] = source_image[cover]
    out = []
    for ann in annotations:
        mask = _decode(ann["segmentation"], h, w) & ~cover
        if mask.sum() < min_area:
            continue
        rle = _encode(mask)
        out.append({**ann, "segmentation": rle, "bbox": mask_util.toBbox(rle).tolist(),
                    "bbox_mode": BoxMode.XYWH_ABS})
    for mask in pasted:
        if mask.any():
            rle = _encode(mask)
            out.append({"bbox": mask_util.toBbox(rle).tolist(), "bbox_mode": BoxMode.XYWH_ABS, "segmentation": rle,
                        "category_id": 0, "iscrowd": 0, "copy_pasted": True})
    return out_image, out


# ------------------------------------------------------------------------------------------------
# what it looks like
# ------------------------------------------------------------------------------------------------
def augmentation_grid(mapper, dicts: Sequence[dict], path, views: int = 4, title: str = ""):
    """A PNG grid: per dataset dict, the slice with its masks as the mapper's inference path reads
    it, then ``views`` training samples of it (image and masks after augmentation), masks drawn
    over the image they came with, so a mask that left its structure shows."""
    import copy

    from d2ct.visualization.overlay import overlay_grid

    def label_map(instances, shape):
        out = np.zeros(shape, np.uint8)
        if instances is not None and instances.has("gt_masks"):
            for i, m in enumerate(instances.gt_masks.tensor.numpy()[:255]):
                out[m & (out == 0)] = i + 1
        return out

    items = []
    for d in dicts:
        h, w = d["height"], d["width"]
        original = np.zeros((h, w), np.uint8)
        for i, a in enumerate([a for a in d.get("annotations", []) if not a.get("iscrowd", 0)][:255]):
            original[_decode(a["segmentation"], h, w) & (original == 0)] = i + 1
        kind = "pseudo" if is_pseudo_labelled(d) else "labelled"
        items.append((d["file_name"], original, f"{d.get('name', Path(d['file_name']).name)} ({kind})"))
        for v in range(views):
            out = mapper(copy.deepcopy(d))
            image = out["image"][0].numpy()
            items.append((image, label_map(out.get("instances"), image.shape), f"view {v + 1}"))
    return overlay_grid(items, path, title=title, ncols=views + 1)
