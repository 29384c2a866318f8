"""Fast I/O for the challenge's label / submission CSV.

Layout (the organisers' metric code reads it this way): rows are pixels (index ``row*W + col``),
the first column is the pixel index (named ``pixel`` or anything else: the name is kept), then
one column per image named after its file (``0.png``, ...). Values are integer labels 0..255.
Files may be plain or gzip-compressed (detected from the content, not only the ``.gz`` suffix).
The transposed orientation (rows = images, first column holding names like ``0.png``) is
detected and read too, with a log message.

Reading uses a vectorised numpy parser over the raw bytes, in blocks of a few MB: peak memory is
the ``uint8`` result plus about 80 MB when ``expected_pixels`` is given (the result is filled in
place), about twice the result otherwise. A block the vectorised parser declines (quoted cells,
spaces, ``3.0``-style values, bad cells) is re-read with pandas' C parser and, if still invalid,
with an exact Python parser that produces the error message: file, column and pixel (or image)
and line of the bad cell. CRLF line ends are accepted. Writing uses a vectorised formatter (a lookup table of the byte strings of 0..255) and
writes exactly the layout ``pandas.DataFrame.to_csv`` gives for an integer frame with a named
index, so ``pd.read_csv(path, index_col=0)`` reads it back as written.
"""
from __future__ import annotations

import csv
import gzip
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from d2ct.errors import DataError
from d2ct.utils.fileio import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["LabelTable", "read_labels_csv", "write_labels_csv"]

_PAD = 4  # zero bytes kept in front of every parse buffer so "the k-th byte before" is always defined
_BLOCK = 8 << 20  # bytes read per parse block (temporaries ~10x this)
_WRITE_BLOCK = 16 << 20  # bytes formatted per write block
_MAX_FIRST = 15  # longest first field (pixel index) the vectorised path handles


# --------------------------------------------------------------------------------------------
# LabelTable
# --------------------------------------------------------------------------------------------
@dataclass
class LabelTable:
    """Label maps of a set of images: ``values[i]`` is the flattened label map of ``names[i]``."""

    names: list[str]
    values: np.ndarray
    index_name: str = "pixel"
    source: str | None = None
    transposed: bool = False
    _pos: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        self.values = np.asarray(self.values)
        if self.values.ndim != 2 or self.values.shape[0] != len(self.names):
            raise DataError(
                f"{self.source or 'LabelTable'}: values must have shape (n_images={len(self.names)}, n_pixels), "
                f"got {self.values.shape}"
            )
        if self.values.dtype != np.uint8:
            raise DataError(f"{self.source or 'LabelTable'}: values must be uint8, got {self.values.dtype}")
        self._pos = {}
        for i, name in enumerate(self.names):
            if name in self._pos:
                raise DataError(f"{self.source or 'LabelTable'}: duplicate column {name!r}")
            self._pos[name] = i

    @property
    def n_images(self) -> int:
        return self.values.shape[0]

    @property
    def n_pixels(self) -> int:
        return self.values.shape[1]

    def __contains__(self, name: object) -> bool:
        return name in self._pos

    def __len__(self) -> int:
        return len(self.names)

    def _index(self, name: str) -> int:
        try:
            return self._pos[name]
        except KeyError:
            raise DataError(f"{self.source or 'labels'}: no column {name!r} in the labels CSV") from None

    def column(self, name: str) -> np.ndarray:
        """Flattened label map of image ``name``: (n_pixels,) uint8 (a view into ``values``)."""
        return self.values[self._index(name)]

    def label_map(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """Label map of image ``name`` as (H, W) uint8 (a view into ``values``)."""
        col = self.column(name)
        h, w = (int(s) for s in shape)
        if h * w != col.size:
            raise DataError(
                f"{self.source or 'labels'}: column {name!r} has {col.size} pixels, "
                f"which is not H*W = {h}*{w} = {h * w}"
            )
        return col.reshape(h, w)

    def is_empty(self, name: str) -> bool:
        """True when the column is all zeros (an unlabelled image)."""
        return not self.column(name).any()

    def nonempty(self) -> np.ndarray:
        """Boolean (n_images,) array: True where the column has a non-zero label."""
        return self.values.any(axis=1)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class _Source:
    """The (decompressed) CSV bytes as a stream read into caller buffers. (A gzip read-ahead
    thread was tried: no measurable gain on the 2-core development machine, so it was dropped.)"""

    def __init__(self, path: Path):
        self.path = path
        self.raw = open(path, "rb")
        magic = self.raw.read(2)
        self.raw.seek(0)
        self.f = gzip.GzipFile(fileobj=self.raw, mode="rb") if magic == b"\x1f\x8b" else self.raw

    def readinto(self, mv: memoryview) -> int:
        total = 0
        n = len(mv)
        try:
            while total < n:
                got = self.f.readinto(mv[total:])
                if not got:
                    break
                total += got
        except (OSError, EOFError) as exc:  # truncated or corrupt gzip (gzip.BadGzipFile is an OSError)
            raise DataError(f"{self.path}: cannot read the labels CSV (corrupt or truncated gzip?): {exc}") from None
        return total

    def close(self) -> None:
        if self.f is not self.raw:
            self.f.close()
        self.raw.close()


def _rfind_newline(arr: np.ndarray) -> int:
    """Index of the last b'\\n' in a uint8 array, or -1."""
    n = arr.size
    step = 1 << 16
    end = n
    while end > 0:
        start = max(0, end - step)
        hits = np.flatnonzero(arr[start:end] == 10)
        if hits.size:
            return start + int(hits[-1])
        end = start
        step *= 4
    return -1


def _iter_blocks(src: _Source, first: bytes = b""):
    """Yield padded uint8 arrays ``buf`` where ``buf[_PAD:]`` holds complete lines (each ending
    in b'\\n') and ``buf[:_PAD]`` are zeros. The array is reused: consume it before the next one."""
    cap = _BLOCK
    buf = np.zeros(_PAD + cap, np.uint8)
    fill = len(first)
    if fill > cap:
        cap = fill * 2
        buf = np.zeros(_PAD + cap, np.uint8)
    buf[_PAD:_PAD + fill] = np.frombuffer(first, np.uint8)
    eof = False
    while True:
        if not eof and fill < cap:
            got = src.readinto(memoryview(buf)[_PAD + fill:_PAD + cap])
            fill += got
            if got == 0:
                eof = True
                # trailing blank lines / whitespace at the end of the file are ignored (as pandas does)
                while fill and buf[_PAD + fill - 1] in (10, 13, 32):
                    fill -= 1
                if fill:
                    if fill >= cap:
                        buf = np.concatenate([buf, np.zeros(1, np.uint8)])
                    buf[_PAD + fill] = 10
                    fill += 1
        if fill == 0:
            return
        data = buf[_PAD:_PAD + fill]
        last = _rfind_newline(data)
        if last < 0:  # no complete line yet (at EOF the data always ends with a newline): grow
            cap *= 2
            new = np.zeros(_PAD + cap, np.uint8)
            new[:_PAD + fill] = buf[:_PAD + fill]
            buf = new
            continue
        yield buf[:_PAD + last + 1]
        rest = fill - (last + 1)
        if rest:
            buf[_PAD:_PAD + rest] = buf[_PAD + last + 1:_PAD + fill].copy()
        fill = rest
        if eof and fill == 0:
            return


class _Block:
    """Result of parsing one block of complete lines."""

    __slots__ = ("first", "values")

    def __init__(self, first, values):
        self.first = first  # int64 array (pixel indices) or list[str] (image names)
        self.values = values  # uint8 (rows, n_fields - 1)


def _parse_fast(bp: np.ndarray, n_fields: int, numeric_first: bool) -> _Block | None:
    """Vectorised parse of ``bp[_PAD:]`` (complete lines of ``n_fields`` comma-separated fields,
    data fields being 1-3 decimal digits). Returns None if anything is unusual: the caller then
    uses the exact (slow) parser, which also produces the error message.

    The separator positions are found once (``flatnonzero``); the 1-3 bytes before each are
    gathered (``take``) and checked: every data field must be 1-3 digits preceded by a comma,
    every line must end with its ``n_fields``-th separator. Boolean compaction is avoided (it is
    several times slower than ``flatnonzero`` + ``take``)."""
    n = bp.size - _PAD
    b = bp[_PAD:]
    m = n_fields - 1
    if n == 0:
        return _Block(np.zeros(0, np.int64) if numeric_first else [], np.zeros((0, m), np.uint8))
    if numeric_first:
        # digits are >= 48 and every byte below 48 is taken as a separator; a stray one ('.',
        # '-', ' ', '\r', '"') breaks the "comma before each data field" check below
        is_sep = b < 48
    else:
        is_sep = b == 44
        is_sep |= b == 10
    idx = np.flatnonzero(is_sep)
    del is_sep
    if idx.size == 0 or idx.size % n_fields:
        return None
    rows = idx.size // n_fields
    idx2 = idx.reshape(rows, n_fields)
    ends = idx2[:, -1]
    if not (b.take(ends) == 10).all() or ends[-1] != n - 1:
        return None
    # The byte before each separator is the last digit of its field. Work on whole contiguous
    # arrays (faster than 2-D column views); column 0 (the first field) is made to look like a
    # valid one-digit field here and handled on its own below.
    col0 = np.arange(0, rows * n_fields, n_fields)
    g1 = bp[_PAD - 1:].take(idx)
    g1[col0] = 48
    g1 -= np.uint8(48)
    if int(g1.max()) > 9:
        return None  # an empty field or a non-digit
    g2 = bp[_PAD - 2:].take(idx)
    g2[col0] = 44
    multi = g2 != 44  # the byte two before the separator is not a comma: a longer field
    if multi.any():
        # multi-digit fields (labels >= 10) are a minority: handle them sparsely
        mi = np.flatnonzero(multi)
        d2 = g2[mi] - np.uint8(48)
        if int(d2.max()) > 9:
            return None  # a non-digit
        g3 = bp[_PAD - 3:].take(idx[mi])
        three = g3 != 44
        extra = d2.astype(np.uint16) * 10
        if three.any():  # three digits: the byte four back must be the comma
            d3 = g3[three] - np.uint8(48)
            if int(d3.max()) > 9 or not (bp[_PAD - 4:].take(idx[mi[three]]) == 44).all():
                return None  # a non-digit, or four or more digits
            extra[three] += d3.astype(np.uint16) * 100
        v = g1[mi] + extra
        if int(v.max()) > 255:
            return None
        g1[mi] = v
    values = g1.reshape(rows, n_fields)[:, 1:]
    starts = np.empty(rows, np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    commas = idx2[:, 0]
    first_len = commas - starts
    if first_len.min() < 1:
        return None
    if numeric_first:
        width = int(first_len.max())
        if width > _MAX_FIRST:
            return None
        # the first field right-aligned in a (rows, width) window ending at its comma
        k = np.arange(width)
        win = commas[:, None] - width + k
        np.maximum(win, 0, out=win)
        dig = b.take(win)
        dig -= np.uint8(48)
        inside = k >= (width - first_len)[:, None]
        if not ((dig < 10) | ~inside).all():
            return None
        dig *= inside
        first = dig.astype(np.int64) @ _POW10[width - 1::-1]
        return _Block(first, values)
    names = []
    for s, c in zip(starts.tolist(), commas.tolist()):
        name = b[s:c].tobytes()
        if b'"' in name or b"\r" in name:
            return None  # quoting / a stray carriage return: leave it to the exact parser
        try:
            names.append(name.decode("utf-8").strip())
        except UnicodeDecodeError:
            return None
    return _Block(names, values)


def _cell_value(text: str) -> int | None:
    """Integer value of a label cell, or None when it is not an integer (e.g. '1.5', 'x')."""
    t = text.strip()
    try:
        return int(t)
    except ValueError:
        pass
    try:
        f = float(t)
    except ValueError:
        return None
    if f != f or f in (float("inf"), float("-inf")) or f != int(f):
        return None
    return int(f)


class _Context:
    def __init__(self, path: Path, index_name: str, header_cols: list[str], transposed: bool):
        self.path = path
        self.index_name = index_name
        self.header_cols = header_cols
        self.transposed = transposed

    def where(self, row_no: int, row_first: str, col: int) -> str:
        """Human description of a cell: row_no is 0-based over data rows; col indexes header_cols."""
        line = row_no + 2
        if self.transposed:
            return f"image {row_first!r} (line {line}), pixel column {self.header_cols[col]!r}"
        return f"column {self.header_cols[col]!r}, pixel {row_first} (line {line})"


def _parse_pandas(bp: np.ndarray, n_fields: int, numeric_first: bool) -> _Block | None:
    """Second chance for blocks the vectorised parser declines but that may still be valid
    (quoted cells, spaces, '3.0'-style integral floats): pandas' C parser, then a vectorised
    check. Returns None on anything invalid; the exact parser then says where and why."""
    import pandas as pd

    try:
        df = pd.read_csv(
            io.BytesIO(bp[_PAD:].tobytes()),
            header=None,
            names=list(range(n_fields)),
            index_col=False,
            dtype={0: str} if not numeric_first else np.float64,
            skipinitialspace=True,
            skip_blank_lines=False,
            engine="c",
        )
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError):
        return None
    if df.shape[1] != n_fields:
        return None
    data = df.iloc[:, 1:].to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(data) & (data >= 0) & (data <= 255) & (data == np.floor(data))
    if not ok.all():
        return None
    values = data.astype(np.uint8)
    if numeric_first:
        first = df.iloc[:, 0].to_numpy(np.float64)
        with np.errstate(invalid="ignore"):
            if not (np.isfinite(first) & (first >= 0) & (first == np.floor(first))).all():
                return None
        return _Block(first.astype(np.int64), values)
    firsts = df.iloc[:, 0].tolist()
    if any(not isinstance(x, str) for x in firsts):
        return None
    return _Block([x.strip() for x in firsts], values)


def _parse_slow(bp: np.ndarray, n_fields: int, numeric_first: bool, ctx: _Context, row_offset: int) -> _Block:
    """Exact parser with precise errors (csv module; used when the fast path declines a block)."""
    text = bp[_PAD:].tobytes()
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{ctx.path}: the labels CSV is not valid UTF-8 text near line {row_offset + 2}: {exc}") from None
    reader = csv.reader(io.StringIO(decoded, newline=""))
    firsts: list = []
    out_rows: list[np.ndarray] = []
    for i, fields in enumerate(reader):
        row_no = row_offset + i
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            raise DataError(f"{ctx.path}: line {row_no + 2} is empty")
        if len(fields) != n_fields:
            raise DataError(
                f"{ctx.path}: line {row_no + 2} has {len(fields)} fields, expected {n_fields} "
                f"(the index column plus {n_fields - 1} {'pixel' if ctx.transposed else 'image'} columns of the header)"
            )
        first = fields[0]
        if numeric_first:
            v = _cell_value(first)
            if v is None or v < 0:
                raise DataError(
                    f"{ctx.path}: index column {ctx.index_name!r} at line {row_no + 2} is {first!r}, expected a pixel index"
                )
            firsts.append(v)
        else:
            firsts.append(first.strip())
        cells = fields[1:]
        arr = np.empty(n_fields - 1, np.uint8)
        try:
            ints = np.array(cells, dtype=np.int64)
        except (ValueError, OverflowError):
            ints = None
        if ints is None:
            ints = np.empty(n_fields - 1, np.int64)
            for j, c in enumerate(cells):
                v = _cell_value(c)
                if v is None:
                    what = "empty (NaN)" if c.strip() in ("", "nan", "NaN", "NA", "null", "None") else f"{c!r}, not an integer"
                    raise DataError(f"{ctx.path}: {ctx.where(row_no, first, j)}: label is {what}")
                ints[j] = v
        bad = np.flatnonzero((ints < 0) | (ints > 255))
        if bad.size:
            j = int(bad[0])
            kind = "negative" if ints[j] < 0 else "above 255 (labels must fit in uint8)"
            raise DataError(f"{ctx.path}: {ctx.where(row_no, first, j)}: label {int(ints[j])} is {kind}")
        arr[:] = ints
        out_rows.append(arr)
    values = np.stack(out_rows) if out_rows else np.zeros((0, n_fields - 1), np.uint8)
    first_out = np.asarray(firsts, np.int64) if numeric_first else firsts
    return _Block(first_out, values)


def _is_int_text(s: str) -> bool:
    s = s.strip()
    return s.isdigit() and s.isascii()


def read_labels_csv(path: str | os.PathLike, *, expected_pixels: int | None = None) -> LabelTable:
    """Read a label / submission CSV (plain or gzip) into a :class:`LabelTable`.

    ``expected_pixels``: the number of pixels per image (H*W) if known; a file with another
    count raises DataError (and the result is filled in place, without an intermediate copy).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labels CSV not found")
    src = _Source(path)
    try:
        return _read(src, path, expected_pixels)
    finally:
        src.close()


def _read_header(src: _Source, path: Path) -> tuple[bytes, bytes]:
    """Read the header line; returns (header line without its newline, the bytes read after it,
    which hold at least the start of the first data line unless the file ends first)."""
    data = b""
    pos = -1
    eof = False
    while not eof:
        buf = bytearray(1 << 20)
        got = src.readinto(memoryview(buf))
        eof = got == 0
        data += bytes(buf[:got])
        if pos < 0:
            pos = data.find(b"\n")
        if pos >= 0 and len(data) - pos > 4096:
            break
    if not data.strip():
        raise DataError(f"{path}: the labels CSV is empty")
    if pos < 0:
        return data, b""
    return data[:pos], data[pos + 1:]


def _read(src: _Source, path: Path, expected_pixels: int | None) -> LabelTable:
    header_bytes, rest = _read_header(src, path)
    crlf = header_bytes.endswith(b"\r")
    if header_bytes.startswith(b"\xef\xbb\xbf"):
        header_bytes = header_bytes[3:]
    try:
        header_text = header_bytes.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: the labels CSV header is not UTF-8 text: {exc}") from None
    header = next(csv.reader([header_text]))
    if len(header) < 2:
        raise DataError(f"{path}: the labels CSV header has {len(header)} field(s); expected the index column and one column per image")
    index_name, cols = header[0].strip(), [c.strip() for c in header[1:]]
    n_fields = len(header)

    # orientation: look at the first field of the first data row
    first_line_end = rest.find(b"\n")
    first_line = rest if first_line_end < 0 else rest[:first_line_end]
    if not first_line.strip():
        # no data rows in what we have: maybe a huge first row; peek further below
        first_field = ""
    else:
        try:
            first_field = next(csv.reader([first_line[:4096].decode("utf-8", "replace")]))[0]
        except (StopIteration, csv.Error):
            first_field = ""
    col_ints = all(_is_int_text(c) for c in cols)
    # rows = images when the first data field is an image name rather than a pixel index
    named_first = bool(first_field) and not _is_int_text(first_field) and _cell_value(first_field) is None
    transposed = named_first and (col_ints or first_field.strip().lower().endswith(".png"))
    if not transposed and col_ints and expected_pixels is not None and len(cols) == expected_pixels:
        # header names are the pixel indices 0..H*W-1: rows are images named by integers
        if [int(c) for c in cols[:3]] == list(range(min(3, len(cols)))):
            transposed = True
    if transposed:
        logger.info("%s: transposed labels CSV detected (rows = images, columns = pixels); reading it as such", path)
        if not col_ints or [int(c) for c in cols] != list(range(len(cols))):
            bad = next((c for i, c in enumerate(cols) if not _is_int_text(c) or int(c) != i), cols[0])
            raise DataError(
                f"{path}: transposed labels CSV (rows = images): the header must list the pixel indices 0..N-1 "
                f"in order, found column {bad!r}"
            )
        if expected_pixels is not None and len(cols) != expected_pixels:
            raise DataError(f"{path}: the labels CSV has {len(cols)} pixels per image, expected {expected_pixels} (H*W)")
    else:
        seen = set()
        for c in cols:
            if c in seen:
                raise DataError(f"{path}: duplicate column {c!r} in the labels CSV header")
            seen.add(c)
            if not c:
                raise DataError(f"{path}: the labels CSV header has an empty column name")

    ctx = _Context(path, index_name, cols, transposed)
    numeric_first = not transposed
    if crlf:
        rest = rest.replace(b"\r", b"")

    blocks: list[np.ndarray] = []
    names_t: list[str] = []
    n_rows = 0
    prealloc = None
    if not transposed and expected_pixels is not None:
        prealloc = np.empty((len(cols), expected_pixels), np.uint8)

    for bp in _iter_blocks(src, rest):
        if crlf:
            body = bp[_PAD:]
            body = body[body != 13]
            bp = np.concatenate([np.zeros(_PAD, np.uint8), body])
        block = _parse_fast(bp, n_fields, numeric_first)
        if block is None:
            block = _parse_pandas(bp, n_fields, numeric_first)
        if block is None:
            block = _parse_slow(bp, n_fields, numeric_first, ctx, n_rows)
        rows = block.values.shape[0]
        if numeric_first:
            expect = np.arange(n_rows, n_rows + rows)
            if not np.array_equal(block.first, expect):
                k = int(np.flatnonzero(block.first != expect)[0])
                raise DataError(
                    f"{path}: index column {index_name!r} at line {n_rows + k + 2} is {int(block.first[k])}, expected "
                    f"{n_rows + k} (rows must be pixels 0..N-1 in order)"
                )
            if prealloc is not None:
                if n_rows + rows > expected_pixels:
                    raise DataError(
                        f"{path}: the labels CSV has more than {expected_pixels} pixel rows, expected {expected_pixels} (H*W)"
                    )
                prealloc[:, n_rows:n_rows + rows] = block.values.T
            else:
                blocks.append(block.values.T.astype(np.uint8, order="C"))
        else:
            names_t.extend(block.first)
            blocks.append(block.values.astype(np.uint8, order="C"))
        n_rows += rows

    if transposed:
        if n_rows == 0:
            raise DataError(f"{path}: the labels CSV has no data rows")
        seen = set()
        for name in names_t:
            if name in seen:
                raise DataError(f"{path}: duplicate image {name!r} in the first column of the transposed labels CSV")
            if not name:
                raise DataError(f"{path}: empty image name in the first column of the transposed labels CSV")
            seen.add(name)
        values = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)
        return LabelTable(names_t, values, index_name=index_name, source=str(path), transposed=True)

    if n_rows == 0:
        raise DataError(f"{path}: the labels CSV has no pixel rows")
    if expected_pixels is not None and n_rows != expected_pixels:
        raise DataError(f"{path}: the labels CSV has {n_rows} pixel rows, expected {expected_pixels} (H*W)")
    if prealloc is not None:
        values = prealloc
    else:
        values = np.empty((len(cols), n_rows), np.uint8)
        pos = 0
        for i in range(len(blocks)):
            blk = blocks[i]
            values[:, pos:pos + blk.shape[1]] = blk
            pos += blk.shape[1]
            blocks[i] = None  # free as we go
    return LabelTable(cols, values, index_name=index_name, source=str(path), transposed=False)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _lut() -> tuple[np.ndarray, np.ndarray]:
    """Byte strings ',<v>' of 0..255 as 4-byte slots (uint32 view) and their validity masks."""
    codes = np.zeros((256, 4), np.uint8)
    mask = np.zeros((256, 4), np.bool_)
    for v in range(256):
        s = b"," + str(v).encode()
        codes[v, : len(s)] = np.frombuffer(s, np.uint8)
        mask[v, : len(s)] = True
    return codes.view(np.uint32).ravel(), mask.view(np.uint32).ravel()


_CODES32, _MASK32 = _lut()
_NL32 = np.frombuffer(b"\n\0\0\0", np.uint32)[0]
_KEEP1 = np.frombuffer(b"\1\0\0\0", np.uint32)[0]
_POW10 = 10 ** np.arange(19, dtype=np.int64)


def _as_label_matrix(path: Path, label_maps, names: Sequence[str]) -> np.ndarray:
    """(n_images, n_pixels) uint8 from an array or a sequence of 2-D maps; DataError on bad values."""
    n_names = len(names)

    def where(a: np.ndarray, k: int, what: str) -> str:
        if a.ndim == 2:  # (n_images, n_pixels)
            i, p = divmod(k, a.shape[1])
            return f"label map {i} ({names[i]!r}) at pixel {p}"
        return f"{what} at pixel {k}"

    def to_u8(a: np.ndarray, what: str) -> np.ndarray:
        if a.dtype == np.uint8:
            return a
        if a.dtype == np.bool_:
            return a.astype(np.uint8)
        if np.issubdtype(a.dtype, np.integer):
            if a.size and (a.min() < 0 or a.max() > 255):
                flat = a.ravel()
                k = int(np.flatnonzero((flat < 0) | (flat > 255))[0])
                raise DataError(f"{path}: {where(a, k, what)}: label {int(flat[k])} is outside 0..255")
            return a.astype(np.uint8)
        if np.issubdtype(a.dtype, np.floating):
            flat = a.ravel()
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(flat) | (flat != np.round(flat)) | (flat < 0) | (flat > 255)
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                raise DataError(f"{path}: {where(a, k, what)}: label {float(flat[k])!r} is not an integer in 0..255")
            return a.astype(np.uint8)
        raise DataError(f"{path}: {what} has dtype {a.dtype}; labels must be integers 0..255")

    if isinstance(label_maps, np.ndarray):
        arr = label_maps
        if arr.ndim == 3:
            arr = arr.reshape(arr.shape[0], -1)
        if arr.ndim != 2:
            raise DataError(f"{path}: label_maps must have shape (n_images, H, W) or (n_images, n_pixels), got {label_maps.shape}")
        if arr.shape[0] != n_names:
            raise DataError(f"{path}: {n_names} names but {arr.shape[0]} label maps")
        return np.ascontiguousarray(to_u8(arr, "label_maps"))
    maps = list(label_maps)
    if len(maps) != n_names:
        raise DataError(f"{path}: {n_names} names but {len(maps)} label maps")
    first = np.asarray(maps[0])
    n_pixels = first.size
    out = np.empty((n_names, n_pixels), np.uint8)
    for i, m in enumerate(maps):
        a = np.asarray(m)
        if a.size != n_pixels:
            raise DataError(f"{path}: label map {i} ({names[i]!r}) has {a.size} pixels (shape {a.shape}), the first has {n_pixels}")
        out[i] = to_u8(a.ravel(), f"label map {i} ({names[i]!r})")
    return out


def _header_line(index_name: str, names: Sequence[str]) -> bytes:
    sio = io.StringIO()
    csv.writer(sio, lineterminator="\n").writerow([index_name, *names])
    return sio.getvalue().encode("utf-8")


def _transpose_into(out: np.ndarray, src: np.ndarray, tile_rows: int = 16, tile_cols: int = 1024) -> None:
    """``out[:] = src.T`` in small tiles: several times faster than numpy's plain transposing copy
    when ``src`` is a wide, short slice (images x pixel block), which thrashes the cache."""
    n_src, m_src = src.shape
    for r in range(0, n_src, tile_rows):
        for c in range(0, m_src, tile_cols):
            out[c:c + tile_cols, r:r + tile_rows] = src[r:r + tile_rows, c:c + tile_cols].T


def _write_body(f: BinaryIO, values: np.ndarray) -> None:
    """Rows = pixels: '<pixel>,<v0>,<v1>,...\\n' for every pixel, vectorised in row blocks.

    Each row is laid out in 4-byte slots (index digits, then ',<v>' per image from a lookup
    table of the 256 byte strings, then the newline) with a parallel keep-mask; one boolean
    compaction per block drops the unused bytes."""
    n_images, n_pixels = values.shape
    iw = max(1, len(str(max(n_pixels - 1, 0))))
    iw4 = -(-iw // 4)  # index slots of 4 bytes
    width = iw4 + n_images + 1  # uint32 slots per row: index, fields, newline
    rows_per = max(1, _WRITE_BLOCK // (4 * width))
    k = np.arange(iw4 * 4)
    pow10 = _POW10[np.clip(iw4 * 4 - 1 - k, 0, 18)]
    block = np.empty((min(rows_per, n_pixels), n_images), np.uint8)
    for r0 in range(0, n_pixels, rows_per):
        r1 = min(n_pixels, r0 + rows_per)
        rows = r1 - r0
        slots = np.empty((rows, width), np.uint32)
        keep = np.empty((rows, width), np.uint32)
        # index field, right-aligned in iw4*4 bytes; leading positions masked out
        idx = np.arange(r0, r1, dtype=np.int64)
        digits = (idx[:, None] // pow10[None, :]) % 10
        ndig = np.searchsorted(_POW10[1:], idx, side="right") + 1
        ikeep = k[None, :] >= (iw4 * 4 - ndig[:, None])
        slots[:, :iw4] = (digits + 48).astype(np.uint8).view(np.uint32)
        keep[:, :iw4] = np.ascontiguousarray(ikeep).view(np.uint32)
        blk = block[:rows]
        _transpose_into(blk, values[:, r0:r1])
        slots[:, iw4:iw4 + n_images] = _CODES32.take(blk)
        keep[:, iw4:iw4 + n_images] = _MASK32.take(blk)
        slots[:, -1] = _NL32
        keep[:, -1] = _KEEP1
        out = slots.view(np.uint8)[keep.view(np.bool_)]
        f.write(out.data)


def write_labels_csv(
    path: str | os.PathLike,
    names: Sequence[str],
    label_maps,
    *,
    index_name: str = "pixel",
) -> None:
    """Write label maps in the challenge layout (rows = pixels, one column per image), atomically.

    ``label_maps``: array (n_images, H, W) or (n_images, n_pixels), or a sequence of 2-D maps of
    the same size; integer (or integral float) values 0..255. A ``.gz`` suffix writes gzip.
    ``pd.read_csv(path, index_col=0)`` reads the file back with the same names and values.
    """
    path = Path(path)
    names = [str(n) for n in names]
    seen = set()
    for n in names:
        if n in seen:
            raise DataError(f"{path}: duplicate image name {n!r} in names")
        if not n:
            raise DataError(f"{path}: empty image name in names")
        seen.add(n)
    if not names:
        raise DataError(f"{path}: no images to write (names is empty)")
    values = _as_label_matrix(path, label_maps, names)
    header = _header_line(index_name, names)
    with atomic_write(path, "wb") as raw:
        if path.suffix == ".gz":
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                gz.write(header)
                _write_body(gz, values)
        else:
            raw.write(header)
            _write_body(raw, values)
