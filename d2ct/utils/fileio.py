"""Atomic file writing and small file helpers shared by every stage.

Every output d2ct writes goes through ``atomic_write``: the data lands in a temporary file in
the same folder and is renamed over the target only when complete, so a killed run never
leaves a half-written file that a resumed run would mistake for a finished one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once at import: os.umask can only be read by setting it, which is not thread-safe
_UMASK = _read_umask()


def umask_mode(base: int = 0o666) -> int:
    """The mode ``open()`` (0o666) or ``mkdir()`` (0o777) would give, minus the umask."""
    return base & ~_UMASK


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success flush, fsync and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; outputs are meant to be shared like any other file
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for libraries that write by file name
    (torch.save, PIL, matplotlib); it is renamed onto ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with contextlib.suppress(FileNotFoundError):  # the library may have replaced the file
            os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key giving 0.png, 1.png, 2.png, ..., 10.png (not 0, 1, 10, 2)."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(str(name)))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content (read in chunks)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _probe_dir(folder: Path, what: str) -> None:
    """Create and remove a temporary file in ``folder``: the only test that also catches read-only
    file systems and holds for root (os.access says yes to root whatever the mode bits)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".d2ct-write-test.", dir=folder)
    except OSError as e:
        from d2ct.errors import ConfigError

        raise ConfigError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def check_writable(path: str | os.PathLike | None, *, kind: str = "file", option: str = "--out") -> None:
    """Check, before any work, that ``path`` can be written as a ``kind`` ("file" or "dir").

    ConfigError naming ``option`` and the path when it is a folder where a file is wanted (or the
    reverse), when a parent on its way is a file, or when the nearest existing folder is not
    writable. Nothing is left behind. ``None`` (option not given) passes."""
    from d2ct.errors import ConfigError

    if path is None or str(path) == "":
        return
    if kind not in ("file", "dir"):
        raise ValueError(kind)
    p = Path(path)
    what = f"{option} {path}"
    if p.exists():
        if kind == "file" and p.is_dir():
            raise ConfigError(f"{what} is a folder; give a file name")
        if kind == "dir" and not p.is_dir():
            raise ConfigError(f"{what} is an existing file, not a folder")
        _probe_dir(p if kind == "dir" else (p.parent if str(p.parent) else Path(".")), what)
        return
    parent = p.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"{what}: {parent} is a file, not a folder")
    _probe_dir(parent, what)
