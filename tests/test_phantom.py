"""Procedural CT phantom: slices (anatomy, HU, labels) and the challenge-layout data set writer."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from d2ct.data.phantom import PhantomConfig, generate_slice, write_phantom_dataset, write_preview
from d2ct.errors import ConfigError, DataError

SIZE = 256


@pytest.fixture(scope="module")
def slices():
    """30 slices spread over the craniocaudal range (about 1 s)."""
    out = []
    for i, level in enumerate(np.linspace(0.0, 1.0, 30)):
        out.append(generate_slice(np.random.default_rng(1000 + i), SIZE, level=float(level)))
    return out


def _mask(labels, info, prefix):
    keys = [k for k, n in info["structures"].items() if n.startswith(prefix) and "lesion" not in n]
    return np.isin(labels, keys)


def test_generate_slice_is_deterministic_and_seed_dependent():
    a = generate_slice(np.random.default_rng(7), 128)
    b = generate_slice(np.random.default_rng(7), 128)
    c = generate_slice(np.random.default_rng(8), 128)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(a[2]["hu"], b[2]["hu"]) and a[2]["structures"] == b[2]["structures"]
    assert not np.array_equal(a[0], c[0])


def test_slice_types_and_shapes(slices):
    for image, labels, info in slices:
        assert image.shape == labels.shape == (SIZE, SIZE)
        assert image.dtype == np.uint8 and labels.dtype == np.uint8
        assert info["hu"].dtype == np.float32 and info["hu"].shape == (SIZE, SIZE)
        assert info["phase"] in ("enhanced", "unenhanced")
        # outside the body is air -> black after the window, like the challenge images
        assert image[:4, :4].max() == 0 and info["hu"][:4, :4].max() < -800


def test_structure_counts_and_labels_are_a_permutation(slices):
    for _, labels, info in slices:
        k = len(info["structures"])
        assert 5 <= k <= 25
        present = set(np.unique(labels).tolist()) - {0}
        assert present == set(range(1, k + 1)) == set(info["structures"])


def test_label_numbers_vary_across_images(slices):
    numbers = {n: set() for n in ("spinal_canal", "aorta", "autochthon_left")}
    for _, _, info in slices:
        for lab, name in info["structures"].items():
            if name in numbers:
                numbers[name].add(lab)
    for name, seen in numbers.items():
        assert len(seen) >= 4, (name, seen)


def test_anatomy_follows_the_level(slices):
    names_top = {n for _, _, info in slices[:5] for n in list(info["structures"].values()) + info["unlabelled"]}
    names_bottom = {n for _, _, info in slices[-5:] for n in list(info["structures"].values()) + info["unlabelled"]}
    assert "liver" in names_top and any(n.startswith("lung_") for n in names_top)
    assert not any(n.startswith(("lung_", "spleen")) or n == "liver" for n in names_bottom)
    assert any(n.startswith("hip_") for n in names_bottom) and "small_bowel" in names_bottom


def test_radiological_orientation():
    """Liver on the image left (patient right), spleen on the right, aorta in front of the spine."""
    for seed in range(4):
        _, labels, info = generate_slice(np.random.default_rng(seed), SIZE, level=0.15, label_dropout=0.0)
        cols = {n: np.argwhere(labels == k).mean(axis=0) for k, n in info["structures"].items()}
        assert cols["liver"][1] < SIZE / 2 < cols["spleen"][1]
        vert = next(v for n, v in cols.items() if n.startswith(("vertebra", "intervertebral")))
        assert cols["aorta"][0] < vert[0]  # anterior = smaller row
        assert cols["rectus_abdominis_left"][0] < cols["aorta"][0] < cols["autochthon_left"][0]
        assert cols["inferior_vena_cava"][1] < cols["aorta"][1]  # IVC on the patient's right


@pytest.mark.parametrize("prefix, lo, hi", [
    ("liver", 40, 120), ("spleen", 30, 140), ("autochthon", 30, 75), ("psoas", 30, 75),
    ("aorta", 20, 230), ("spinal_canal", -10, 60), ("kidney_", 10, 200), ("lung_", -1000, -600),
])
def test_tissue_hu_plausible(slices, prefix, lo, hi):
    found = 0
    for _, labels, info in slices:
        m = ndimage.binary_erosion(_mask(labels, info, prefix), iterations=2)  # inside: no partial volume
        if m.sum() >= 20:
            med = float(np.median(info["hu"][m]))
            assert lo <= med <= hi, (prefix, med, info["level"])
            found += 1
    assert found >= 2, prefix


def test_bone_and_fat_hu(slices):
    for _, labels, info in slices:
        hu = info["hu"]
        vert = _mask(labels, info, "vertebra_")
        if vert.sum() > 50:
            assert hu[vert].max() > 500  # cortical bone
            assert 150 < np.median(hu[vert]) < 900
        body = hu > -500
        # subcutaneous / visceral fat: a clear mode around -100 HU inside the body
        fat = (hu > -160) & (hu < -40) & body
        assert fat.sum() > 0.05 * body.sum()
        assert -120 < np.median(hu[fat]) < -60


def test_label_dropout_leaves_some_structures_unlabelled(slices):
    n_lab = sum(len(info["structures"]) for _, _, info in slices)
    n_unl = sum(len(info["unlabelled"]) for _, _, info in slices)
    frac = n_unl / (n_lab + n_unl)
    assert 0.05 < frac < 0.3
    _, labels, info = generate_slice(np.random.default_rng(3), SIZE, level=0.5, label_dropout=0.0)
    assert info["unlabelled"] == [] and len(info["structures"]) >= 5


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="level"):
        generate_slice(rng, 128, level=1.5)
    with pytest.raises(ConfigError, match="size"):
        generate_slice(rng, 8)
    with pytest.raises(ConfigError, match="label_dropout"):
        generate_slice(rng, 128, label_dropout=1.0)
    with pytest.raises(ConfigError, match="min_structures"):
        generate_slice(rng, 128, config=PhantomConfig(min_structures=30))


# ----------------------------------------------------------------------------------- data set
KW = dict(n_train=6, n_labelled=3, n_test=2, size=96, seed=5, progress=False)


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ph") / "set", **KW)


def test_dataset_layout_reads_back(phantom_root):
    from d2ct.data.challenge import ChallengeDataset

    ds = ChallengeDataset.open(phantom_root)
    assert ds.names == [f"{i}.png" for i in range(6)] and ds.shape == (96, 96)
    assert ds.labelled_names == ["0.png", "1.png", "2.png"]
    assert json.loads((phantom_root / "annotated.json").read_text()) == {"annotated": ["0.png", "1.png", "2.png"]}
    for name in ds.names[:3]:
        assert ds.label_map(name).max() >= 5
        assert ds.read_image(name).dtype == np.uint8
    for name in ds.names[3:]:
        assert not ds.label_map(name).any()  # the unlabelled pool
    test = ds.test_split()
    assert test is not None and test.names == ["0.png", "1.png"] and test.shape == (96, 96)
    assert all(test.label_map(n).max() >= 5 for n in test.names)
    with open(phantom_root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["split"], r["file"]) for r in rows] == [("train", f"{i}.png") for i in range(6)] + [("test", "0.png"), ("test", "1.png")]
    for r in rows[:3]:
        img_labels = ds.label_map(r["file"])
        pairs = dict(p.split("=") for p in r["structures"].split(";"))
        assert int(r["n_structures"]) == len(pairs) == img_labels.max()
        assert 0.0 <= float(r["level"]) <= 1.0


def test_dataset_is_reproducible_and_independent_of_workers(phantom_root, tmp_path):
    again = write_phantom_dataset(tmp_path / "again", **KW, workers=2)
    assert _digest(again) == _digest(phantom_root)
    other = write_phantom_dataset(tmp_path / "other", **{**KW, "seed": 6})
    assert _digest(other)["train-images/0.png"] != _digest(phantom_root)["train-images/0.png"]


def test_skip_when_complete_and_regenerate_otherwise(tmp_path):
    root = write_phantom_dataset(tmp_path / "set", **{**KW, "n_test": 0})
    png = root / "train-images" / "0.png"
    stamp = png.stat().st_mtime_ns, png.stat().st_ino
    write_phantom_dataset(root, **{**KW, "n_test": 0})
    assert (png.stat().st_mtime_ns, png.stat().st_ino) == stamp  # untouched
    assert not (root / "test-images").exists()
    # incomplete (a file lost) -> written again, atomically, with nothing left over
    (root / "train-images" / "4.png").unlink()
    write_phantom_dataset(root, **{**KW, "n_test": 0})
    assert (root / "train-images" / "4.png").is_file()
    # other parameters -> replaced
    write_phantom_dataset(root, **{**KW, "n_train": 4, "n_test": 0})
    assert sorted(p.name for p in (root / "train-images").iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    assert json.loads((root / "phantom.json").read_text())["n_train"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no temporary folders left


def test_dataset_refuses_foreign_folder_and_bad_counts(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        write_phantom_dataset(foreign, **KW)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="n_labelled"):
        write_phantom_dataset(tmp_path / "x", **{**KW, "n_labelled": 10})
    with pytest.raises(ConfigError, match="n_train"):
        write_phantom_dataset(tmp_path / "x", **{**KW, "n_train": 0})


def test_preview_and_tool(phantom_root, tmp_path, capsys):
    from d2ct.data.cli import make_phantom as tool

    out = write_preview(phantom_root, tmp_path / "p.png", n=3)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = tool.main(["--out", str(tmp_path / "t"), "--n-train", "3", "--n-labelled", "2", "--n-test", "0",
                    "--size", "64", "--preview", str(tmp_path / "t.png")])
    assert rc == 0 and (tmp_path / "t" / "labels.csv.gz").is_file() and (tmp_path / "t.png").is_file()
    rc = tool.main(["--out", str(tmp_path / "u"), "--n-train", "2", "--n-labelled", "3"])
    assert rc == 2 and "error: " in capsys.readouterr().err


def test_committed_sample_is_the_generator_output(tmp_path):
    """datasets/sample (committed, documented in datasets/README.md) is exactly what its command writes."""
    sample = Path(__file__).resolve().parents[1] / "datasets" / "sample"
    params = json.loads((sample / "phantom.json").read_text())
    again = write_phantom_dataset(tmp_path / "sample", n_train=params["n_train"], n_labelled=params["n_labelled"],
                                  n_test=params["n_test"], size=params["size"], seed=params["seed"], progress=False)
    committed = {k: v for k, v in _digest(sample).items() if k != "preview.png"}
    assert committed == _digest(again), (
        "the phantom generator changed: regenerate the sample with the command in datasets/README.md")
