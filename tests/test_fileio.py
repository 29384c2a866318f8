"""d2ct.utils.fileio: atomic writes leave no partial file and give files the usual permissions."""
from __future__ import annotations

import os
import stat

import pytest

from d2ct.utils.fileio import atomic_path, atomic_write, atomic_write_json, natural_key, read_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_replaces_and_honours_umask(tmp_path, umask_022):
    import d2ct.utils.fileio as fileio

    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1})
    assert read_json(target) == {"a": 1}
    # like open(): 0o666 minus the umask read at import (mkstemp alone would leave 0o600)
    assert _mode(target) == 0o666 & ~fileio._UMASK
    with atomic_path(tmp_path / "fig.png") as tmp:
        tmp.write_bytes(b"png")
    assert (tmp_path / "fig.png").read_bytes() == b"png"
    assert _mode(tmp_path / "fig.png") == 0o666 & ~fileio._UMASK


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "labels.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "x.png") as tmp:
            tmp.write_bytes(b"half")
            raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]


def test_natural_key():
    names = ["10.png", "2.png", "1.png", "0.png", "b.png", "A.png"]
    assert sorted(names, key=natural_key) == ["0.png", "1.png", "2.png", "10.png", "A.png", "b.png"]
