"""One progress bar for every stage: tqdm on a terminal, plain lines when stderr is redirected.

tqdm redraws its bar with carriage returns; in a log file or a captured stderr those ``\\r``
updates pile up on one line and run into the next message. When stderr is not a terminal the
bar writes each update as its own line instead, at most every 30 seconds (plus the final one).
"""
from __future__ import annotations

import sys
from typing import Any, Iterable


class _LineWriter:
    """A file for tqdm that turns each ``\\r`` redraw into one line (repeats dropped)."""

    def __init__(self, stream):
        self._stream = stream
        self._last = ""

    def write(self, text: str) -> int:
        for piece in text.replace("\r", "\n").split("\n"):
            piece = piece.rstrip()
            if piece and piece != self._last:
                self._stream.write(piece + "\n")
                self._last = piece
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Iterable | None = None, **kwargs: Any):
    """``tqdm(iterable, **kwargs)``, in line mode (no ``\\r``, an update every 30 s at most) when
    stderr is not a terminal. ``disable=True`` hides it as with tqdm."""
    from tqdm import tqdm

    if not _stderr_is_tty() and "file" not in kwargs:
        kwargs["file"] = _LineWriter(sys.stderr)
        kwargs.setdefault("mininterval", 30.0)
        kwargs.setdefault("ncols", 100)  # no terminal width to ask: a fixed one, no bar padding
        kwargs["dynamic_ncols"] = False
    return tqdm(iterable, **kwargs)
