"""Outputs bound to the settings they were made with.

Every folder a pipeline stage fills (a trained model, a round of pseudo-labels, the baseline's
predictions) holds ``d2ct_settings.json``: the settings that made it and their fingerprint. Before a
stage writes into a folder it calls :func:`claim_folder`:

* same fingerprint: the folder is kept as it is: finished outputs are reused, a killed training
  resumes from its last checkpoint;
* another fingerprint (or outputs with no record at all): the folder is removed and made again,
  with one log line naming the settings that changed;
* a folder the run does not own (a shared ``radiologists_dir``) is never removed: a mismatch is an
  error naming the folder and what changed.

So a new marker can never sit over old outputs: what a stage reuses was made with its settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from d2ct.errors import D2CTError
from d2ct.utils.fileio import atomic_write_json, read_json

logger = logging.getLogger("d2ct.pipeline")

SETTINGS_FILE = "d2ct_settings.json"


class StaleOutputError(D2CTError):
    """A folder the run may not remove holds outputs made with other settings."""


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _differing(old: Mapping, new: Mapping) -> tuple[dict, dict, list[str]]:
    """Both settings flattened to dotted keys, and the keys whose values differ (absent counts)."""
    a, b = _flatten(json.loads(json.dumps(old, default=str))), _flatten(json.loads(json.dumps(new, default=str)))
    return a, b, sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def changed_keys(old: Mapping | None, new: Mapping, limit: int = 6) -> str:
    """'a.b, c (and 3 more)': the dotted keys whose values differ."""
    if old is None:
        return "no record of its settings"
    _, _, keys = _differing(old, new)
    if not keys:
        return "settings changed"
    text = ", ".join(keys[:limit])
    return text + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def recorded_settings(folder: Path) -> dict | None:
    path = Path(folder) / SETTINGS_FILE
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "fingerprint" in record else None


def is_current(folder: Path, settings: Mapping) -> bool:
    record = recorded_settings(folder)
    return record is not None and record["fingerprint"] == fingerprint(settings)


def only_new_keys_at_default(old: Mapping, new: Mapping, at_default: Callable[[str, Any], bool]) -> list[str]:
    """The dotted keys that tell ``new`` from ``old`` when every one of them is absent from ``old``
    and holds its default value in ``new`` (a setting added to d2ct after ``old`` was recorded);
    an empty list otherwise."""
    a, b, keys = _differing(old, new)
    if keys and all(k not in a and at_default(k, b[k]) for k in keys):
        return keys
    return []


def claim_folder(folder: Path, settings: Mapping, *, owned: bool = True, what: str | None = None,
                 at_default: Callable[[str, Any], bool] | None = None) -> bool:
    """Make ``folder`` the outputs of ``settings`` (see the module docs). Returns True when the folder
    already held outputs of these settings (to be reused or resumed), False when it starts empty.

    ``at_default(key, value)``: whether a dotted settings key holds d2ct's default value; a folder
    recorded before such keys existed, and differing by them alone, holds the same outputs (a newer
    d2ct's settings at their defaults behave as the older one did), so it is kept."""
    folder = Path(folder)
    what = what or str(folder)
    fp = fingerprint(settings)
    record = recorded_settings(folder)
    has_outputs = folder.is_dir() and any(p.name != SETTINGS_FILE for p in folder.iterdir())
    if record is not None and record["fingerprint"] == fp:
        return has_outputs
    if record is not None and has_outputs and at_default is not None and isinstance(record.get("settings"), Mapping):
        added = only_new_keys_at_default(record["settings"], settings, at_default)
        if added:
            logger.info("%s: recorded before %s existed; at the default it is the same: kept", folder, ", ".join(added))
            if owned:
                atomic_write_json(folder / SETTINGS_FILE, {"fingerprint": fp, "settings": dict(settings)})
            return True
    if has_outputs:
        change = changed_keys(record.get("settings") if record else None, settings)
        if not owned:
            raise StaleOutputError(
                f"{folder} holds {what} made with other settings ({change}); this run does not own it and will "
                "not remove it: point the run at another folder, or remove it yourself")
        logger.info("%s: made with other settings (%s): removing it", folder, change)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / SETTINGS_FILE, {"fingerprint": fp, "settings": dict(settings)})
    return False
