"""CT slice images: one grayscale PNG per slice (uint8, or uint16 for raw-intensity exports).

- :func:`read_slice` returns a 2-D ``uint8`` or ``uint16`` array. RGB / RGBA / palette / gray+alpha
  images are converted to gray with a logged warning naming the file; a missing or corrupt file
  raises :class:`~d2ct.errors.DataError` naming the file.
- :func:`slice_to_uint8` / :func:`read_slice_uint8`: the one way every consumer of pixels (models,
  baseline, overlays) brings a slice to 8 bits. uint8 slices (the challenge format, already
  windowed) pass through; uint16 slices are stored CT values, ``HU + 1024`` (the usual unsigned
  storage, what tools/import_volume.py writes with ``--bits 16``), windowed to the soft-tissue window
  (level 40, width 400 HU) like the challenge images.
- :func:`write_slice` writes a PNG atomically (temp file + rename).
- :func:`list_slices` lists the PNG file names of a folder in natural order (0, 1, 2, ..., 10).
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from d2ct.errors import DataError
from d2ct.utils.fileio import atomic_write, natural_key

logger = logging.getLogger(__name__)

__all__ = ["read_slice", "read_slice_uint8", "slice_to_uint8", "write_slice", "list_slices", "slice_size",
           "HU_OFFSET", "WINDOW_LEVEL", "WINDOW_WIDTH"]

# uint16 slices store HU + HU_OFFSET; they are shown to models and methods through this window
HU_OFFSET = 1024.0
WINDOW_LEVEL = 40.0
WINDOW_WIDTH = 400.0

_GRAY_8 = {"L"}
_GRAY_16 = {"I;16", "I;16B", "I;16L", "I;16N"}
_COLOUR = {"RGB", "RGBA", "P", "PA", "LA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "La", "RGBa"}


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the image (corrupt or not an image): {exc}") from None
    return img


def read_slice(path: str | os.PathLike) -> np.ndarray:
    """Read one slice as a 2-D ``uint8`` (8-bit PNG) or ``uint16`` (16-bit PNG) array."""
    path = Path(path)
    img = _open(path)
    mode = img.mode
    if mode in _GRAY_8:
        arr = np.asarray(img, dtype=np.uint8)
    elif mode in _GRAY_16:
        arr = np.asarray(img).astype(np.uint16, copy=False)
    elif mode == "I":
        # 16-bit PNGs may open as 32-bit "I"; keep them 16-bit when the values fit.
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(f"{path}: 32-bit image with values outside 0..65535 (mode {mode}); expected an 8- or 16-bit grayscale PNG")
        arr = arr.astype(np.uint16)
    elif mode == "1":
        logger.warning("%s: 1-bit image converted to 8-bit gray (0/255)", path)
        arr = np.asarray(img.convert("L"), dtype=np.uint8)
    elif mode in _COLOUR:
        logger.warning("%s: %s image converted to 8-bit grayscale (expected a grayscale PNG)", path, mode)
        arr = np.asarray(img.convert("L"), dtype=np.uint8)
    else:
        raise DataError(f"{path}: unsupported image mode {mode!r}; expected an 8- or 16-bit grayscale PNG")
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D image, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def slice_to_uint8(image: np.ndarray, level: float = WINDOW_LEVEL, width: float = WINDOW_WIDTH,
                   offset: float = HU_OFFSET) -> np.ndarray:
    """A slice in the uint8 display range the models are trained on (see the module docs): uint8
    passes through; uint16 is read as HU + ``offset`` and windowed to [level - width/2, level + width/2]."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.dtype != np.uint16:
        raise DataError(f"expected a uint8 or uint16 slice, got {image.dtype}")
    hu = image.astype(np.float32) - offset
    low = level - width / 2.0
    return np.clip((hu - low) * (255.0 / width), 0, 255).round().astype(np.uint8)


def read_slice_uint8(path: str | os.PathLike) -> np.ndarray:
    """:func:`read_slice`, then :func:`slice_to_uint8`: what every consumer of pixels should use."""
    return slice_to_uint8(read_slice(path))


def slice_size(path: str | os.PathLike, *, verify: bool = False) -> tuple[int, int]:
    """(H, W) of an image from its header only (no decoding); ``verify`` also checks the file's
    structure and checksums (PIL ``verify``). DataError naming the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if verify:
                img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the image (corrupt or not an image): {exc}") from None
    return int(h), int(w)


def write_slice(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a 2-D ``uint8`` or ``uint16`` array as a grayscale PNG, atomically."""
    path = Path(path)
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise DataError(f"{path}: write_slice expects a 2-D image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        img = Image.fromarray(np.ascontiguousarray(arr))
    elif arr.dtype == np.uint16:
        img = Image.fromarray(np.ascontiguousarray(arr.astype("<u2", copy=False)))
    else:
        raise DataError(f"{path}: write_slice expects a uint8 or uint16 image, got {arr.dtype}")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def list_slices(folder: str | os.PathLike) -> list[str]:
    """PNG file names in ``folder`` (not hidden files, e.g. temporary files), in natural order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    names = [
        entry.name
        for entry in os.scandir(folder)
        if entry.name.lower().endswith(".png") and not entry.name.startswith(".") and entry.is_file()
    ]
    return sorted(names, key=natural_key)
