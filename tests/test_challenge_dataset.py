"""d2ct.data.challenge and d2ct.data.images: a folder in the challenge layout, validated."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d2ct.data.challenge import ChallengeDataset, read_annotated, split_labelled
from d2ct.data.images import list_slices, read_slice, write_slice
from d2ct.data.labels_csv import write_labels_csv
from d2ct.errors import DataError

H, W = 6, 5


def make_layout(
    root: Path,
    n: int = 12,
    n_labelled: int = 4,
    image_dir: str = "train-images",
    labels: str | None = "labels.csv",
    annotated: object = "default",
    seed: int = 0,
) -> np.ndarray:
    """n images 0..n-1 (natural order differs from lexicographic from n > 10); the first
    n_labelled have non-zero label maps. Returns the (n, H, W) label maps."""
    rng = np.random.default_rng(seed)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    maps = np.zeros((n, H, W), np.uint8)
    for i in range(n):
        write_slice(root / image_dir / f"{i}.png", rng.integers(0, 256, (H, W)).astype(np.uint8))
        if i < n_labelled:
            maps[i, 1:4, 1:3] = 1 + i % 3
            maps[i, 4, 4] = 7
    if labels:
        write_labels_csv(root / labels, [f"{i}.png" for i in range(n)], maps)
    if annotated == "default":
        annotated = {"annotated": [f"{i}.png" for i in range(n_labelled)]}
    if annotated is not None:
        (root / "annotated.json").write_text(json.dumps(annotated))
    return maps


# ---------------------------------------------------------------------------- images
def test_read_write_slice_uint8_uint16(tmp_path):
    a8 = np.arange(30, dtype=np.uint8).reshape(6, 5)
    a16 = (np.arange(30, dtype=np.uint16) * 2000).reshape(6, 5)
    write_slice(tmp_path / "a.png", a8)
    write_slice(tmp_path / "b.png", a16)
    r8, r16 = read_slice(tmp_path / "a.png"), read_slice(tmp_path / "b.png")
    assert r8.dtype == np.uint8 and np.array_equal(r8, a8)
    assert r16.dtype == np.uint16 and np.array_equal(r16, a16)
    with pytest.raises(DataError, match=r"c\.png.*uint8 or uint16.*float64"):
        write_slice(tmp_path / "c.png", a8.astype(np.float64))
    with pytest.raises(DataError, match=r"d\.png.*2-D"):
        write_slice(tmp_path / "d.png", np.zeros((2, 2, 3), np.uint8))
    assert not (tmp_path / "c.png").exists()


def test_rgb_and_palette_images_are_converted_with_a_warning(tmp_path, caplog):
    gray = np.arange(30, dtype=np.uint8).reshape(6, 5) * 8
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)])).save(tmp_path / "rgba.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "pal.png")
    for name in ("rgb.png", "rgba.png", "pal.png"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="d2ct.data.images"):
            out = read_slice(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (6, 5)
        assert np.abs(out.astype(int) - gray).max() <= 1
        assert name in caplog.text and "converted" in caplog.text


def test_missing_and_corrupt_images(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: image file not found"):
        read_slice(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DataError, match=r"bad\.png: cannot read the image"):
        read_slice(tmp_path / "bad.png")
    write_slice(tmp_path / "trunc.png", np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8))
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"trunc\.png: cannot read the image"):
        read_slice(tmp_path / "trunc.png")


def test_list_slices_natural_order_skips_hidden_and_other_files(tmp_path):
    for name in ["10.png", "2.png", "0.png", "1.PNG", ".0.png.tmp.png", "notes.txt", "11.png"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "3.png").mkdir()
    assert list_slices(tmp_path) == ["0.png", "1.PNG", "2.png", "10.png", "11.png"]
    with pytest.raises(DataError, match=r"missing: image folder not found"):
        list_slices(tmp_path / "missing")


# ---------------------------------------------------------------------------- open
def test_open_full_layout(tmp_path):
    maps = make_layout(tmp_path)
    ds = ChallengeDataset.open(tmp_path)
    assert ds.image_dir == tmp_path / "train-images"
    assert ds.names == [f"{i}.png" for i in range(12)]  # natural order: 0..11, not 0,1,10,11,2
    assert ds.shape == (H, W)
    assert ds.labels_path == tmp_path / "labels.csv"
    assert ds.annotated == ["0.png", "1.png", "2.png", "3.png"]
    assert ds.labelled_names == ["0.png", "1.png", "2.png", "3.png"]
    assert ds.unlabelled_names == [f"{i}.png" for i in range(4, 12)]
    assert np.array_equal(ds.label_map("2.png"), maps[2])
    assert ds.label_map("2.png").dtype == np.uint8
    assert ds.image_path("11.png") == tmp_path / "train-images" / "11.png"
    img = ds.read_image("11.png")
    assert img.shape == (H, W) and img.dtype == np.uint8
    assert ds.test_split() is None
    assert len(ds) == 12 and "labelled=4" in repr(ds)
    with pytest.raises(DataError, match=r"no image '99\.png'"):
        ds.image_path("99.png")


def test_labelled_from_nonzero_columns_without_annotated_file(tmp_path):
    make_layout(tmp_path, n_labelled=3, annotated=None, labels="labels.csv.gz")
    ds = ChallengeDataset.open(tmp_path)
    assert ds.annotated is None and ds.labels_path.name == "labels.csv.gz"
    assert ds.labelled_names == ["0.png", "1.png", "2.png"]
    assert ds.unlabelled_names == [f"{i}.png" for i in range(3, 12)]


def test_no_labels_file_everything_unlabelled(tmp_path):
    make_layout(tmp_path, image_dir="images", labels=None, annotated=None)
    ds = ChallengeDataset.open(tmp_path)
    assert ds.image_dir.name == "images" and ds.labels_path is None
    assert ds.labelled_names == [] and ds.unlabelled_names == ds.names
    assert ds.label_map("3.png") is None


def test_annotated_image_with_empty_map_is_labelled_and_warned(tmp_path, caplog):
    make_layout(tmp_path, n_labelled=2, annotated={"annotated": ["0.png", "1.png", "5.png"]})
    with caplog.at_level(logging.WARNING, logger="d2ct.data.challenge"):
        ds = ChallengeDataset.open(tmp_path)
    assert ds.labelled_names == ["0.png", "1.png", "5.png"]
    assert "all-zero" in caplog.text and "5.png" in caplog.text


@pytest.mark.parametrize(
    "content,expected",
    [
        (["3.png", "0.png", "10.png"], ["0.png", "3.png", "10.png"]),
        ({"annotated": [1, 2]}, ["1.png", "2.png"]),
        ({"0.png": ["liver", "spleen"], "1.png": [], "2": ["aorta"], "3.png": {}}, ["0.png", "2.png"]),
        ({"0.png": {"liver": 1}, "4.png": None}, ["0.png"]),
    ],
)
def test_annotated_formats(tmp_path, content, expected):
    make_layout(tmp_path, annotated=content)
    ds = ChallengeDataset.open(tmp_path)
    assert ds.annotated == expected and ds.labelled_names == expected


def test_annotated_labels_json_2025_name_is_found(tmp_path):
    make_layout(tmp_path, annotated=None)
    (tmp_path / "annotated_labels.json").write_text(json.dumps({"1.png": ["liver"], "7.png": ["kidney"]}))
    ds = ChallengeDataset.open(tmp_path)
    assert ds.annotated_path.name == "annotated_labels.json"
    assert ds.labelled_names == ["1.png", "7.png"]


def test_explicit_paths_and_disabling(tmp_path):
    make_layout(tmp_path, image_dir="slices", labels="my_labels.csv", annotated=None)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "ann.json").write_text(json.dumps(["1.png"]))
    ds = ChallengeDataset.open(tmp_path, image_dir="slices", labels="my_labels.csv", annotated="meta/ann.json")
    assert ds.labelled_names == ["1.png"] and ds.image_dir == tmp_path / "slices"
    ds = ChallengeDataset.open(tmp_path, image_dir=tmp_path / "slices", labels=False)
    assert ds.labels_path is None and ds.unlabelled_names == ds.names


def test_test_split(tmp_path):
    make_layout(tmp_path)
    make_layout(tmp_path, n=3, n_labelled=3, image_dir="test-images", labels="test-labels.csv", annotated=None)
    ds = ChallengeDataset.open(tmp_path)
    test = ds.test_split()
    assert test.image_dir == tmp_path / "test-images"
    assert test.labels_path == tmp_path / "test-labels.csv"
    assert test.names == ["0.png", "1.png", "2.png"] and test.labelled_names == test.names
    assert test.annotated is None
    (tmp_path / "test-labels.csv").unlink()
    test = ds.test_split()
    assert test.labels_path is None and test.unlabelled_names == ["0.png", "1.png", "2.png"]


def test_relative_root_and_test_split(tmp_path, monkeypatch):
    """The demo names its data set by a relative path: nothing may resolve it against itself twice."""
    root = tmp_path / "sets" / "a"
    make_layout(root)
    make_layout(root, n=2, n_labelled=2, image_dir="test-images", labels="test-labels.csv", annotated=None)
    monkeypatch.chdir(tmp_path)
    ds = ChallengeDataset.open("sets/a")
    test = ds.test_split()
    assert test is not None and test.labels_path.resolve() == (root / "test-labels.csv").resolve()
    assert test.labelled_names == ["0.png", "1.png"] and test.label_map("0.png") is not None


# ---------------------------------------------------------------------------- bad layouts
def test_missing_root_and_image_folder(tmp_path):
    with pytest.raises(DataError, match=r"nothing: data set folder not found"):
        ChallengeDataset.open(tmp_path / "nothing")
    with pytest.raises(DataError, match=r"no image folder found.*train-images/, images/, test-images/"):
        ChallengeDataset.open(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"images: no PNG images"):
        ChallengeDataset.open(tmp_path)
    with pytest.raises(DataError, match=r"other: image folder not found \(option image_dir\)"):
        ChallengeDataset.open(tmp_path, image_dir="other")


def test_csv_column_without_image(tmp_path):
    make_layout(tmp_path)
    (tmp_path / "train-images" / "7.png").unlink()  # the image file is missing
    with pytest.raises(DataError, match=r"labels\.csv: column '7\.png' has no image in .*train-images"):
        ChallengeDataset.open(tmp_path)


def test_image_without_csv_column(tmp_path):
    make_layout(tmp_path)
    write_slice(tmp_path / "train-images" / "12.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DataError, match=r"12\.png: image has no column in .*labels\.csv"):
        ChallengeDataset.open(tmp_path)


def test_image_file_removed_after_open(tmp_path):
    make_layout(tmp_path)
    ds = ChallengeDataset.open(tmp_path)
    (tmp_path / "train-images" / "5.png").unlink()
    with pytest.raises(DataError, match=r"5\.png: image file not found"):
        ds.read_image("5.png")


def test_pixel_count_not_h_times_w(tmp_path):
    make_layout(tmp_path, labels=None)
    write_labels_csv(tmp_path / "labels.csv", [f"{i}.png" for i in range(12)], np.zeros((12, H * W + 1), np.uint8))
    with pytest.raises(DataError, match=r"labels\.csv: the labels CSV has more than 30 pixel rows, expected 30 \(H\*W\)"):
        ChallengeDataset.open(tmp_path)


def test_bad_label_values_through_the_dataset(tmp_path):
    make_layout(tmp_path)
    lines = (tmp_path / "labels.csv").read_text().split("\n")
    lines[1 + 9] = lines[1 + 9].rsplit(",", 1)[0] + ",2.5"
    (tmp_path / "labels.csv").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"labels\.csv: column '11\.png', pixel 9 \(line 11\): label is '2\.5'"):
        ChallengeDataset.open(tmp_path)


def test_corrupt_png_found_at_open(tmp_path):
    make_layout(tmp_path)
    (tmp_path / "train-images" / "4.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"4\.png: cannot read the image"):
        ChallengeDataset.open(tmp_path)


def test_rgb_image_in_dataset_is_converted(tmp_path, caplog):
    make_layout(tmp_path)
    gray = np.full((H, W), 77, np.uint8)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "train-images" / "3.png")
    ds = ChallengeDataset.open(tmp_path)
    with caplog.at_level(logging.WARNING):
        img = ds.read_image("3.png")
    assert img.shape == (H, W) and (img == 77).all() and "3.png" in caplog.text


def test_mixed_image_sizes(tmp_path):
    make_layout(tmp_path)
    write_slice(tmp_path / "train-images" / "9.png", np.zeros((H + 1, W), np.uint8))
    with pytest.raises(DataError, match=r"9\.png: image size 7x5 \(HxW\) differs from 6x5 of 0\.png"):
        ChallengeDataset.open(tmp_path)
    # without the up-front check it is caught when the image is read
    ds = ChallengeDataset.open(tmp_path, check_images=False)
    with pytest.raises(DataError, match=r"9\.png: image size 7x5 differs"):
        ds.read_image("9.png")


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", r"annotated\.json: annotated file is not valid JSON"),
        ('{"annotated": "0.png"}', r"annotated\.json: 'annotated' must be a list"),
        ("42", r"annotated\.json: malformed annotated file \(int at top level\)"),
        ('[["0.png"]]', r"annotated\.json: entry 0 is \['0\.png'\], not an image name"),
        ('["0.png", "nope.png"]', r"annotated\.json: annotated image 'nope\.png' is not an image of the data set"),
    ],
)
def test_malformed_annotated(tmp_path, text, message):
    make_layout(tmp_path, annotated=None)
    (tmp_path / "annotated.json").write_text(text)
    with pytest.raises(DataError, match=message):
        ChallengeDataset.open(tmp_path)


def test_missing_annotated_or_labels_option(tmp_path):
    make_layout(tmp_path, annotated=None)
    with pytest.raises(DataError, match=r"ann\.json: annotated file not found \(option annotated\)"):
        ChallengeDataset.open(tmp_path, annotated="ann.json")
    with pytest.raises(DataError, match=r"lab\.csv: labels CSV not found \(option labels\)"):
        ChallengeDataset.open(tmp_path, labels="lab.csv")
    with pytest.raises(DataError, match=r"x\.json: annotated file not found"):
        read_annotated(tmp_path / "x.json")


# ---------------------------------------------------------------------------- split
def test_split_labelled_deterministic_disjoint_natural_order():
    names = [f"{i}.png" for i in range(50)]
    train, val = split_labelled(names, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(names)
    key = lambda s: int(s.split(".")[0])  # noqa: E731
    assert train == sorted(train, key=key) and val == sorted(val, key=key)
    assert split_labelled(list(reversed(names)), 0.2, seed=3) == (train, val)  # input order does not matter
    assert split_labelled(names, 0.2, seed=4) != (train, val)
    assert split_labelled(names, 0.0) == (names, [])
    assert split_labelled(["a.png", "b.png"], 0.01)[1] != []  # at least one val image
    assert split_labelled(["a.png"], 0.5) == (["a.png"], [])


@pytest.mark.parametrize("frac", [-0.1, 1.0, "x"])
def test_split_labelled_bad_fraction(frac):
    with pytest.raises(DataError, match="val_fraction"):
        split_labelled(["a.png", "b.png"], frac)


def test_split_labelled_duplicates():
    with pytest.raises(DataError, match=r"duplicate image name 'a\.png'"):
        split_labelled(["a.png", "b.png", "a.png"])


def test_split_labelled_keeps_groups_whole():
    names = [f"{i}.png" for i in range(60)]
    groups = {n: f"pt_{i // 4}" for i, n in enumerate(names)}  # 15 patients, 4 slices each
    train, val = split_labelled(names, 0.2, seed=5, groups=groups)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(names)
    assert {groups[n] for n in train}.isdisjoint({groups[n] for n in val})  # no patient on both sides
    assert len(val) == 12  # whole groups until at least round(60 * 0.2)
    assert split_labelled(list(reversed(names)), 0.2, seed=5, groups=groups) == (train, val)
    assert split_labelled(names, 0.2, seed=6, groups=groups) != (train, val)
    # uneven groups: val reaches the target with whole groups, train keeps at least one group
    uneven = {n: ("big" if i < 50 else f"small{i}") for i, n in enumerate(names)}
    train, val = split_labelled(names, 0.5, seed=0, groups=uneven)
    assert len(val) >= 30 or "big" not in {uneven[n] for n in val}
    assert train and {uneven[n] for n in train}.isdisjoint({uneven[n] for n in val})
    one_group = {n: "same" for n in names}
    assert split_labelled(names, 0.2, groups=one_group) == (names, [])


def test_split_labelled_group_missing():
    with pytest.raises(DataError, match=r"image 'b\.png' has no group"):
        split_labelled(["a.png", "b.png"], 0.5, groups={"a.png": "p1"})


def test_split_groups_from_manifest(tmp_path):
    root = tmp_path / "ds"
    names = [f"{i}.png" for i in range(8)]
    for n in names:
        write_slice(root / "train-images" / n, np.zeros((4, 4), np.uint8))
    write_labels_csv(root / "labels.csv", names, [np.full((4, 4), 1, np.uint8)] * 6 + [np.zeros((4, 4), np.uint8)] * 2)
    ds = ChallengeDataset.open(root)
    with pytest.raises(DataError, match=r"manifest\.csv: manifest not found.*'patient'"):
        ds.split_groups("patient")
    (root / "manifest.csv").write_text("id,patient\n" + "".join(f"{i},p{i // 2}\n" for i in range(5)))
    with pytest.raises(DataError, match=r"manifest\.csv: image '5\.png' has no row"):
        ds.split_groups("patient")
    with pytest.raises(DataError, match=r"no column 'scanner'"):
        ds.split_groups("scanner")
    (root / "manifest.csv").write_text("file,patient\n" + "".join(f"{i}.png,p{i // 2}\n" for i in range(8)))
    assert ds.split_groups("patient") == {f"{i}.png": f"p{i // 2}" for i in range(6)}  # labelled images only
    train, val = split_labelled(ds.labelled_names, 0.34, seed=0, groups=ds.split_groups("patient"))
    assert len(val) == 2 and val[0].split(".")[0] in {"0", "2", "4"}


# ---------------------------------------------------------------------------- real data
REAL = Path("/work/shared/data/real_ct_dev")


@pytest.mark.skipif(not REAL.is_dir(), reason="real_ct_dev not available")
def test_real_ct_dev():
    ds = ChallengeDataset.open(REAL, check_images=False)
    assert ds.image_dir.name == "images" and ds.shape == (512, 512) and len(ds.names) == 40
    assert ds.labelled_names == ds.names  # every image has structures; no annotated file
    lm = ds.label_map("1.png")
    assert lm.shape == (512, 512) and lm.max() >= 3
    assert ds.read_image("1.png").shape == (512, 512)


@pytest.mark.slow
def test_real_openkbp_fewshot():
    root = Path("/work/shared/data/openkbp_fewshot")
    if not root.is_dir():
        pytest.skip("openkbp_fewshot not available")
    ds = ChallengeDataset.open(root)
    assert ds.shape == (256, 256) and len(ds.names) == 1400
    assert ds.labelled_names == [f"{i}.png" for i in range(400)]
    assert ds.unlabelled_names == [f"{i}.png" for i in range(400, 1400)]
    assert all(ds.labels.is_empty(n) for n in ds.unlabelled_names[:50])


def test_transposed_labels_with_bare_ids_match_png_names(tmp_path, caplog):
    import pandas as pd

    maps = make_layout(tmp_path, n=4, n_labelled=2, labels=None, annotated=None)
    df = pd.DataFrame(maps.reshape(4, -1), index=[0, 1, 2, 3])
    df.index.name = "id"
    df.to_csv(tmp_path / "labels.csv")
    with caplog.at_level(logging.INFO):
        ds = ChallengeDataset.open(tmp_path)
    assert ds.labels.transposed and "transposed" in caplog.text
    assert ds.labelled_names == ["0.png", "1.png"]
    assert np.array_equal(ds.label_map("1.png"), maps[1])


def test_transposed_labels_with_another_pixel_count(tmp_path):
    """A transposed file (rows = images) with one pixel column too few: the reader names the file
    and both counts (the data set relies on it; it has no check of its own)."""
    import pandas as pd

    maps = make_layout(tmp_path, n=4, n_labelled=2, labels=None, annotated=None)
    df = pd.DataFrame(maps.reshape(4, -1)[:, :-1], index=[f"{i}.png" for i in range(4)])
    df.index.name = "name"
    df.to_csv(tmp_path / "labels.csv")
    with pytest.raises(DataError, match=rf"labels\.csv: the labels CSV has {H * W - 1} pixels per image, "
                                        rf"expected {H * W} \(H\*W\)"):
        ChallengeDataset.open(tmp_path)
