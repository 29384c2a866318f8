"""Manifest CSVs: one row per image with free columns (patient, data source, scanner, ...).

They drive the per-group breakdowns of evaluation reports and the patient-grouped validation split.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from d2ct.errors import DataError

__all__ = ["MANIFEST_FILE", "load_manifest", "manifest_groups"]

MANIFEST_FILE = "manifest.csv"
_KEY_COLUMNS = ("file", "name", "image", "file_name")


def load_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """A manifest CSV indexed by image name: its ``file``/``name``/``image``/``file_name`` column,
    or an integer ``id`` column mapped to ``<id>.png``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: cannot read the manifest CSV: {exc}") from None
    for col in _KEY_COLUMNS:
        if col in df.columns:
            key = df[col].astype(str)
            break
    else:
        if "id" in df.columns:
            key = df["id"].astype(str) + ".png"
        else:
            raise DataError(f"{path}: manifest needs an image column ({', '.join(_KEY_COLUMNS)} or id)")
    df = df.copy()
    df.index = pd.Index(key, name="name")
    if df.index.has_duplicates:
        raise DataError(f"{path}: image {df.index[df.index.duplicated()][0]!r} appears twice in the manifest")
    return df


def manifest_groups(path: str | os.PathLike, column: str, names: Iterable[str]) -> dict[str, str]:
    """``{image name: manifest[column] as text}`` for every name; a DataError names the column, or
    the first image without a row or a value."""
    df = load_manifest(path)
    if column not in df.columns:
        raise DataError(f"{path}: no column {column!r} to group the split by "
                        f"(have {', '.join(map(str, df.columns))})")
    names = list(names)
    missing = [n for n in names if n not in df.index]
    if missing:
        raise DataError(f"{path}: image {missing[0]!r} has no row"
                        + (f" ({len(missing)} such images)" if len(missing) > 1 else ""))
    values = df[column].reindex(names)
    if values.isna().any():
        raise DataError(f"{path}: image {values.index[values.isna()][0]!r} has no {column!r} value")
    return {n: str(v) for n, v in values.items()}
