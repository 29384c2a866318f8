"""Shared pieces of the command-line tools (each tool's ``main`` lives in its stage's module)."""
from __future__ import annotations

import sys


def prog() -> str | None:
    """argparse's ``prog``: ``python -m d2ct.x.y`` when the tool runs that way (argparse would show
    the module's file name, e.g. ``cli.py``), else ``None``: argparse's default, the name typed
    (``d2ct-train``, ``train_net.py``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if name and name.startswith("d2ct."):
        return f"python -m {name}"
    return None
