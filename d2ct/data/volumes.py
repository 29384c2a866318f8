"""CT volumes (NIfTI, DICOM series) -> display-oriented HU slices -> the challenge layout.

Display orientation (what every d2ct slice looks like): the radiological view, as the challenge
images are: rows run anterior -> posterior (anterior at the top), columns run patient right ->
patient left (the patient's right on the image left), and slices run inferior -> superior.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from d2ct.errors import DataError


def window(hu: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """HU -> uint8 display values: ``round(255 * (hu - (level - width/2)) / width)``, clipped to 0..255.

    The default (level 40 / width 400, i.e. -160..240 HU) is the challenge's abdominal window.
    """
    if not width > 0:
        raise DataError(f"window width must be > 0 HU, got {width}")
    lo = level - width / 2.0
    out = np.asarray(hu, dtype=np.float32) - np.float32(lo)
    out *= np.float32(255.0 / width)
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the block succeeds it is renamed
    onto ``path`` (replacing an existing folder only when ``overwrite``), else it is removed.

    A killed run leaves at most a hidden ``.<name>.*.tmp`` folder, never a half-written ``path``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"output {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DataError(f"output folder {path} exists and is not empty; choose another one or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "data")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
