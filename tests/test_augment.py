"""The student's strong augmentation: masks stay on the structures they outline.

The synthetic slices' grey level equals their label map (every structure its own grey level),
so after any geometric step a mask must cover exactly the pixels of its structure's grey level.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from d2ct.config import setup_cfg
from d2ct.data.augment import build_student_augmentation, copy_paste, is_pseudo_labelled, max_gamma_shift
from d2ct.data.coco import label_map_to_instances
from d2ct.engine.mapper import CTDatasetMapper
from d2ct.errors import ConfigError

SIZE = 96
NO_INTENSITY = ["D2CT.AUGMENT.STUDENT.GAMMA", "[1.0, 1.0]", "D2CT.AUGMENT.STUDENT.BRIGHTNESS", "[1.0, 1.0]",
                "D2CT.AUGMENT.STUDENT.CONTRAST", "[1.0, 1.0]", "D2CT.AUGMENT.STUDENT.NOISE_PROB", "0.0",
                "D2CT.AUGMENT.STUDENT.BLUR_PROB", "0.0", "D2CT.AUGMENT.STUDENT.CUTOUT_PROB", "0.0"]


def _slice(tmp_path, name: str, shapes: list[tuple[int, int, int, int, int]], pseudo: bool) -> dict:
    """A slice whose grey level is its label: shapes are (grey level, cy, cx, ry, rx) ellipses."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    image = np.zeros((SIZE, SIZE), np.uint8)
    for grey, cy, cx, ry, rx in shapes:
        image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = grey
    path = tmp_path / name
    Image.fromarray(image).save(path)
    anns = label_map_to_instances(image)
    for a in anns:
        a["category_id"] = 0
        if pseudo:
            a["score"] = 0.9
    return {"file_name": str(path), "height": SIZE, "width": SIZE, "image_id": 0, "annotations": anns}


TARGET = [(60, 30, 30, 18, 12), (120, 62, 58, 14, 22), (180, 30, 70, 10, 10)]
SOURCE = [(240, 50, 40, 16, 16), (90, 75, 20, 8, 12)]


def _mapper(tmp_path, opts, source=True, grey=None):
    cfg = setup_cfg(None, ["MODEL.MASK_ON", "True", "INPUT.MASK_FORMAT", "bitmask",
                           "INPUT.MIN_SIZE_TRAIN", f"({SIZE},)", "INPUT.MAX_SIZE_TRAIN", str(SIZE),
                           "D2CT.AUGMENT.STUDENT.ENABLED", "True", *opts])
    kwargs = CTDatasetMapper.from_config(cfg, is_train=True)
    if source:
        src = _slice(tmp_path, "source.png", [(grey or g, *rest) for g, *rest in SOURCE], pseudo=False)
        kwargs["copy_paste_sources"] = [src]
    return CTDatasetMapper(**kwargs)


def _union_iou(image: np.ndarray, masks: np.ndarray) -> float:
    """IoU of the masks' union with the pixels of the structures' grey level (200; background 0):
    thresholding at the midpoint puts interpolated rims on the side nearest-neighbour masks take."""
    union, region = masks.any(0), image > 100
    return (union & region).sum() / (union | region).sum()


def test_geometric_student_augmentation_keeps_masks_on_their_structures(tmp_path):
    # every structure, the slice's and the pasted ones, at grey level 200
    np.random.seed(0)
    mapper = _mapper(tmp_path, [*NO_INTENSITY, "D2CT.AUGMENT.STUDENT.ELASTIC_PROB", "1.0",
                                "D2CT.AUGMENT.STUDENT.ELASTIC_MAGNITUDE", "0.04",
                                "D2CT.AUGMENT.STUDENT.COPY_PASTE_PROB", "0.5",
                                # shrinking makes structures so small that rims dominate any measure
                                "D2CT.AUGMENT.STUDENT.SCALE", "[1.0, 2.0]"], grey=200)
    d = _slice(tmp_path, "target.png", [(200, *s[1:]) for s in TARGET], pseudo=True)
    original = np.asarray(Image.open(d["file_name"]))
    changed, pasted, shifted = 0, 0, []
    for _ in range(12):
        out = mapper(d)
        image = out["image"][0].numpy()
        assert out["image"].shape == (3, SIZE, SIZE)  # scaled, then cropped or padded back
        masks = out["instances"].gt_masks.tensor.numpy()
        assert _union_iou(image, masks) > 0.93
        shifted.append(_union_iou(image, np.roll(masks, 3, axis=2)))
        changed += not np.array_equal(image, original)
        pasted += len(masks) > 1  # the slice's structures are one label: more masks = pasted ones
        # boxes were recomputed from the moved masks
        for box, m in zip(out["instances"].gt_boxes.tensor.numpy(), masks):
            ys, xs = np.nonzero(m)
            assert box.tolist() == pytest.approx([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert changed == 12 and 0 < pasted < 12
    # the check itself can fail: masks moved by 3 pixels no longer fit
    assert max(shifted) < 0.9


def test_shrinking_and_rotating_keep_masks_on_their_structures(tmp_path):
    np.random.seed(4)
    mapper = _mapper(tmp_path, [*NO_INTENSITY, "D2CT.AUGMENT.STUDENT.ELASTIC_PROB", "0.0",
                                "D2CT.AUGMENT.STUDENT.COPY_PASTE_PROB", "0.0", "D2CT.AUGMENT.STUDENT.SCALE", "[0.5, 0.5]"],
                     source=False)
    d = _slice(tmp_path, "target.png", [(200, *s[1:]) for s in TARGET], pseudo=True)
    area = (np.asarray(Image.open(d["file_name"])) > 100).sum()
    for _ in range(5):
        out = mapper(d)
        image, masks = out["image"][0].numpy(), out["instances"].gt_masks.tensor.numpy()
        assert (image > 100).sum() == pytest.approx(area / 4, rel=0.15)  # half the size, padded with air
        assert _union_iou(image, masks) > 0.85


def test_student_policy_is_for_pseudo_labelled_slices_unless_asked_for_all(tmp_path):
    np.random.seed(1)
    human = _slice(tmp_path, "human.png", TARGET, pseudo=False)
    assert not is_pseudo_labelled(human) and is_pseudo_labelled(_slice(tmp_path, "p.png", TARGET, pseudo=True))
    mild_identity = ["D2CT.AUGMENT.ROTATION", "0.0", "D2CT.AUGMENT.HFLIP", "False",
                     "D2CT.AUGMENT.BRIGHTNESS", "[1.0, 1.0]", "D2CT.AUGMENT.CONTRAST", "[1.0, 1.0]"]
    mapper = _mapper(tmp_path, [*NO_INTENSITY, *mild_identity])
    original = np.asarray(Image.open(human["file_name"]))
    # the teachers' policy here is the identity: a human-labelled slice comes out as it went in
    assert all(np.array_equal(mapper(human)["image"][0].numpy(), original) for _ in range(5))
    mapper = _mapper(tmp_path, [*NO_INTENSITY, *mild_identity, "D2CT.AUGMENT.STUDENT.APPLY_TO", "all"])
    assert not all(np.array_equal(mapper(human)["image"][0].numpy(), original) for _ in range(5))


def test_intensity_steps_change_grey_levels_within_limits_and_leave_masks_alone(tmp_path):
    np.random.seed(2)
    mapper = _mapper(tmp_path, ["D2CT.AUGMENT.STUDENT.SCALE", "[1.0, 1.0]", "D2CT.AUGMENT.STUDENT.ROTATION", "0.0",
                                "D2CT.AUGMENT.HFLIP", "False", "D2CT.AUGMENT.STUDENT.ELASTIC_PROB", "0.0",
                                "D2CT.AUGMENT.STUDENT.CUTOUT_PROB", "0.0", "D2CT.AUGMENT.STUDENT.COPY_PASTE_PROB", "0.0",
                                "D2CT.AUGMENT.STUDENT.NOISE_PROB", "1.0", "D2CT.AUGMENT.STUDENT.BLUR_PROB", "0.0"],
                     source=False)
    d = _slice(tmp_path, "target.png", TARGET, pseudo=True)
    truth = np.stack([np.asarray(Image.open(d["file_name"])) == g for g, *_ in TARGET])
    original = np.asarray(Image.open(d["file_name"])).astype(int)
    for _ in range(5):
        out = mapper(d)
        masks = out["instances"].gt_masks.tensor.numpy()
        assert sorted(m.sum() for m in masks) == sorted(t.sum() for t in truth)
        assert all(any((m == t).all() for t in truth) for m in masks)
        image = out["image"][0].numpy().astype(int)
        assert not np.array_equal(image, original)
        # gamma (<= 8.2%), brightness and contrast (10% each) and noise (std <= 6): means stay near
        for g, *_ in TARGET:
            inside = image[original == g]
            assert abs(inside.mean() - g) < 0.35 * 255


def test_cutout_blanks_pixels_but_keeps_masks(tmp_path):
    np.random.seed(3)
    mapper = _mapper(tmp_path, [*NO_INTENSITY[:-2], "D2CT.AUGMENT.STUDENT.CUTOUT_PROB", "1.0",
                                "D2CT.AUGMENT.STUDENT.CUTOUT_SIZE", "0.5", "D2CT.AUGMENT.STUDENT.SCALE", "[1.0, 1.0]",
                                "D2CT.AUGMENT.STUDENT.ROTATION", "0.0", "D2CT.AUGMENT.HFLIP", "False",
                                "D2CT.AUGMENT.STUDENT.ELASTIC_PROB", "0.0", "D2CT.AUGMENT.STUDENT.COPY_PASTE_PROB", "0.0"],
                     source=False)
    d = _slice(tmp_path, "target.png", TARGET, pseudo=True)
    original = np.asarray(Image.open(d["file_name"]))
    out = mapper(d)
    image = out["image"][0].numpy()
    assert ((image == 0) & (original > 0)).any() and (image[image != original] == 0).all()
    assert len(out["instances"]) == len(TARGET)


def test_copy_paste_occludes_the_slices_own_structures(tmp_path):
    target = _slice(tmp_path, "t.png", [(60, 48, 48, 20, 20)], pseudo=True)
    source = _slice(tmp_path, "s.png", [(200, 48, 30, 10, 10)], pseudo=False)
    timg, simg = (np.asarray(Image.open(x["file_name"])) for x in (target, source))
    image, anns = copy_paste(timg, target["annotations"], simg, source["annotations"], rng=np.random.default_rng(0))
    assert len(anns) == 2 and anns[1]["copy_pasted"] and "score" not in anns[1]
    from pycocotools import mask as mask_util

    own, pasted = (mask_util.decode(a["segmentation"]).astype(bool) for a in anns)
    assert not (own & pasted).any() and (image[pasted] == 200).all() and (image[own] == 60).all()
    assert own.sum() < (timg == 60).sum()
    assert target["annotations"][0]["segmentation"] != anns[0]["segmentation"]  # the input is not changed


def test_intensity_limits_and_bad_options_are_config_errors():
    assert max_gamma_shift(0.8, 1.25) == pytest.approx(0.082, abs=0.001)

    def build(*opts):
        return build_student_augmentation(setup_cfg(None, ["D2CT.AUGMENT.STUDENT.ENABLED", "True", *opts]))

    assert build()  # the defaults are HU-safe
    with pytest.raises(ConfigError, match="GAMMA.*changes their HU meaning"):
        build("D2CT.AUGMENT.STUDENT.GAMMA", "[0.5, 2.0]")
    assert build("D2CT.AUGMENT.STUDENT.GAMMA", "[0.5, 2.0]", "D2CT.AUGMENT.UNRESTRICTED_INTENSITY", "True")
    with pytest.raises(ConfigError, match="STUDENT.CONTRAST"):
        build("D2CT.AUGMENT.STUDENT.CONTRAST", "[0.5, 1.5]")
    with pytest.raises(ConfigError, match="APPLY_TO"):
        build("D2CT.AUGMENT.STUDENT.APPLY_TO", "labelled")
    with pytest.raises(ConfigError, match="NOISE_PROB"):
        build("D2CT.AUGMENT.STUDENT.NOISE_PROB", "1.5")
    assert build_student_augmentation(setup_cfg(None, [])) == []


def test_augmentation_grid_writes_a_png(tmp_path):
    from d2ct.data.augment import augmentation_grid

    np.random.seed(5)
    mapper = _mapper(tmp_path, [])
    d = _slice(tmp_path, "target.png", TARGET, pseudo=True)
    path = augmentation_grid(mapper, [d, _slice(tmp_path, "human.png", TARGET, pseudo=False)], tmp_path / "grid.png",
                             views=2)
    image = np.asarray(Image.open(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200
