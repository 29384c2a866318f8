"""16-bit slices (uint16 = HU + 1024) are read the same documented way by every consumer of pixels:
the models' input, the classical baseline and the overlays all see the soft-tissue window."""
from __future__ import annotations

import numpy as np
import pytest

from d2ct.data.images import (HU_OFFSET, WINDOW_LEVEL, WINDOW_WIDTH, read_slice, read_slice_uint8,
                              slice_to_uint8, write_slice)
from d2ct.errors import DataError


def as_stored_hu(gray: np.ndarray) -> np.ndarray:
    """The uint16 slice (HU + 1024) whose soft-tissue window is ``gray``."""
    hu = gray.astype(np.float64) * WINDOW_WIDTH / 255.0 + (WINDOW_LEVEL - WINDOW_WIDTH / 2)
    return np.round(hu + HU_OFFSET).astype(np.uint16)


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    from d2ct.data.phantom import generate_slice

    folder = tmp_path_factory.mktemp("bits")
    image, label = generate_slice(np.random.default_rng(5), size=96)[:2]
    write_slice(folder / "8bit.png", image)
    write_slice(folder / "16bit.png", as_stored_hu(image))
    return folder, image, label


def test_the_window_is_the_documented_one():
    hu = np.array([[-1024, -160, 40, 240, 2000]])
    assert slice_to_uint8((hu + 1024).astype(np.uint16)).tolist() == [[0, 0, 128, 255, 255]]
    with pytest.raises(DataError, match="uint8 or uint16"):
        slice_to_uint8(np.zeros((2, 2), np.float32))


def test_models_baseline_and_overlays_see_16_bit_slices_as_their_8_bit_window(slices):
    from d2ct.baseline.watershed import segment_slice
    from d2ct.engine.mapper import read_model_image
    from d2ct.evaluation.ari import adjusted_rand_index
    from d2ct.visualization.overlay import _gray

    folder, image, label = slices
    assert read_slice(folder / "16bit.png").dtype == np.uint16
    assert np.abs(read_slice_uint8(folder / "16bit.png").astype(int) - image).max() <= 1
    model_8, model_16 = read_model_image(str(folder / "8bit.png")), read_model_image(str(folder / "16bit.png"))
    assert model_16.shape == (96, 96, 3) and np.abs(model_16.astype(int) - model_8).max() <= 1
    assert np.abs(_gray(folder / "16bit.png").astype(int) - image).max() <= 1
    # the baseline once divided 16-bit slices by 65535: one background region, ARI 0
    ari_8 = adjusted_rand_index(label, segment_slice(read_slice(folder / "8bit.png"), "clahe_tv"))
    ari_16 = adjusted_rand_index(label, segment_slice(read_slice(folder / "16bit.png"), "clahe_tv"))
    assert ari_8 > 0.05 and abs(ari_16 - ari_8) < 0.05
