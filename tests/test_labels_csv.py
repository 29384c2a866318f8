"""d2ct.data.labels_csv: the challenge label / submission CSV (read, write, orientation, errors)."""
from __future__ import annotations

import gzip
import logging

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import d2ct.data.labels_csv as lc
from d2ct.data.labels_csv import LabelTable, read_labels_csv, write_labels_csv
from d2ct.errors import DataError


def _maps(n=5, h=6, w=7, seed=0, high=40):
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, high, size=(n, h, w)).astype(np.uint8)
    maps[maps < high // 2] = 0  # mostly background
    return maps


def _names(n):
    return [f"{i}.png" for i in range(n)]


@pytest.fixture
def no_slow(monkeypatch):
    """Fail if a fallback parser is used: well-formed files must take the vectorised path."""

    def boom(*args, **kwargs):
        raise AssertionError("fallback parser used")

    monkeypatch.setattr(lc, "_parse_pandas", boom)
    monkeypatch.setattr(lc, "_parse_slow", boom)


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_roundtrip_and_pandas_reads_it_back(tmp_path, suffix, no_slow):
    maps = _maps()
    names = _names(5)
    path = tmp_path / f"pred{suffix}"
    write_labels_csv(path, names, maps)
    if suffix.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    df = pd.read_csv(path, index_col=0)
    assert df.index.name == "pixel"
    assert list(df.columns) == names
    assert list(df.index) == list(range(6 * 7))
    assert np.array_equal(df.to_numpy().T, maps.reshape(5, -1))
    assert all(np.issubdtype(t, np.integer) for t in df.dtypes)
    table = read_labels_csv(path)
    assert table.names == names and table.index_name == "pixel" and not table.transposed
    assert table.values.dtype == np.uint8 and table.values.shape == (5, 42)
    assert table.values.flags.c_contiguous
    assert np.array_equal(table.values, maps.reshape(5, -1))
    assert table.source == str(path)


def test_output_is_byte_identical_to_pandas_to_csv(tmp_path):
    maps = _maps(n=4, h=12, w=11, high=256)
    names = ["a.png", "b c.png", "10.png", "2.png"]
    write_labels_csv(tmp_path / "ours.csv", names, maps)
    df = pd.DataFrame(maps.reshape(4, -1).T, columns=names)
    df.index.name = "pixel"
    df.to_csv(tmp_path / "pandas.csv")
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()


def test_write_accepts_2d_array_and_sequence_of_maps(tmp_path):
    maps = _maps(n=3, h=4, w=5)
    write_labels_csv(tmp_path / "a.csv", _names(3), maps.reshape(3, -1))
    write_labels_csv(tmp_path / "b.csv", _names(3), [m.astype(np.int64) for m in maps])
    write_labels_csv(tmp_path / "c.csv", _names(3), [m.astype(np.float32) for m in maps])
    ref = (tmp_path / "a.csv").read_bytes()
    assert (tmp_path / "b.csv").read_bytes() == ref
    assert (tmp_path / "c.csv").read_bytes() == ref


def test_index_name_is_kept(tmp_path):
    maps = _maps(n=2, h=3, w=3)
    write_labels_csv(tmp_path / "a.csv", _names(2), maps, index_name="Id")
    assert (tmp_path / "a.csv").read_text().startswith("Id,0.png,1.png\n")
    assert read_labels_csv(tmp_path / "a.csv").index_name == "Id"
    # an unnamed index, as pandas writes it
    df = pd.DataFrame(maps.reshape(2, -1).T, columns=_names(2))
    df.to_csv(tmp_path / "b.csv")
    t = read_labels_csv(tmp_path / "b.csv")
    assert t.index_name == "" and np.array_equal(t.values, maps.reshape(2, -1))


def test_full_label_range_and_three_digit_values(tmp_path, no_slow):
    values = np.arange(256, dtype=np.uint8).reshape(2, 128)
    write_labels_csv(tmp_path / "a.csv", ["x.png", "y.png"], values)
    assert np.array_equal(read_labels_csv(tmp_path / "a.csv").values, values)


def test_all_single_digit_path(tmp_path, no_slow):
    values = (np.arange(300) % 10).astype(np.uint8).reshape(3, 100)
    write_labels_csv(tmp_path / "a.csv", _names(3), values)
    assert np.array_equal(read_labels_csv(tmp_path / "a.csv").values, values)


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_small_blocks_rows_spanning_blocks(tmp_path, monkeypatch, block):
    """Block boundaries inside rows, and rows longer than a block (the buffer must grow)."""
    monkeypatch.setattr(lc, "_BLOCK", block)
    maps = _maps(n=60, h=5, w=5, high=300 // 2)
    write_labels_csv(tmp_path / "a.csv", _names(60), maps)
    t = read_labels_csv(tmp_path / "a.csv")
    assert np.array_equal(t.values, maps.reshape(60, -1))
    write_labels_csv(tmp_path / "a.csv.gz", _names(60), maps)
    assert np.array_equal(read_labels_csv(tmp_path / "a.csv.gz", expected_pixels=25).values, maps.reshape(60, -1))


def test_expected_pixels_fills_in_place_and_checks(tmp_path):
    maps = _maps(n=3, h=4, w=4)
    write_labels_csv(tmp_path / "a.csv", _names(3), maps)
    assert np.array_equal(read_labels_csv(tmp_path / "a.csv", expected_pixels=16).values, maps.reshape(3, -1))
    with pytest.raises(DataError, match=r"a\.csv.*16 pixel rows, expected 20"):
        read_labels_csv(tmp_path / "a.csv", expected_pixels=20)
    with pytest.raises(DataError, match=r"a\.csv.*more than 9 pixel rows"):
        read_labels_csv(tmp_path / "a.csv", expected_pixels=9)


def test_gzip_detected_from_content_not_suffix(tmp_path):
    maps = _maps(n=2, h=3, w=3)
    write_labels_csv(tmp_path / "a.csv.gz", _names(2), maps)
    (tmp_path / "plain_name.csv").write_bytes((tmp_path / "a.csv.gz").read_bytes())
    assert np.array_equal(read_labels_csv(tmp_path / "plain_name.csv").values, maps.reshape(2, -1))


def test_crlf_and_no_trailing_newline_take_the_fast_path(tmp_path, no_slow):
    (tmp_path / "crlf.csv").write_bytes(b"pixel,0.png,1.png\r\n0,1,0\r\n1,0,12\r\n")
    t = read_labels_csv(tmp_path / "crlf.csv")
    assert t.values.tolist() == [[1, 0], [0, 12]]
    (tmp_path / "nonl.csv").write_bytes(b"pixel,0.png\n0,3\n1,4")
    assert read_labels_csv(tmp_path / "nonl.csv").values.tolist() == [[3, 4]]


def test_quotes_spaces_and_float_text(tmp_path):
    # quoted names / values and integral floats (e.g. written from a float frame) go the exact way
    (tmp_path / "q.csv").write_bytes(b'"pixel","a,b.png","c.png"\n0,"2",3.0\n1, 4 ,5\n')
    t = read_labels_csv(tmp_path / "q.csv")
    assert t.names == ["a,b.png", "c.png"] and t.values.tolist() == [[2, 4], [3, 5]]


# ---------------------------------------------------------------------------- transposed
def test_transposed_file_is_detected_and_logged(tmp_path, caplog, no_slow):
    maps = _maps(n=4, h=5, w=6)
    df = pd.DataFrame(maps.reshape(4, -1), index=_names(4))
    df.index.name = "image"
    df.to_csv(tmp_path / "t.csv")
    with caplog.at_level(logging.INFO, logger="d2ct.data.labels_csv"):
        t = read_labels_csv(tmp_path / "t.csv", expected_pixels=30)
    assert t.transposed
    assert "transposed" in caplog.text and "t.csv" in caplog.text
    assert t.names == _names(4)
    assert np.array_equal(t.values, maps.reshape(4, -1))
    assert np.array_equal(t.label_map("2.png", (5, 6)), maps[2])


def test_transposed_with_integer_image_names(tmp_path, no_slow):
    maps = _maps(n=3, h=8, w=8)
    df = pd.DataFrame(maps.reshape(3, -1), index=[0, 1, 2])
    df.to_csv(tmp_path / "t.csv")
    t = read_labels_csv(tmp_path / "t.csv", expected_pixels=64)
    assert t.transposed and t.names == ["0", "1", "2"]
    assert np.array_equal(t.values, maps.reshape(3, -1))


def test_transposed_errors(tmp_path):
    (tmp_path / "t.csv").write_text("image,0,1,3\n0.png,1,2,3\n")
    with pytest.raises(DataError, match=r"t\.csv.*pixel indices.*'3'"):
        read_labels_csv(tmp_path / "t.csv")
    (tmp_path / "t2.csv").write_text("image,0,1,2\n0.png,1,2,3\n0.png,1,2,3\n")
    with pytest.raises(DataError, match=r"t2\.csv.*duplicate image '0\.png'"):
        read_labels_csv(tmp_path / "t2.csv")
    (tmp_path / "t3.csv").write_text("image,0,1,2\n0.png,1,-2,3\n")
    with pytest.raises(DataError, match=r"t3\.csv.*image '0\.png'.*pixel column '1'.*negative"):
        read_labels_csv(tmp_path / "t3.csv")
    (tmp_path / "t4.csv").write_text("image,0,1,2\n0.png,1,2,3\n")
    with pytest.raises(DataError, match=r"t4\.csv.*3 pixels per image, expected 4"):
        read_labels_csv(tmp_path / "t4.csv", expected_pixels=4)


# ---------------------------------------------------------------------------- LabelTable
def test_label_table_accessors():
    values = np.array([[0, 0, 0, 0], [0, 2, 1, 0]], np.uint8)
    t = LabelTable(["0.png", "1.png"], values, source="x.csv")
    assert t.is_empty("0.png") and not t.is_empty("1.png")
    assert t.column("1.png").tolist() == [0, 2, 1, 0]
    assert t.label_map("1.png", (2, 2)).tolist() == [[0, 2], [1, 0]]
    assert t.nonempty().tolist() == [False, True]
    assert "1.png" in t and "2.png" not in t and len(t) == 2
    with pytest.raises(DataError, match=r"x\.csv.*no column '2\.png'"):
        t.column("2.png")
    with pytest.raises(DataError, match=r"x\.csv.*'1\.png' has 4 pixels.*3\*3 = 9"):
        t.label_map("1.png", (3, 3))
    with pytest.raises(DataError, match="duplicate column"):
        LabelTable(["a", "a"], np.zeros((2, 3), np.uint8))
    with pytest.raises(DataError, match="uint8"):
        LabelTable(["a"], np.zeros((1, 3), np.int64))


# ---------------------------------------------------------------------------- bad input
BAD_CELLS = [
    ("1.5", r"column '1\.png', pixel 1 \(line 3\): label is '1\.5', not an integer"),
    ("abc", r"column '1\.png', pixel 1 \(line 3\): label is 'abc', not an integer"),
    ("", r"column '1\.png', pixel 1 \(line 3\): label is empty \(NaN\)"),
    ("NaN", r"column '1\.png', pixel 1 \(line 3\): label is empty \(NaN\)"),
    ("-3", r"column '1\.png', pixel 1 \(line 3\): label -3 is negative"),
    ("256", r"column '1\.png', pixel 1 \(line 3\): label 256 is above 255"),
    ("1000", r"column '1\.png', pixel 1 \(line 3\): label 1000 is above 255"),
]


@pytest.mark.parametrize("cell,message", BAD_CELLS)
def test_bad_label_cells_name_file_column_and_pixel(tmp_path, cell, message):
    path = tmp_path / "bad.csv"
    path.write_text(f"pixel,0.png,1.png,2.png\n0,0,0,0\n1,0,{cell},0\n2,1,2,3\n")
    with pytest.raises(DataError, match=r"bad\.csv: " + message):
        read_labels_csv(path)


def test_bad_cell_far_into_a_large_file_reports_its_pixel(tmp_path, monkeypatch):
    monkeypatch.setattr(lc, "_BLOCK", 4096)
    maps = _maps(n=20, h=30, w=30)
    write_labels_csv(tmp_path / "a.csv", _names(20), maps)
    lines = (tmp_path / "a.csv").read_text().split("\n")
    fields = lines[1 + 777].split(",")
    fields[1 + 13] = "7.25"
    lines[1 + 777] = ",".join(fields)
    (tmp_path / "a.csv").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"column '13\.png', pixel 777 \(line 779\): label is '7\.25'"):
        read_labels_csv(tmp_path / "a.csv")


@pytest.mark.parametrize(
    "text,message",
    [
        ("pixel,0.png,1.png\n0,1,2\n1,3\n", r"line 3 has 2 fields, expected 3"),
        ("pixel,0.png,1.png\n0,1,2\n1,3,4,5\n", r"line 3 has 4 fields, expected 3"),
        ("pixel,0.png,0.png\n0,1,2\n", r"duplicate column '0\.png'"),
        ("pixel,0.png,1.png\n0,1,2\n2,3,4\n", r"index column 'pixel' at line 3 is 2, expected 1"),
        ("pixel,0.png\n0,1\nx,2\n", r"index column 'pixel' at line 3 is 'x'"),
        ("pixel,0.png\n", r"no pixel rows"),
        ("", r"empty"),
        ("pixel\n0\n", r"header has 1 field"),
        ("pixel,0.png,\n0,1,2\n", r"empty column name"),
    ],
)
def test_malformed_files(tmp_path, text, message):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=r"m\.csv.*" + message):
        read_labels_csv(path)


def test_missing_and_corrupt_gzip(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: labels CSV not found"):
        read_labels_csv(tmp_path / "nope.csv")
    data = gzip.compress(b"pixel,0.png\n" + b"".join(b"%d,1\n" % i for i in range(5000)))
    (tmp_path / "trunc.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"trunc\.csv\.gz"):
        read_labels_csv(tmp_path / "trunc.csv.gz")


@pytest.mark.parametrize(
    "maps,message",
    [
        (np.full((2, 2, 2), 256, np.int32), r"label map 0 \('0\.png'\) at pixel 0: label 256 is outside 0\.\.255"),
        (np.array([[0, 0, 0, 0], [0, 0, 0, -1]]), r"label map 1 \('1\.png'\) at pixel 3: label -1 is outside"),
        (np.array([[[0, 1.5], [0, 0]]] * 2), r"label map 0 \('0\.png'\) at pixel 1: label 1\.5 is not an integer"),
        (np.array([[[0, 0], [0, 0]], [[0, 0], [np.nan, 0]]]), r"label map 1 \('1\.png'\) at pixel 2: label nan"),
        ([np.zeros((2, 2)), np.full((2, 2), 300)], r"label map 1 \('1\.png'\) at pixel 0: label 300"),
        (np.zeros((3, 2, 2), np.uint8), r"2 names but 3 label maps"),
        ([np.zeros((2, 2)), np.zeros((3, 3))], r"label map 1 \('1\.png'\) has 9 pixels"),
        (np.array([["a", "b"], ["c", "d"]]), r"dtype <U1"),
    ],
)
def test_write_rejects_bad_label_maps(tmp_path, maps, message):
    with pytest.raises(DataError, match=r"out\.csv.*" + message):
        write_labels_csv(tmp_path / "out.csv", ["0.png", "1.png"], maps)
    assert not (tmp_path / "out.csv").exists()


def test_write_rejects_duplicate_names(tmp_path):
    with pytest.raises(DataError, match=r"duplicate image name '0\.png'"):
        write_labels_csv(tmp_path / "out.csv", ["0.png", "0.png"], np.zeros((2, 2, 2), np.uint8))


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sub.csv"
    path.write_text("previous content")

    def fail(f, values):
        f.write(b"0,1,2\n")
        raise RuntimeError("disk full")

    monkeypatch.setattr(lc, "_write_body", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_labels_csv(path, ["0.png"], np.zeros((1, 2, 2), np.uint8))
    assert path.read_text() == "previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]


# ---------------------------------------------------------------------------- property test
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 6),
    n_pixels=st.integers(1, 40),
    high=st.sampled_from([2, 10, 100, 256]),
    block=st.sampled_from([3, 50, 1 << 20]),
    seed=st.integers(0, 2**16),
    gz=st.booleans(),
)
def test_roundtrip_property(tmp_path_factory, monkeypatch, n, n_pixels, high, block, seed, gz):
    monkeypatch.setattr(lc, "_BLOCK", block)
    values = np.random.default_rng(seed).integers(0, high, size=(n, n_pixels)).astype(np.uint8)
    names = [f"img_{i}.png" for i in range(n)]
    path = tmp_path_factory.mktemp("rt") / ("p.csv.gz" if gz else "p.csv")
    write_labels_csv(path, names, values)
    t = read_labels_csv(path)
    assert t.names == names and np.array_equal(t.values, values)
    df = pd.read_csv(path, index_col=0)
    assert np.array_equal(df.to_numpy().T, values) and list(df.columns) == names


# ---------------------------------------------------------------------------- real data
REAL = "/work/shared/data/real_ct_dev/labels.csv.gz"


def test_real_ct_dev_labels_match_pandas(no_slow):
    import os

    if not os.path.exists(REAL):
        pytest.skip("real_ct_dev not available")
    t = read_labels_csv(REAL, expected_pixels=512 * 512)
    df = pd.read_csv(REAL, index_col=0)
    assert t.names == list(df.columns) and t.index_name == "pixel"
    assert np.array_equal(t.values, df.to_numpy().T)


def test_trailing_blank_lines_are_ignored_but_inner_ones_are_errors(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"pixel,0.png\n0,1\n1,2\n\n\n")
    assert read_labels_csv(tmp_path / "a.csv").values.tolist() == [[1, 2]]
    (tmp_path / "b.csv").write_bytes(b"pixel,0.png\n0,1\n\n1,2\n")
    with pytest.raises(DataError, match=r"b\.csv: line 3 is empty"):
        read_labels_csv(tmp_path / "b.csv")


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.lists(st.integers(0, 255), min_size=3, max_size=3), min_size=1, max_size=6),
    edits=st.lists(
        st.tuples(st.sampled_from(["replace", "insert", "delete"]), st.integers(0, 10**6), st.sampled_from(list(b"0159,\n.- x\"\r\t+e"))),
        min_size=1,
        max_size=3,
    ),
    transposed=st.booleans(),
)
def test_fast_parser_never_accepts_what_the_exact_parser_rejects(values, edits, transposed):
    """Mutate a valid block at random: whenever the vectorised parser accepts the result, the exact
    parser must accept it too and give the same values (else the fast path let bad input through)."""
    first = [f"{i}.png" for i in range(len(values))] if transposed else [str(i) for i in range(len(values))]
    text = bytearray(b"".join((f + "," + ",".join(map(str, row)) + "\n").encode() for f, row in zip(first, values)))
    for op, pos, byte in edits:
        pos %= len(text) + (op == "insert")
        if op == "replace" and text:
            text[pos % len(text)] = byte
        elif op == "insert":
            text.insert(pos, byte)
        elif op == "delete" and len(text) > 1:
            del text[pos % len(text)]
    if not text.endswith(b"\n"):
        text += b"\n"
    bp = np.concatenate([np.zeros(lc._PAD, np.uint8), np.frombuffer(bytes(text), np.uint8)])
    fast = lc._parse_fast(bp.copy(), 4, not transposed)
    if fast is None:
        return
    ctx = lc._Context(lc.Path("fuzz.csv"), "pixel", ["a", "b", "c"], transposed)
    exact = lc._parse_slow(bp.copy(), 4, not transposed, ctx, 0)  # raises DataError if the input is bad
    assert np.array_equal(np.asarray(fast.values, np.uint8), exact.values)
    if transposed:
        assert fast.first == exact.first
    else:
        assert np.array_equal(fast.first, exact.first)
