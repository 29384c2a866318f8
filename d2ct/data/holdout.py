"""Hold out whole patients of a labelled data set as a test split, for honest final scores.

A data set in the challenge layout with no labelled ``test-images/`` (such as a training set
alone) can only be scored on its validation split, which also picks each model's best
checkpoint; the scores then flatter the models. :func:`make_holdout` writes a new data set
folder in which a seeded share of the labelled patients (a manifest column, e.g. ``patient``)
moves to ``test-images/`` + ``test-labels.csv.gz``. Their slices in the unlabelled pool are
left out too, so no model sees any slice of a test patient, not even without labels.

The new folder keeps the image names, so per-image results can be traced back to the source.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from d2ct.data.challenge import ChallengeDataset, split_labelled
from d2ct.data.labels_csv import write_labels_csv
from d2ct.data.manifest import MANIFEST_FILE, load_manifest
from d2ct.data.volumes import atomic_directory
from d2ct.errors import ConfigError, DataError
from d2ct.utils.fileio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["make_holdout"]


def _place(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        os.symlink(src.resolve(), dst)
    else:
        shutil.copyfile(src, dst)


def make_holdout(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    test_fraction: float = 0.2,
    group_by: str = "patient",
    seed: int = 0,
    manifest: str | os.PathLike | None = None,
    link: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write ``out``: ``source`` with a patient-disjoint labelled test split. Returns a summary
    (also written to ``out/holdout.json``).

    ``test_fraction`` of the labelled images (whole groups of ``group_by``, drawn with ``seed``)
    go to ``test-images/`` with their labels in ``test-labels.csv.gz``; the other labelled images
    and the unlabelled pool images of the remaining groups stay in ``train-images/`` with
    ``labels.csv.gz``, ``annotated.json`` and the manifest rows. ``link``: symbolic links to the
    source images instead of copies.
    """
    try:
        fraction_ok = 0.0 < float(test_fraction) < 1.0
    except (TypeError, ValueError):
        fraction_ok = False
    if not fraction_ok:
        raise ConfigError(f"--test-fraction (test_fraction) must be between 0 and 1 (exclusive), got {test_fraction!r}")
    src = Path(source)
    ds = ChallengeDataset.open(src)
    if ds.labels is None or not ds.labelled_names:
        raise DataError(f"{src}: no labelled images to hold out")
    if ds.test_split() is not None:
        raise DataError(f"{src}: already has a test-images/ folder; hold-out splits start from a training set")
    manifest_path = Path(manifest) if manifest else src / MANIFEST_FILE
    table = load_manifest(manifest_path)
    if group_by not in table.columns:
        raise DataError(f"{manifest_path}: no column {group_by!r} (option group_by); "
                        f"have {', '.join(map(str, table.columns))}")
    missing = [n for n in ds.names if n not in table.index]
    if missing:
        raise DataError(f"{manifest_path}: image {missing[0]!r} has no row ({len(missing)} such images)")
    group_of = {n: str(table.at[n, group_by]) for n in ds.names}
    keep, test = split_labelled(ds.labelled_names, test_fraction, seed=seed,
                                groups={n: group_of[n] for n in ds.labelled_names})
    if not test:
        raise DataError(f"{src}: test_fraction={test_fraction} holds out no image")
    test_groups = {group_of[n] for n in test}
    pool = [n for n in ds.unlabelled_names if group_of[n] not in test_groups]
    dropped_pool = len(ds.unlabelled_names) - len(pool)
    position = {n: i for i, n in enumerate(ds.names)}
    keep_set, test_set = set(keep), set(test)
    train = sorted(keep_set | set(pool), key=position.__getitem__)
    summary = {
        "source": str(src.resolve()), "group_by": group_by, "test_fraction": test_fraction, "seed": seed,
        "train_labelled": len(keep), "train_unlabelled": len(pool), "test": len(test),
        "test_groups": len(test_groups), "train_groups": len({group_of[n] for n in keep}),
        "pool_images_of_test_groups_left_out": dropped_pool,
        "test_images": test,
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for n in train:
            _place(ds.image_dir / n, tmp / "train-images" / n, link)
        for n in test:
            _place(ds.image_dir / n, tmp / "test-images" / n, link)
        h, w = ds.shape
        write_labels_csv(tmp / "labels.csv.gz", train,
                         np.stack([ds.label_map(n) if n in keep_set else np.zeros((h, w), np.uint8) for n in train]))
        write_labels_csv(tmp / "test-labels.csv.gz", test, np.stack([ds.label_map(n) for n in test]))
        atomic_write_json(tmp / "annotated.json", {"annotated": keep})
        rows = table.loc[train + test].copy()
        rows.insert(0, "holdout", ["test" if n in test_set else "train" for n in rows.index])
        atomic_write_text(tmp / MANIFEST_FILE, rows.to_csv(index=False))
        atomic_write_json(tmp / "holdout.json", summary)
    logger.info("%s: %d labelled + %d pool images for training, %d test images from %d held-out %s groups",
                out, len(keep), len(pool), len(test), len(test_groups), group_by)
    return summary
