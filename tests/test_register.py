"""Detectron2 registration of challenge-layout folders and COCO JSON files (d2ct.data.register),
and tools/convert_to_coco.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_train_loader

from d2ct.data.coco import load_coco_dicts, to_coco_json
from d2ct.data.images import write_slice
from d2ct.data.labels_csv import write_labels_csv
from d2ct.data.register import (
    ensure_registered,
    parse_dataset_name,
    register_challenge_dataset,
    register_coco_json,
    unregister,
)
from d2ct.errors import ConfigError, DataError
from d2ct.postprocess.flatten import instances_to_label_map
from d2ct.utils.fileio import atomic_write_json

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 24, 32
N_LABELLED, N_IMAGES, N_TEST = 10, 14, 3


def _label_map(rng: np.random.Generator) -> np.ndarray:
    lm = np.zeros((H, W), np.uint8)
    for value in rng.permutation(np.arange(1, rng.integers(2, 6)) * 3):  # values 3, 6, ... (not 1..K)
        y, x = rng.integers(0, H - 3), rng.integers(0, W - 3)
        lm[y : y + rng.integers(2, 8), x : x + rng.integers(2, 8)] = value
    lm[0, W - 1] = 3  # touches the border; makes 3 a multi-part structure
    return lm


def make_dataset(root: Path, *, test_labels: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny challenge-layout folder: 14 train images (the first 10 labelled), 3 test images."""
    rng = np.random.default_rng(seed)
    names = [f"{i}.png" for i in range(N_IMAGES)]
    maps = {n: (_label_map(rng) if i < N_LABELLED else np.zeros((H, W), np.uint8)) for i, n in enumerate(names)}
    for n in names:
        write_slice(root / "train-images" / n, rng.integers(0, 256, (H, W), dtype=np.uint8))
    write_labels_csv(root / "labels.csv", names, [maps[n] for n in names])
    test_names = [f"{i}.png" for i in range(N_TEST)]
    test_maps = {n: _label_map(rng) for n in test_names}
    for n in test_names:
        write_slice(root / "test-images" / n, rng.integers(0, 256, (H, W), dtype=np.uint8))
    if test_labels:
        write_labels_csv(root / "test-labels.csv", test_names, [test_maps[n] for n in test_names])
    return {**{f"train/{k}": v for k, v in maps.items()}, **{f"test/{k}": v for k, v in test_maps.items()}}


@pytest.fixture
def tiny(tmp_path, request):
    root = tmp_path / "tiny"
    maps = make_dataset(root)
    name = "t" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    yield name, root, maps
    unregister(name)


def _rebuild(record) -> np.ndarray:
    anns = record["annotations"]
    return instances_to_label_map(
        [a["segmentation"] for a in anns], shape=(record["height"], record["width"]),
        labels=[a["label_value"] for a in anns],
    )


def test_parse_dataset_name():
    assert parse_dataset_name("phantom_train") == ("phantom", "train")
    assert parse_dataset_name("real_ct_dev_unlabelled") == ("real_ct_dev", "unlabelled")
    for bad in ("phantom", "phantom_pseudo", "_train", "", None):
        with pytest.raises(ConfigError):
            parse_dataset_name(bad)


def test_every_split_is_registered_and_correct(tiny):
    name, root, maps = tiny
    registered = register_challenge_dataset(name, root, val_fraction=0.3, seed=1)
    assert registered == {s: f"{name}_{s}" for s in ("train", "val", "labelled", "unlabelled", "test")}
    get = {s: DatasetCatalog.get(full) for s, full in registered.items()}

    train_names = {d["name"] for d in get["train"]}
    val_names = {d["name"] for d in get["val"]}
    assert not train_names & val_names
    assert train_names | val_names == {f"{i}.png" for i in range(N_LABELLED)}
    assert len(val_names) == 3
    assert [d["name"] for d in get["labelled"]] == [f"{i}.png" for i in range(N_LABELLED)]
    assert [d["name"] for d in get["unlabelled"]] == [f"{i}.png" for i in range(N_LABELLED, N_IMAGES)]
    assert all(d["annotations"] == [] for d in get["unlabelled"])
    assert [d["name"] for d in get["test"]] == [f"{i}.png" for i in range(N_TEST)]

    for d in get["labelled"]:
        assert d["image_id"] == int(d["name"].split(".")[0])  # position in natural order
        assert Path(d["file_name"]) == root.resolve() / "train-images" / d["name"]
        assert (d["height"], d["width"]) == (H, W)
        assert d["annotations"] and {a["category_id"] for a in d["annotations"]} == {0}
        assert np.array_equal(_rebuild(d), maps[f"train/{d['name']}"])
    for d in get["test"]:
        assert Path(d["file_name"]).parent.name == "test-images"
        assert np.array_equal(_rebuild(d), maps[f"test/{d['name']}"])

    meta = MetadataCatalog.get(registered["train"])
    assert meta.thing_classes == ["structure"] and meta.evaluator_type == "d2ct"
    assert meta.split == "train" and meta.base_name == name and meta.root == str(root.resolve())
    assert MetadataCatalog.get(registered["test"]).image_root == str(root.resolve() / "test-images")


def test_group_by_keeps_patients_on_one_side(tiny):
    name, root, _ = tiny
    patient = {f"{i}.png": f"pt{i % 4}" for i in range(N_IMAGES)}
    (root / "manifest.csv").write_text("file,patient\n" + "".join(f"{n},{p}\n" for n, p in patient.items()))
    try:
        registered = register_challenge_dataset(name, root, val_fraction=0.3, seed=1, group_by="patient")
        train = {d["name"] for d in DatasetCatalog.get(registered["train"])}
        val = {d["name"] for d in DatasetCatalog.get(registered["val"])}
        assert train | val == {f"{i}.png" for i in range(N_LABELLED)} and len(val) >= 3
        assert {patient[n] for n in train}.isdisjoint({patient[n] for n in val})
        assert MetadataCatalog.get(registered["val"]).split_group_by == "patient"
    finally:
        (root / "manifest.csv").unlink()
        unregister(name)


def test_split_components_and_min_area_reach_the_dicts(tiny):
    from scipy import ndimage

    name, root, maps = tiny
    register_challenge_dataset(name, root, split_components=True, min_area=2)
    n_small = 0
    for d in DatasetCatalog.get(f"{name}_labelled"):
        lm = maps[f"train/{d['name']}"]
        expected = []
        for value in [v for v in np.unique(lm) if v]:
            comps, n = ndimage.label(lm == value, structure=np.ones((3, 3)))
            sizes = np.bincount(comps.ravel())[1:]
            n_small += int((sizes < 2).sum())
            expected += [int(value)] * int((sizes >= 2).sum())
        assert [a["label_value"] for a in d["annotations"]] == expected
        assert all(a["area"] >= 2 for a in d["annotations"])
    assert n_small > 0  # the lone border pixels were there and were dropped


def test_registration_is_idempotent_and_replaceable(tiny, tmp_path):
    name, root, _ = tiny
    first = register_challenge_dataset(name, root, val_fraction=0.2, seed=0)
    fn_before = DatasetCatalog[first["train"]]
    assert register_challenge_dataset(name, root, val_fraction=0.2, seed=0) == first
    fn_after = DatasetCatalog[first["train"]]
    assert fn_after is fn_before  # same arguments: nothing re-registered
    val_before = {d["name"] for d in DatasetCatalog.get(first["val"])}

    # different arguments: replaced (another split), and a folder without test-images/ drops _test
    register_challenge_dataset(name, root, val_fraction=0.5, seed=3)
    assert len(DatasetCatalog.get(first["val"])) == 5
    assert {d["name"] for d in DatasetCatalog.get(first["val"])} != val_before
    other = tmp_path / "other"
    make_dataset(other)
    import shutil

    shutil.rmtree(other / "test-images")
    again = register_challenge_dataset(name, other)
    assert "test" not in again and first["test"] not in DatasetCatalog.list()
    assert MetadataCatalog.get(again["train"]).root == str(other.resolve())


def test_lazy_registration_and_bad_folders(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        register_challenge_dataset("nowhere", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="val_fraction"):
        register_challenge_dataset("x", tmp_path, val_fraction=1.5)
    # registering reads nothing: a broken folder only fails on first use, with a DataError
    (tmp_path / "broken" / "train-images").mkdir(parents=True)
    names = register_challenge_dataset("broken", tmp_path / "broken")
    try:
        with pytest.raises(DataError, match="no PNG"):
            DatasetCatalog.get(names["train"])
    finally:
        unregister("broken")


def test_detectron2_train_loader_builds_bitmasks(tiny):
    name, root, maps = tiny
    registered = register_challenge_dataset(name, root)
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (registered["labelled"],)
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.INPUT.MIN_SIZE_TRAIN = (H,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
    cfg.SOLVER.IMS_PER_BATCH = 3
    loader = build_detection_train_loader(cfg, mapper=DatasetMapper(cfg, is_train=True))
    batch = next(iter(loader))
    assert len(batch) == 3
    for item in batch:
        inst = item["instances"]
        assert item["image"].shape[1:] == (H, W)
        assert inst.has("gt_masks") and type(inst.gt_masks).__name__ == "BitMasks"
        masks = inst.gt_masks.tensor.numpy()
        assert masks.shape[1:] == (H, W) and len(inst) == masks.shape[0] > 0
        assert (inst.gt_classes == 0).all()
        lm = maps[f"train/{Path(item['file_name']).name}"]
        values = [v for v in np.unique(lm) if v]
        assert len(values) == masks.shape[0]
        for mask, value in zip(masks, values):  # label order is ascending value
            assert np.array_equal(mask, lm == value)


def test_coco_json_round_trip_and_register_coco_json(tiny, tmp_path):
    name, root, maps = tiny
    registered = register_challenge_dataset(name, root)
    dicts = DatasetCatalog.get(registered["labelled"]) + DatasetCatalog.get(registered["unlabelled"])
    for d in dicts[:2]:
        for i, a in enumerate(d["annotations"]):
            a["score"] = 0.5 + 0.1 * i
    path = tmp_path / "pseudo" / "pseudo.json"
    atomic_write_json(path, to_coco_json(dicts, description="round trip"))
    back = load_coco_dicts(path)
    assert len(back) == N_IMAGES
    by_id = {d["image_id"]: d for d in back}
    for d in dicts:
        b = by_id[d["image_id"]]
        assert b["file_name"] == d["file_name"] and b["name"] == d["name"]
        assert [a["segmentation"] for a in b["annotations"]] == [a["segmentation"] for a in d["annotations"]]
        assert [a.get("score") for a in b["annotations"]] == [a.get("score") for a in d["annotations"]]
        if d["annotations"]:
            assert np.array_equal(_rebuild(b), maps[f"train/{d['name']}"])
        else:
            assert b["annotations"] == []

    pname = f"{name}_pseudo"
    try:
        assert register_coco_json(pname, path) == pname
        assert register_coco_json(pname, path) == pname  # idempotent
        got = DatasetCatalog.get(pname)
        assert [d["image_id"] for d in got] == sorted(d["image_id"] for d in dicts)
        assert got[0]["annotations"][1]["score"] == pytest.approx(0.6)
        meta = MetadataCatalog.get(pname)
        assert meta.json_file == str(path.resolve()) and meta.thing_classes == ["structure"]
    finally:
        unregister(pname)
    with pytest.raises(DataError, match="missing.json"):
        register_coco_json(pname, tmp_path / "missing.json")


def test_ensure_registered_from_roots(tiny, tmp_path):
    name, root, _ = tiny
    json_path = tmp_path / "p.json"
    atomic_write_json(json_path, to_coco_json([], description="empty"))
    pseudo = f"{name}_extra"
    try:
        found = ensure_registered(
            [f"{name}_train", f"{name}_test", pseudo], [[name, str(root)], f"{pseudo}={json_path}"], seed=2
        )
        # _test came with _train (one folder registers every split)
        assert found == {f"{name}_train": str(root), f"{name}_test": "registered", pseudo: str(json_path)}
        assert MetadataCatalog.get(f"{name}_val").split_seed == 2
        assert DatasetCatalog.get(pseudo) == []
        assert ensure_registered([f"{name}_val"], {})[f"{name}_val"] == "registered"
    finally:
        unregister(pseudo)
    with pytest.raises(ConfigError, match="D2CT.DATASET_ROOTS has no entry 'nobase'"):
        ensure_registered(["nobase_train"], {name: str(root)})
    with pytest.raises(ConfigError, match="not <base>_<split>"):
        ensure_registered(["weird"], {})
    no_test = tmp_path / "no_test"
    make_dataset(no_test)
    import shutil

    shutil.rmtree(no_test / "test-images")
    try:
        with pytest.raises(ConfigError, match="no test-images"):
            ensure_registered(["nt_test"], {"nt": str(no_test)})
    finally:
        unregister("nt")


# --------------------------------------------------------------------------------------------------
# d2ct-convert-to-coco (d2ct.data.cli.convert_to_coco; tools/convert_to_coco.py)
# --------------------------------------------------------------------------------------------------
def _tool():
    from d2ct.data.cli import convert_to_coco

    return convert_to_coco


def test_convert_tool(tmp_path, capsys):
    root = tmp_path / "ds"
    maps = make_dataset(root)
    tool = _tool()
    out = tmp_path / "o" / "train.json"
    assert tool.main([str(root), "--split", "all", "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert f"{N_IMAGES} images ({N_LABELLED} with annotations)" in line and "instances per image" in line
    coco = json.loads(out.read_text())
    assert len(coco["images"]) == N_IMAGES and coco["categories"][0]["id"] == 1
    n_expected = sum(len([v for v in np.unique(m) if v]) for k, m in maps.items() if k.startswith("train/"))
    assert len(coco["annotations"]) == n_expected
    ann = coco["annotations"][0]
    mask = mask_util.decode({"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()})
    img = next(i for i in coco["images"] if i["id"] == ann["image_id"])
    assert np.array_equal(mask.astype(bool), maps[f"train/{img['name']}"] == ann["label_value"])

    out_test = tmp_path / "o" / "test.json"
    assert tool.main([str(root), "--split", "test", "--out", str(out_test), "--relative", "--no-progress"]) == 0
    capsys.readouterr()
    back = load_coco_dicts(out_test)
    assert [d["name"] for d in back] == [f"{i}.png" for i in range(N_TEST)]
    assert Path(back[0]["file_name"]) == root / "test-images" / "0.png"

    assert tool.main([str(tmp_path / "nope"), "--split", "train", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(SystemExit):
        tool.main([str(root), "--split", "bogus", "--out", str(out)])
