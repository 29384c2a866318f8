"""Detectron2 registration of a challenge-layout data set folder and of COCO JSON files.

:func:`register_challenge_dataset` registers, for a base name such as ``phantom``:

==========================  ==========================================================
``phantom_train``           labelled images minus the validation part (seeded split)
``phantom_val``             the validation part of the labelled images
``phantom_labelled``        all labelled images
``phantom_unlabelled``      the unlabelled pool (dicts with ``annotations == []``)
``phantom_test``            ``<root>/test-images/`` when present (annotations only when
                            ``test-labels.csv[.gz]`` exists)
==========================  ==========================================================

Registration is lazy: nothing is read until ``DatasetCatalog.get`` is first called; the opened
data set and the dicts are then cached (and rebuilt if the image folder or labels file changes).
Every split gets ``MetadataCatalog`` entries ``thing_classes=["structure"]``,
``thing_dataset_id_to_contiguous_id={1: 0}``, ``evaluator_type="d2ct"``, ``root``, ``image_root``,
``base_name`` and ``split``; COCO-JSON sets also get ``json_file``.

Configs name data sets as ``<base>_<split>``; :func:`ensure_registered` registers what a config's
``DATASETS.TRAIN`` / ``DATASETS.TEST`` name from a mapping of base names to folders (or full names
to COCO JSON files).
"""
from __future__ import annotations

import logging
import os
import pickle
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

from detectron2.data import DatasetCatalog, MetadataCatalog

from d2ct.data.challenge import IMAGE_DIRS, TEST_LABEL_FILES, ChallengeDataset, split_labelled
from d2ct.data.coco import CATEGORY_NAME, COCO_CATEGORY_ID, dataset_dicts, load_coco_dicts
from d2ct.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "SPLITS",
    "register_challenge_dataset",
    "register_coco_json",
    "parse_dataset_name",
    "ensure_registered",
    "unregister",
    "split_names",
]

SPLITS = ("train", "val", "labelled", "unlabelled", "test")
SELECTABLE_SPLITS = SPLITS + ("all",)
EVALUATOR_TYPE = "d2ct"

# registered name -> (kind, arguments key): what makes re-registration a no-op
_REGISTERED: dict[str, tuple] = {}
# base name -> split names registered for it
_BASES: dict[str, dict[str, str]] = {}
_LOCK = threading.RLock()


# --------------------------------------------------------------------------------------------------
# split selection (shared with tools/convert_to_coco.py)
# --------------------------------------------------------------------------------------------------
def split_names(
    dataset: ChallengeDataset, split: str, *, val_fraction: float = 0.2, seed: int = 0,
    group_by: str | None = None, manifest: str | os.PathLike | None = None,
    splits: Mapping[str, list[str]] | None = None,
) -> tuple[ChallengeDataset | None, list[str]]:
    """(data set, image names) of ``split`` of an opened data set: ``train`` / ``val`` (seeded split of
    the labelled images, see :func:`~d2ct.data.challenge.split_labelled`; with ``group_by``, a
    manifest column such as ``patient``, whole groups go to one side), ``labelled``,
    ``unlabelled``, ``all`` (every image) or ``test`` (the ``test-images/`` data set; (None, []) when
    there is none). ``splits``: the ``splits`` of a split file (:mod:`d2ct.data.splits`), whose names
    are used as they are instead of computing the split."""
    if split not in SELECTABLE_SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SELECTABLE_SPLITS)}")
    if split == "test":
        test = dataset.test_split()
        if test is None:
            return None, []
        return test, list(splits["test"]) if splits is not None else list(test.names)
    if splits is not None and split in ("train", "val", "unlabelled"):
        return dataset, list(splits[split])
    if splits is not None and split == "labelled":
        chosen = set(splits["train"]) | set(splits["val"])
        return dataset, [n for n in dataset.labelled_names if n in chosen]
    if split == "all":
        return dataset, list(dataset.names)
    if split == "labelled":
        return dataset, list(dataset.labelled_names)
    if split == "unlabelled":
        return dataset, list(dataset.unlabelled_names)
    groups = dataset.split_groups(group_by, manifest) if group_by else None
    train, val = split_labelled(dataset.labelled_names, val_fraction=val_fraction, seed=seed, groups=groups)
    return dataset, train if split == "train" else val


def split_dicts(
    dataset: ChallengeDataset,
    split: str,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    group_by: str | None = None,
    manifest: str | os.PathLike | None = None,
    splits: Mapping[str, list[str]] | None = None,
    split_components: bool = False,
    min_area: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """Detectron2 dicts of one split (see :func:`split_names`). Unlabelled images always get
    ``annotations == []``; test images get annotations only when the test split has labels."""
    ds, names = split_names(dataset, split, val_fraction=val_fraction, seed=seed, group_by=group_by,
                            manifest=manifest, splits=splits)
    if ds is None:
        return []
    if split == "unlabelled" or ds.labels_path is None:
        dicts = dataset_dicts(ds, names, with_annotations=False)
        if split != "test":
            for d in dicts:
                d["annotations"] = []
        return dicts
    if split == "all":  # labelled images with annotations, the rest with none
        labelled = set(ds.labelled_names)
        with_anns = dataset_dicts(
            ds, [n for n in names if n in labelled], split_components=split_components,
            min_area=min_area, workers=workers, progress=progress,
        )
        by_name = {d["name"]: d for d in with_anns}
        out = []
        for d in dataset_dicts(ds, names, with_annotations=False):
            out.append(by_name.get(d["name"]) or {**d, "annotations": []})
        return out
    return dataset_dicts(
        ds, names, split_components=split_components, min_area=min_area, workers=workers, progress=progress
    )


# --------------------------------------------------------------------------------------------------
# lazy loaders
# --------------------------------------------------------------------------------------------------
def _stat_key(*paths: Path | None) -> tuple:
    key = []
    for p in paths:
        try:
            st = os.stat(p) if p is not None else None
        except OSError:
            st = None
        key.append(None if st is None else (st.st_mtime_ns, st.st_size))
    return tuple(key)


def _copy(dicts: list[dict]) -> list[dict]:
    return pickle.loads(pickle.dumps(dicts, protocol=pickle.HIGHEST_PROTOCOL))


class _ChallengeSource:
    """Opens the data set on first use and caches it and each split's dicts; a change of the image
    folder or labels file (mtime / size) invalidates the cache."""

    def __init__(self, root: Path, open_kwargs: dict, options: dict, split_file=None):
        self.root = root
        self.open_kwargs = open_kwargs
        self.options = options
        self.split_file = split_file
        self._dataset: ChallengeDataset | None = None
        self._stamp: tuple | None = None
        self._dicts: dict[str, list[dict]] = {}
        self._lock = threading.Lock()

    def _current_stamp(self, ds: ChallengeDataset) -> tuple:
        test_dir = self.root / "test-images"
        test_labels = [self.root / f for f in TEST_LABEL_FILES]
        return _stat_key(ds.image_dir, ds.labels_path, ds.annotated_path, test_dir, *test_labels)

    def dataset(self) -> ChallengeDataset:
        if self._dataset is not None and self._current_stamp(self._dataset) != self._stamp:
            logger.info("%s changed on disk: reopening it", self.root)
            self._dataset, self._dicts = None, {}
        if self._dataset is None:
            self._dataset = ChallengeDataset.open(self.root, **self.open_kwargs)
            self._stamp = self._current_stamp(self._dataset)
            if self.split_file:  # the names a split file gives must be this data set's
                from d2ct.data.splits import check_names, read_splits

                check_names(read_splits(self.split_file), self._dataset, self.split_file)
        return self._dataset

    def dicts(self, split: str) -> list[dict]:
        with self._lock:
            ds = self.dataset()
            if split not in self._dicts:
                self._dicts[split] = split_dicts(ds, split, **self.options)
                logger.info(
                    "%s: %s split, %d images, %d instances", self.root, split, len(self._dicts[split]),
                    sum(len(d.get("annotations", ())) for d in self._dicts[split]),
                )
            return _copy(self._dicts[split])


class _CocoSource:
    def __init__(self, path: Path, image_root: Path | None):
        self.path = path
        self.image_root = image_root
        self._stamp: tuple | None = None
        self._dicts: list[dict] | None = None
        self._lock = threading.Lock()

    def dicts(self) -> list[dict]:
        with self._lock:
            stamp = _stat_key(self.path)
            if self._dicts is None or stamp != self._stamp:
                self._dicts = load_coco_dicts(self.path, self.image_root)
                self._stamp = stamp
            return _copy(self._dicts)


# --------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------
def _remove(name: str) -> None:
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    _REGISTERED.pop(name, None)


def unregister(name: str) -> list[str]:
    """Remove a registered name, or every split of a base name registered by
    :func:`register_challenge_dataset`; returns the names removed."""
    with _LOCK:
        removed = []
        if name in _BASES:
            for full in _BASES.pop(name).values():
                _remove(full)
                removed.append(full)
        elif name in DatasetCatalog.list() or name in MetadataCatalog.list():
            _remove(name)
            removed.append(name)
        return removed


def _metadata(name: str, **fields) -> None:
    MetadataCatalog.get(name).set(
        thing_classes=[CATEGORY_NAME],
        thing_dataset_id_to_contiguous_id={COCO_CATEGORY_ID: 0},
        evaluator_type=EVALUATOR_TYPE,
        **{k: v for k, v in fields.items() if v is not None},
    )


def _default_image_dir(root: Path, image_dir) -> Path | None:
    if image_dir is not None:
        p = Path(image_dir)
        return p if p.is_absolute() else root / p
    return next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)


def register_challenge_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    group_by: str | None = None,
    manifest: str | os.PathLike | None = None,
    split_components: bool = False,
    min_area: int = 0,
    image_dir: str | os.PathLike | None = None,
    labels: str | os.PathLike | bool | None = None,
    annotated: str | os.PathLike | bool | None = None,
    split_file: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Register ``<name>_train``, ``_val``, ``_labelled``, ``_unlabelled`` and (when ``root`` has
    ``test-images/``) ``_test`` from a challenge-layout folder; lazy (see the module docs). The same
    name with the same arguments again is a no-op; with different arguments the old registration is
    replaced. ``group_by``: a column of ``manifest`` (default ``<root>/manifest.csv``), e.g.
    ``patient``, whose groups the train/val split keeps whole. ``split_file``: a split file written by
    the pipeline's data stage (:mod:`d2ct.data.splits`): its names are used instead of computing the
    split (val_fraction, seed and group_by are then ignored). Returns ``{split: registered name}``."""
    if not name or not isinstance(name, str):
        raise ConfigError(f"data set name must be a non-empty string, got {name!r}")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"{root_path}: data set folder not found (registering {name!r})")
    root_path = root_path.resolve()
    try:
        val_fraction = float(val_fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}") from None
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if int(min_area) < 0:
        raise ConfigError(f"min_area must be >= 0, got {min_area!r}")
    splits = None
    if split_file:
        from d2ct.data.splits import read_splits

        splits = read_splits(split_file)["splits"]
    norm = lambda v: v if v is None or isinstance(v, bool) else str(v)  # noqa: E731
    key = (
        "challenge", str(root_path), norm(image_dir), norm(labels), norm(annotated),
        val_fraction, int(seed), group_by or None, norm(manifest), bool(split_components), int(min_area),
        repr(splits),
    )
    img_dir = _default_image_dir(root_path, image_dir)
    has_test = (root_path / "test-images").is_dir() and (
        img_dir is None or img_dir.resolve() != (root_path / "test-images").resolve()
    )
    registered_splits = [s for s in SPLITS if s != "test" or has_test]
    full_names = {s: f"{name}_{s}" for s in registered_splits}

    with _LOCK:
        if (
            _BASES.get(name) == full_names
            and all(_REGISTERED.get(full) == key for full in full_names.values())
            and all(full in DatasetCatalog.list() for full in full_names.values())
        ):
            return dict(full_names)
        unregister(name)
        for full in full_names.values():
            if full in DatasetCatalog.list() or full in MetadataCatalog.list():
                logger.info("replacing the registered data set %r", full)
                _remove(full)

        source = _ChallengeSource(
            root_path,
            {"image_dir": image_dir, "labels": labels, "annotated": annotated},
            {"val_fraction": val_fraction, "seed": int(seed), "group_by": group_by or None, "manifest": manifest,
             "splits": splits, "split_components": bool(split_components), "min_area": int(min_area)},
            split_file=split_file,
        )
        for split, full in full_names.items():
            DatasetCatalog.register(full, lambda split=split: source.dicts(split))
            _metadata(
                full,
                root=str(root_path),
                image_root=str(root_path / "test-images") if split == "test" else (str(img_dir) if img_dir else None),
                base_name=name,
                split=split,
                split_file=str(split_file) if split_file else None,
                val_fraction=val_fraction,
                split_seed=int(seed),
                split_group_by=group_by or None,
                split_components=bool(split_components),
                min_area=int(min_area),
            )
            _REGISTERED[full] = key
        _BASES[name] = dict(full_names)
        logger.info("registered %s from %s", ", ".join(full_names.values()), root_path)
        return dict(full_names)


def register_coco_json(name: str, json_path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> str:
    """Register a COCO JSON file (e.g. pseudo-labels; annotations may carry ``score`` and
    ``label_value``) under ``name``, read lazily with :func:`~d2ct.data.coco.load_coco_dicts`
    (relative file names resolve against ``image_root``, default the JSON's folder). Idempotent like
    :func:`register_challenge_dataset`. Returns ``name``."""
    if not name or not isinstance(name, str):
        raise ConfigError(f"data set name must be a non-empty string, got {name!r}")
    path = Path(json_path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: COCO JSON not found (registering {name!r})")
    path = path.resolve()
    root = Path(image_root).expanduser().resolve() if image_root is not None else None
    key = ("coco", str(path), str(root) if root else None)
    with _LOCK:
        if _REGISTERED.get(name) == key and name in DatasetCatalog.list():
            return name
        if name in _BASES:
            unregister(name)
        _remove(name)
        source = _CocoSource(path, root)
        DatasetCatalog.register(name, source.dicts)
        _metadata(
            name,
            json_file=str(path),
            image_root=str(root if root is not None else path.parent),
            base_name=name,
            split="coco",
        )
        _REGISTERED[name] = key
        return name


# --------------------------------------------------------------------------------------------------
# names in configs
# --------------------------------------------------------------------------------------------------
def parse_dataset_name(name: str) -> tuple[str, str]:
    """``"phantom_train"`` -> ``("phantom", "train")``; the base may itself contain underscores
    (``"real_ct_dev_val"`` -> ``("real_ct_dev", "val")``). ConfigError for other names."""
    if isinstance(name, str):
        base, sep, split = name.rpartition("_")
        if sep and base and split in SPLITS:
            return base, split
    raise ConfigError(
        f"data set name {name!r} is not <base>_<split> with split one of {', '.join(SPLITS)}"
    )


def _roots_mapping(roots: Any) -> dict[str, str]:
    if roots is None:
        return {}
    if isinstance(roots, Mapping):
        return {str(k): str(v) for k, v in roots.items()}
    out = {}
    for item in roots:  # yacs-friendly: ["phantom", "datasets/phantom", ...] pairs or "name=path"
        if isinstance(item, str) and "=" in item:
            k, v = item.split("=", 1)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            k, v = item
        else:
            raise ConfigError(
                f"D2CT.DATASET_ROOTS entry {item!r}: expected a mapping, [name, path] pairs or 'name=path' strings"
            )
        out[str(k).strip()] = str(v).strip()
    return out


def ensure_registered(
    names: Iterable[str], roots: Any, *, option: str = "D2CT.DATASET_ROOTS", **options
) -> dict[str, str]:
    """Make sure every data set a config names is registered. Names already in DatasetCatalog are
    left alone. Otherwise ``roots`` (a mapping, or ``[name, path]`` pairs / ``"name=path"`` strings
    as yacs configs hold them) gives either the full name -> a COCO ``.json`` file
    (:func:`register_coco_json`), or the base name -> a challenge-layout folder
    (:func:`register_challenge_dataset` with ``options``: val_fraction, seed, split_components,
    min_area, image_dir, labels, annotated). Returns ``{name: how it was found}``."""
    mapping = _roots_mapping(roots)
    if isinstance(names, str):
        names = [names]
    result: dict[str, str] = {}
    for name in names:
        if name in DatasetCatalog.list():
            result[name] = "registered"
            continue
        if name in mapping:
            target = mapping[name]
            if not target.lower().endswith(".json"):
                raise ConfigError(f"{option}[{name!r}] = {target!r}: a full data set name must map to a COCO .json file")
            register_coco_json(name, target)
            result[name] = target
            continue
        try:
            base, split = parse_dataset_name(name)
        except ConfigError as exc:
            raise ConfigError(f"{exc}; it is not registered and {option} has no entry {name!r}") from None
        if base not in mapping:
            raise ConfigError(
                f"data set {name!r} is not registered and {option} has no entry {base!r} "
                f"(known: {', '.join(sorted(mapping)) or 'none'})"
            )
        registered = register_challenge_dataset(base, mapping[base], **options)
        if split not in registered:
            raise ConfigError(f"data set {name!r}: {mapping[base]} has no test-images/ folder ({option}[{base!r}])")
        result[name] = mapping[base]
    return result
