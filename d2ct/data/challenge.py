"""A data set folder in the challenge layout, opened and validated.

::

    <root>/train-images/ | images/ | test-images/   one grayscale PNG per slice, <id>.png
    <root>/labels.csv[.gz]                           rows = pixels, one column per image (optional)
    <root>/annotated.json | annotated_labels.json    which images are annotated (optional)
    <root>/test-images/ (+ test-labels.csv[.gz])     the test split (optional, see test_split)

:meth:`ChallengeDataset.open` checks that every image exists and has the same size, that the
labels CSV has exactly one column per image with H*W pixels and valid labels, and that the
annotated list names only existing images; every problem is a DataError naming the file,
column or image.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from d2ct.data.images import list_slices, read_slice, slice_size
from d2ct.data.labels_csv import LabelTable, read_labels_csv
from d2ct.errors import DataError
from d2ct.utils.fileio import natural_key

logger = logging.getLogger(__name__)

__all__ = ["ChallengeDataset", "split_labelled", "read_annotated"]

IMAGE_DIRS = ("train-images", "images", "test-images")
LABEL_FILES = ("labels.csv", "labels.csv.gz")
TEST_LABEL_FILES = ("test-labels.csv", "test-labels.csv.gz")
ANNOTATED_FILES = ("annotated.json", "annotated_labels.json")


def _resolve(root: Path, p: str | os.PathLike) -> Path:
    p = Path(p)
    return p if p.is_absolute() else root / p


def _match_name(entry: Any, image_set: set[str]) -> str:
    """An annotated-list entry as an image name: '17.png' as is, 17 or '17' -> '17.png'."""
    if isinstance(entry, bool):
        raise TypeError(entry)
    if isinstance(entry, int):
        return f"{entry}.png"
    if isinstance(entry, str):
        name = entry.strip()
        if name not in image_set and name.isdigit() and f"{name}.png" in image_set:
            return f"{name}.png"
        return name
    raise TypeError(entry)


def _png_bit_depth(path: Path) -> int | None:
    """Bits per sample from a PNG's IHDR header (26 bytes read), None if it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24]


def _warn_mixed_bit_depths(img_dir: Path, names: Sequence[str]) -> None:
    """One warning when a folder mixes 8- and 16-bit slices: each is scaled to 8 bits on its own
    (slice_to_uint8), so the same HU can look different in two slices of one data set."""
    by_depth: dict[int, list[str]] = {}
    for name in names:
        depth = _png_bit_depth(img_dir / name)
        if depth is not None:
            by_depth.setdefault(depth, []).append(name)
    if len(by_depth) > 1:
        parts = ", ".join(f"{len(v)} {d}-bit (first: {v[0]})" for d, v in sorted(by_depth.items()))
        logger.warning("%s: the slices mix bit depths (%s); each is scaled to 8 bits separately, so intensities "
                       "are not comparable between them. Export every slice the same way.", img_dir, parts)


def read_annotated(path: str | os.PathLike, image_names: Sequence[str] | None = None, *,
                   where: str = "an image of the data set") -> list[str]:
    """Annotated image names (natural order) from ``annotated.json`` ({"annotated": [...]}), a plain
    JSON list, or a 2025-style ``annotated_labels.json`` mapping image -> organs looked at (images with
    a non-empty entry count as annotated). Entries may be file names or integer ids (17 -> '17.png').
    With ``image_names``, a name that is not one of them raises DataError (saying it is not ``where``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotated file not found")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: annotated file is not valid JSON: {exc}") from None
    image_set = set(image_names or ())
    fmt = 'expected {"annotated": [names]}, a JSON list of names, or a mapping image -> organs'
    if isinstance(obj, dict) and "annotated" in obj:
        entries = obj["annotated"]
        if not isinstance(entries, list):
            raise DataError(f"{path}: 'annotated' must be a list of image names, got {type(entries).__name__}")
    elif isinstance(obj, list):
        entries = obj
    elif isinstance(obj, dict):
        entries = []
        for key, organs in obj.items():
            if organs is None or organs is False:
                continue
            if isinstance(organs, (list, dict, str, tuple)):
                if len(organs) == 0:
                    continue
            elif isinstance(organs, (int, float)) and organs == 0:
                continue
            elif not isinstance(organs, (int, float, bool)):
                raise DataError(f"{path}: entry {key!r} has a {type(organs).__name__}; {fmt}")
            entries.append(key)
    else:
        raise DataError(f"{path}: malformed annotated file ({type(obj).__name__} at top level); {fmt}")
    names: list[str] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        try:
            name = _match_name(entry, image_set)
        except TypeError:
            raise DataError(f"{path}: entry {i} is {entry!r}, not an image name; {fmt}") from None
        if image_names is not None and name not in image_set:
            raise DataError(f"{path}: annotated image {name!r} is not {where}")
        if name not in seen:
            seen.add(name)
            names.append(name)
    return sorted(names, key=natural_key)


class ChallengeDataset:
    """Images, optional labels and optional annotated list of one folder in the challenge layout."""

    root: Path
    image_dir: Path
    labels_path: Path | None
    annotated: list[str] | None
    annotated_path: Path | None
    names: list[str]
    shape: tuple[int, int]
    labels: LabelTable | None
    labelled_names: list[str]
    unlabelled_names: list[str]

    def __init__(
        self,
        *,
        root: Path,
        image_dir: Path,
        names: list[str],
        shape: tuple[int, int],
        labels_path: Path | None = None,
        labels: LabelTable | None = None,
        annotated: list[str] | None = None,
        annotated_path: Path | None = None,
        labelled_names: list[str] | None = None,
        unlabelled_names: list[str] | None = None,
        check_images: bool = True,
    ):
        """Use :meth:`open`, which finds and validates everything; this only stores it."""
        self.root = Path(root)
        self.image_dir = Path(image_dir)
        self.names = list(names)
        self.shape = (int(shape[0]), int(shape[1]))
        self.labels_path = labels_path
        self.labels = labels
        self.annotated = annotated
        self.annotated_path = annotated_path
        self.labelled_names = list(labelled_names or [])
        labelled = set(self.labelled_names)
        self.unlabelled_names = (
            list(unlabelled_names) if unlabelled_names is not None else [n for n in self.names if n not in labelled]
        )
        self._name_set = set(self.names)
        self._check_images = check_images

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        *,
        image_dir: str | os.PathLike | None = None,
        labels: str | os.PathLike | None | bool = None,
        annotated: str | os.PathLike | None | bool = None,
        check_images: bool = True,
    ) -> "ChallengeDataset":
        """Open and validate a data set folder.

        ``image_dir``: the image folder (relative to ``root`` or absolute); default: the first of
        train-images/, images/, test-images/ that exists. ``labels``: the labels CSV; default:
        labels.csv[.gz] in ``root`` (test-labels.csv[.gz] when the image folder is test-images/);
        ``False``: no labels. ``annotated``: the annotated list; default: annotated.json or
        annotated_labels.json in ``root`` if present; ``False``: none. ``check_images``: read every
        image header (and verify its checksums) to check it is readable and of the common size; when
        False only the first image is looked at.
        """
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: data set folder not found")

        # images
        if image_dir is not None:
            img_dir = _resolve(root, image_dir)
            if not img_dir.is_dir():
                raise DataError(f"{img_dir}: image folder not found (option image_dir)")
        else:
            img_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
            if img_dir is None:
                raise DataError(f"{root}: no image folder found (looked for {', '.join(d + '/' for d in IMAGE_DIRS)})")
        names = list_slices(img_dir)
        if not names:
            raise DataError(f"{img_dir}: no PNG images in the image folder")
        shape = slice_size(img_dir / names[0], verify=check_images)
        if check_images:
            for name in names[1:]:
                s = slice_size(img_dir / name, verify=True)
                if s != shape:
                    raise DataError(
                        f"{img_dir / name}: image size {s[0]}x{s[1]} (HxW) differs from {shape[0]}x{shape[1]} "
                        f"of {names[0]}; all images of a data set must have the same size"
                    )
        if check_images:
            _warn_mixed_bit_depths(img_dir, names)
        name_set = set(names)

        # labels
        labels_path: Path | None
        if labels is False:
            labels_path = None
        elif labels is not None and labels is not True:
            labels_path = _resolve(root, labels)
            if not labels_path.is_file():
                raise DataError(f"{labels_path}: labels CSV not found (option labels)")
        else:
            candidates = TEST_LABEL_FILES if img_dir.name == "test-images" else LABEL_FILES
            found = [root / c for c in candidates if (root / c).is_file()]
            if len(found) > 1:  # never pick one of two label files silently
                raise DataError(f"{root}: both {found[0].name} and {found[1].name} exist; remove one, or name "
                                "the one to use (option labels)")
            labels_path = found[0] if found else None
        table = None
        if labels_path is not None:
            # read_labels_csv raises DataError when a file (plain or transposed) has another count
            table = read_labels_csv(labels_path, expected_pixels=shape[0] * shape[1])
            if any(c not in name_set for c in table.names) and all(
                c in name_set or (c.isdigit() and f"{c}.png" in name_set) for c in table.names
            ):  # columns named by bare ids (17 for 17.png), e.g. a transposed file's first column
                table = LabelTable(
                    [c if c in name_set else f"{c}.png" for c in table.names], table.values,
                    index_name=table.index_name, source=table.source, transposed=table.transposed,
                )
            extra = [c for c in table.names if c not in name_set]
            if extra:
                by_lower = {n.lower(): n for n in names}
                hint = (f"; names are case-sensitive: the image is {by_lower[extra[0].lower()]!r}"
                        if extra[0].lower() in by_lower else "")
                raise DataError(
                    f"{labels_path}: column {extra[0]!r} has no image in {img_dir}"
                    + (f" ({len(extra)} such columns)" if len(extra) > 1 else "") + hint
                )
            missing = [n for n in names if n not in table]
            if missing:
                raise DataError(
                    f"{img_dir / missing[0]}: image has no column in {labels_path}"
                    + (f" ({len(missing)} such images)" if len(missing) > 1 else "")
                )

        # annotated list
        annotated_path: Path | None
        if annotated is False:
            annotated_path = None
        elif annotated is not None and annotated is not True:
            annotated_path = _resolve(root, annotated)
            if not annotated_path.is_file():
                raise DataError(f"{annotated_path}: annotated file not found (option annotated)")
        else:
            annotated_path = next((root / c for c in ANNOTATED_FILES if (root / c).is_file()), None)
        annotated_names = read_annotated(annotated_path, names) if annotated_path is not None else None
        if table is None and labels is not False and annotated_names:
            # an annotated list says labels exist: without them every "labelled" image would be empty
            looked = TEST_LABEL_FILES if img_dir.name == "test-images" else LABEL_FILES
            raise DataError(f"{annotated_path} lists {len(annotated_names)} annotated image(s) but {root} has no "
                            f"labels CSV (looked for {', '.join(looked)}); add it, or name it (option labels)")

        # labelled / unlabelled
        if table is None:
            labelled: list[str] = []
        elif annotated_names is not None:
            labelled = list(annotated_names)
            empty = [n for n in labelled if table.is_empty(n)]
            if empty:
                logger.warning(
                    "%s: %d annotated image(s) have an all-zero label map (first: %s)", labels_path, len(empty), empty[0]
                )
        else:
            nonempty = table.nonempty()
            labelled = [n for n in names if nonempty[table._index(n)]]
        labelled_set = set(labelled)
        unlabelled = [n for n in names if n not in labelled_set]
        return cls(
            root=root,
            image_dir=img_dir,
            labels_path=labels_path,
            annotated=annotated_names,
            annotated_path=annotated_path,
            names=names,
            shape=shape,
            labels=table,
            labelled_names=labelled,
            unlabelled_names=unlabelled,
            check_images=check_images,
        )

    # -- access ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (
            f"ChallengeDataset(root={str(self.root)!r}, images={len(self.names)} in {self.image_dir.name}/, "
            f"shape={self.shape}, labels={self.labels_path.name if self.labels_path else None}, "
            f"labelled={len(self.labelled_names)}, unlabelled={len(self.unlabelled_names)})"
        )

    def _check_name(self, name: str) -> None:
        if name not in self._name_set:
            raise DataError(f"{self.image_dir}: no image {name!r} in the data set")

    def image_path(self, name: str) -> Path:
        self._check_name(name)
        return self.image_dir / name

    def read_image(self, name: str) -> np.ndarray:
        """The slice as a 2-D uint8 / uint16 array (checked against the data set's size)."""
        path = self.image_path(name)
        img = read_slice(path)
        if img.shape != self.shape:
            raise DataError(
                f"{path}: image size {img.shape[0]}x{img.shape[1]} differs from the data set's {self.shape[0]}x{self.shape[1]}"
            )
        return img

    def label_map(self, name: str) -> np.ndarray | None:
        """(H, W) uint8 label map (a view), or None when the data set has no labels file."""
        self._check_name(name)
        if self.labels is None:
            return None
        return self.labels.label_map(name, self.shape)

    def split_groups(self, column: str, manifest: str | os.PathLike | None = None) -> dict[str, str]:
        """``{labelled image: group}`` from a manifest column (default manifest: ``<root>/manifest.csv``),
        for :func:`split_labelled`'s ``groups``."""
        from d2ct.data.manifest import MANIFEST_FILE, manifest_groups

        path = _resolve(self.root, manifest) if manifest else self.root / MANIFEST_FILE
        if not path.is_file():
            raise DataError(f"{path}: manifest not found (needed to group the validation split by {column!r})")
        return manifest_groups(path, column, self.labelled_names)

    def test_split(self) -> "ChallengeDataset | None":
        """``<root>/test-images/`` (with ``test-labels.csv[.gz]`` if present) as a data set, or None."""
        test_dir = self.root / "test-images"
        if not test_dir.is_dir() or test_dir.resolve() == self.image_dir.resolve():
            return None
        # by name: open() resolves relative paths against the root (a relative root must not repeat)
        labels = next((c for c in TEST_LABEL_FILES if (self.root / c).is_file()), None)
        return ChallengeDataset.open(
            self.root,
            image_dir="test-images",
            labels=labels if labels is not None else False,
            annotated=False,
            check_images=self._check_images,
        )


def split_labelled(
    names: Sequence[str], val_fraction: float = 0.2, seed: int = 0, groups: Mapping[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """Split image names into (train, val): deterministic for a given seed whatever the input order,
    disjoint, each part in natural order. ``round(n * val_fraction)`` go to val, at least one when
    ``val_fraction > 0`` and at least one stays in train when n >= 2.

    ``groups`` (image name -> group, e.g. the patient): whole groups go to one side, so no patient
    has slices in both (slices of one patient look alike; splitting them would flatter the
    validation scores). Groups are drawn in seeded random order until val holds at least
    ``round(n * val_fraction)`` images; at least one group stays in train."""
    try:
        frac = float(val_fraction)
    except (TypeError, ValueError):
        raise DataError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}") from None
    if not (0.0 <= frac < 1.0):
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    ordered = sorted((str(n) for n in names), key=natural_key)
    for a, b in zip(ordered, ordered[1:]):
        if a == b:
            raise DataError(f"split_labelled: duplicate image name {a!r}")
    n = len(ordered)
    n_val = int(round(n * frac))
    if frac > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    elif n < 2:
        n_val = 0
    rng = np.random.default_rng(seed)
    if groups is None:
        perm = rng.permutation(n)
        val_set = {ordered[i] for i in perm[:n_val].tolist()}
    else:
        missing = [name for name in ordered if name not in groups]
        if missing:
            raise DataError(f"split_labelled: image {missing[0]!r} has no group"
                            + (f" ({len(missing)} such images)" if len(missing) > 1 else ""))
        members: dict[str, list[str]] = {}
        for name in ordered:
            members.setdefault(str(groups[name]), []).append(name)
        keys = sorted(members, key=natural_key)
        val_set = set()
        for i in rng.permutation(len(keys)).tolist()[: max(len(keys) - 1, 0)]:
            if len(val_set) >= n_val:
                break
            val_set.update(members[keys[i]])
    train = [name for name in ordered if name not in val_set]
    val = [name for name in ordered if name in val_set]
    return train, val
