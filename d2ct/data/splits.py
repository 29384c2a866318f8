"""The split of a data set, decided once and written to one file (like nnU-Net's splits_final.json).

The pipeline's data stage writes ``<output_dir>/data/splits_final.json``; every training run
(``D2CT.SPLIT_FILE``), the pseudo-labelling, prediction and evaluation stages read their image names
from it instead of recomputing the seeded split. The file also records how the split was made
and a digest of the data set it was made from, so a changed data set is noticed.

Layout::

    {"format": "d2ct-splits/1", "root": "...", "made_with": {val_fraction, seed, group_by, manifest},
     "data_digest": "<sha256>", "splits": {"train": [...], "val": [...], "unlabelled": [...], "test": [...]}}
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

from d2ct.errors import DataError
from d2ct.utils.fileio import atomic_write_json, read_json

FORMAT = "d2ct-splits/1"
SPLIT_FILE_NAME = "splits_final.json"
SPLITS_IN_FILE = ("train", "val", "unlabelled", "test")


def _file_digest(h, path: Path | None) -> None:
    if path is None or not Path(path).is_file():
        h.update(b"-")
        return
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def data_digest(dataset) -> str:
    """SHA-256 over what a split depends on: image names and file sizes, the labels and annotated
    files' contents, and the same for the test split. Cheap (sizes, not pixels, for the images)."""
    h = hashlib.sha256()
    parts = [dataset]
    test = dataset.test_split()
    if test is not None:
        parts.append(test)
    for ds in parts:
        for name in ds.names:
            h.update(name.encode())
            h.update(str(os.stat(ds.image_path(name)).st_size).encode())
        _file_digest(h, ds.labels_path)
        _file_digest(h, getattr(ds, "annotated_path", None))
    return h.hexdigest()


def make_splits(dataset, *, val_fraction: float = 0.2, seed: int = 0, group_by: str | None = None,
                manifest: str | os.PathLike | None = None) -> dict:
    """The split record of an opened :class:`~d2ct.data.challenge.ChallengeDataset`."""
    from d2ct.data.challenge import split_labelled

    groups = dataset.split_groups(group_by, manifest) if group_by else None
    train, val = split_labelled(dataset.labelled_names, val_fraction=val_fraction, seed=seed, groups=groups)
    test = dataset.test_split()
    return {
        "format": FORMAT,
        "root": str(Path(dataset.root).resolve()),
        "made_with": {"val_fraction": float(val_fraction), "seed": int(seed), "group_by": group_by or None,
                      "manifest": str(manifest) if manifest else None},
        "data_digest": data_digest(dataset),
        "splits": {"train": train, "val": val, "unlabelled": list(dataset.unlabelled_names),
                   "test": list(test.names) if test is not None else []},
    }


def write_splits(path: str | os.PathLike, record: Mapping) -> Path:
    path = Path(path)
    atomic_write_json(path, dict(record))
    return path


def read_splits(path: str | os.PathLike) -> dict:
    """A split file, checked: DataError naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found (written by the pipeline's data stage)")
    try:
        record = read_json(path)
    except ValueError as e:
        raise DataError(f"{path}: not a split file ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DataError(f"{path}: not a split file (expected format {FORMAT!r})")
    splits = record.get("splits")
    if not isinstance(splits, dict) or set(splits) != set(SPLITS_IN_FILE) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in splits.values()):
        raise DataError(f"{path}: 'splits' must map {', '.join(SPLITS_IN_FILE)} to lists of image names")
    overlap = set(splits["train"]) & set(splits["val"])
    if overlap:
        raise DataError(f"{path}: {len(overlap)} image(s) in both train and val, e.g. {sorted(overlap)[0]!r}")
    return record


def check_names(record: Mapping, dataset, path: str | os.PathLike) -> None:
    """Every name in the split file exists in the data set (and the test names in its test split)."""
    known = set(dataset.names)
    for split in ("train", "val", "unlabelled"):
        missing = [n for n in record["splits"][split] if n not in known]
        if missing:
            raise DataError(f"{path}: {len(missing)} {split} image(s) not in {dataset.image_dir}, e.g. "
                            f"{missing[0]!r}: the split file belongs to another data set (run the data stage again)")
    labelled = set(dataset.labelled_names)
    for split in ("train", "val"):
        unlabelled = [n for n in record["splits"][split] if n not in labelled]
        if unlabelled:
            raise DataError(f"{path}: {split} image {unlabelled[0]!r} has no labels in {dataset.root}")
    test = dataset.test_split()
    test_known = set(test.names) if test is not None else set()
    missing = [n for n in record["splits"]["test"] if n not in test_known]
    if missing:
        raise DataError(f"{path}: test image {missing[0]!r} not in {dataset.root / 'test-images'}")
