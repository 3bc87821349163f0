"""Vocabulary preprocessing: raw click logs -> contiguous ids, per-id counts and encoded splits.

``python -m torchrec_cce.data.preprocess --format criteo_tsv|avazu_csv|csv --input FILE[,FILE...]
[--test-input FILE[,...]] [--split 0.8,0.1,0.1 | --split-by-order 0.8,0.1,0.1]
[--label-column C --categorical-columns a,b --dense-columns x,y --multi-hot-columns g
--multi-hot-separator '|'] [--min-count N] --out DIR``

One streaming pass over the input, one over a temporary file (bounded memory: one pyarrow
block at a time plus the per-feature tables of distinct training values and the vocabularies):

1. parse, validate and split every row (the next block is parsed in a background thread, in
   1 MiB pieces put together again; dense columns converted by the CSV reader itself, and
   Criteo's categoricals as 8-byte fixed-width values, or, in a file with a value it rejects,
   from that block on as strings, checked as before); dictionary-encode every categorical
   value of the block, as a packed uint64 key when every value has at most 8 bytes and no NUL
   (Criteo's 8-hex-digit tokens, Avazu's ids) and as strings otherwise; count the training
   rows' values from the dictionaries (merged geometrically), rows and clicks per split (the
   features of a block on two threads); store the block's
   split, label, dense columns, dictionary indices and dictionaries in ``DIR/.pass1.tmp``
   (:class:`~torchrec_cce.data.spill.Spill`; about 130 bytes per Criteo-shaped row, deleted at the end);
2. build the vocabularies (id 0 = out-of-vocabulary; ids ``1..V-1`` = training values seen
   ``>= --min-count`` times, in descending training frequency, ties in first-seen order; two
   features at a time), then look each stored block's dictionary up once (two features at a
   time) and write ``DIR/{train,val,test}.parquet`` (in another thread).

``FAST_PATH = False`` re-parses the input in pass 2 and handles every value as a string (the
reference the tests compare the fast path's files with, byte for byte).

``DIR`` also gets ``meta.json``, ``counts/<feature>.npy`` (int64 ``[V]``, training occurrences
per id; ``counts[0]`` sums the values that fell below ``--min-count``) and
``vocab/<feature>.parquet`` (``id``, ``value``, ``count``; ``value`` is null for id 0).

Rows: a categorical cell is a string (empty is a value of its own, ``""``); a dense cell is a
number (empty = missing = 0, then the ``--dense-transform``); a multi-hot cell is split on
``--multi-hot-separator`` (empty pieces dropped, so an empty cell is an empty bag). Malformed
rows (wrong field count, non-numeric dense value, bad Avazu hour) are skipped and counted per
reason; above ``--max-bad-fraction`` a ``ValueError`` names the file, the first bad line and
the fix. A missing column, an empty file or a label other than 0/1 are errors.

Splits: ``--split`` assigns each row to train/val/test by a seeded hash of its position
(``--seed``), so the assignment does not depend on block boundaries and is the same in both
passes; ``--split-by-order`` takes the first fraction of the data lines (over all input files, in
order) as train, the next as val, the rest as test (for time-ordered data); with
``--random-val-test`` the lines after the train fraction go to val or test by the seeded row
hash instead (in proportion to their fractions), so validation and test come from the same
period and validation can choose models for test; ``--test-input`` makes those files the test
split and splits ``--input`` into train/val.
"""

import argparse
import gzip
import json
import logging
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from torchrec_cce.data.spill import Spill

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
CRITEO_DENSE = [f"int_{i}" for i in range(13)]  # TorchRec's DEFAULT_INT_NAMES
CRITEO_CATEGORICAL = [f"cat_{i}" for i in range(26)]  # TorchRec's DEFAULT_CAT_NAMES
AVAZU_COLUMNS = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,"
    "app_category,device_id,device_ip,device_model,device_type,device_conn_type,"
    "C14,C15,C16,C17,C18,C19,C20,C21"
).split(",")
# Avazu's hour (YYMMDDHH) becomes hour-of-day and weekday, as in AvazuCsvDataset.
AVAZU_CATEGORICAL = ["hour_of_day", "weekday"] + AVAZU_COLUMNS[3:]
MIN_ROWS_FOR_BAD_CHECK = 10_000
PARSE_PIECE = 1 << 20  # bytes: a --block-size block is parsed in pieces of this size (FileReader)
WORKERS = 2  # threads for a block's per-feature work (numpy and pyarrow release the GIL)
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ----------------------------------------------------------------------------------------- spec
@dataclass
class Spec:
    """What to read from each file and how."""

    fmt: str
    label: str
    dense: List[str]
    categorical: List[str]  # output single-hot features (for Avazu includes the derived ones)
    multi_hot: List[str]
    separator: str = "|"
    delimiter: str = ","
    header: bool = True
    column_names: Optional[List[str]] = None  # for header-less files
    quoting: bool = True
    dense_transform: str = "none"
    fixed_width: int = 0  # categorical values are usually this many bytes: parsed as such (fast path)

    @property
    def features(self) -> List[Tuple[str, str]]:
        """``(name, kind)`` in output (meta) order: categorical first, then multi-hot."""
        return [(n, "categorical") for n in self.categorical] + [(n, "multi_hot") for n in self.multi_hot]

    def source_columns(self) -> List[str]:
        """Columns read from the file."""
        if self.fmt == "avazu_csv":
            return ["click", "hour"] + AVAZU_COLUMNS[3:]
        return [self.label] + self.dense + self.categorical + self.multi_hot


def _split_list(text: Optional[str]) -> List[str]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else []


def read_header(path: str, delimiter: str) -> List[str]:
    """Column names of a headered file (first line); clear errors for missing/empty files."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (check --input/--test-input)")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        line = f.readline()
    if not line.strip():
        raise ValueError(f"{path}: empty file (no header line); nothing to preprocess")
    import csv

    return [c.strip() for c in next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter))]


def build_spec(args: argparse.Namespace, header: Optional[List[str]], first_file: str) -> Spec:
    """The reading spec of ``--format`` (``header`` = the first file's column names, if any)."""
    transform = args.dense_transform
    if args.format == "criteo_tsv":
        return Spec("criteo_tsv", "label", list(CRITEO_DENSE), list(CRITEO_CATEGORICAL), [],
                    delimiter="\t", header=False, quoting=False,
                    column_names=["label"] + CRITEO_DENSE + CRITEO_CATEGORICAL, fixed_width=8,
                    dense_transform="log" if transform == "auto" else transform)
    if args.format == "avazu_csv":
        return Spec("avazu_csv", "click", [], list(AVAZU_CATEGORICAL), [], delimiter=",",
                    dense_transform="none" if transform == "auto" else transform)
    # generic csv
    label = args.label_column or "label"
    dense = _split_list(args.dense_columns)
    multi = _split_list(args.multi_hot_columns)
    ignore = set(_split_list(args.ignore_columns))
    if args.categorical_columns:
        cats = _split_list(args.categorical_columns)
    else:
        taken = {label, *dense, *multi, *ignore}
        cats = [c for c in header if c not in taken]
    named = [label] + dense + cats + multi
    dup = sorted({c for c in named if named.count(c) > 1})
    if dup:
        raise ValueError(f"columns {dup} are given more than once among --label-column, "
                         "--dense-columns, --categorical-columns and --multi-hot-columns")
    if not cats and not multi:
        raise ValueError(f"{first_file}: no categorical or multi-hot columns to encode; pass "
                         "--categorical-columns and/or --multi-hot-columns")
    return Spec("csv", label, dense, cats, multi, separator=args.multi_hot_separator,
                delimiter=args.delimiter, dense_transform="none" if transform == "auto" else transform)


def check_columns(spec: Spec, path: str, header: List[str]) -> None:
    """Every column the spec reads must be in ``header``."""
    if spec.fmt == "avazu_csv":
        need = {"id": "the Avazu header", "click": "the label", "hour": "the Avazu header"}
        need.update({c: "the Avazu header" for c in AVAZU_COLUMNS[3:]})
    else:
        need = {spec.label: "--label-column"}
        need.update({c: "--dense-columns" for c in spec.dense})
        need.update({c: "--categorical-columns" for c in spec.categorical})
        need.update({c: "--multi-hot-columns" for c in spec.multi_hot})
    for col, flag in need.items():
        if col not in header:
            raise ValueError(f"{path}: column {col!r} (from {flag}) is not in the header; the "
                             f"header has {header}. Fix the column name or the file.")


def check_feature_names(spec: Spec) -> None:
    for name, _ in spec.features:
        if name == "label" or name in spec.dense:
            raise ValueError(f"feature name {name!r} clashes with the label or a dense column; "
                             "rename the column")
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"feature name {name!r} cannot be a file name; rename the column")


# ------------------------------------------------------------------------------------- hashing
def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def row_uniform(seed: int, keys: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) number per row key, a pure function of (seed, key)."""
    with np.errstate(over="ignore"):
        base = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        h = splitmix64(keys.astype(np.uint64) + base)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# --------------------------------------------------------------------------- string lookup keys
_MAX_KEY_BYTES = 64


def _string_parts(arr: pa.Array) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts, lengths, data bytes)`` of a string array, zero-copy."""
    arr = pc.cast(arr, pa.string()) if arr.type != pa.string() else arr
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None and bufs[2].size else np.zeros(1, np.uint8)
    return offsets[:-1].astype(np.int64), np.diff(offsets).astype(np.int64), data


def string_keys(arr: pa.Array, width: int, seed: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """uint64 lookup keys of a string array and the byte lengths.

    ``seed=None``: the bytes zero-padded into one uint64 (exact for strings of <= 8 bytes, up to
    trailing NUL bytes, which the caller resolves with the lengths). Otherwise a seeded hash of
    the length and the first ``min(width, 64)`` bytes; the caller verifies hits exactly.
    """
    starts, lengths, data = _string_parts(arr)
    w8 = max(8, -(-min(max(width, 1), _MAX_KEY_BYTES) // 8) * 8)
    n = len(lengths)
    mat = np.zeros((n, w8), dtype=np.uint8)
    cols = np.arange(w8, dtype=np.int64)
    valid = cols[None, :] < lengths[:, None]
    if valid.any():
        mat[valid] = data[(starts[:, None] + cols[None, :])[valid]]
    words = mat.view("<u8")
    if seed is None:
        return words[:, 0].copy(), lengths
    with np.errstate(over="ignore"):
        h = splitmix64(lengths.astype(np.uint64) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
        for j in range(words.shape[1]):
            h = splitmix64(h ^ words[:, j])
    return h, lengths


_PACK_MASKS = np.array([(1 << (8 * i)) - 1 for i in range(8)] + [(1 << 64) - 1], dtype=np.uint64)
FAST_PATH = True  # packed integer keys and typed dense columns; False = the string path (tests)


def packed_keys(arr: pa.Array) -> Optional[np.ndarray]:
    """uint64 key per string: its bytes zero-padded, little-endian; ``None`` unless every value
    has at most 8 bytes and none holds a NUL byte (then the key is one-to-one with the string:
    Criteo's 8-hex-digit tokens, Avazu's ids). Vectorised, no per-value Python."""
    if not FAST_PATH:
        return None
    if pa.types.is_fixed_size_binary(arr.type):
        return _fixed_width_keys(arr)
    starts, lengths, data = _string_parts(arr)
    n = len(lengths)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    if int(lengths.max()) > 8:
        return None
    lo, hi = int(starts[0]), int(starts[-1] + lengths[-1])
    if hi > lo and not data[lo:hi].all():  # a NUL byte: packing would not be one-to-one
        return None
    pad = np.zeros(hi - lo + 16, dtype=np.uint8)
    pad[: hi - lo] = data[lo:hi]
    rel = starts - lo
    out = np.empty(n, dtype=np.uint64)
    phase = rel & 7
    for r in range(8):  # unaligned 8-byte loads, grouped by start address modulo 8
        sel = phase == r
        if sel.any():
            words = np.frombuffer(pad, dtype="<u8", count=(len(pad) - r) // 8, offset=r)
            out[sel] = words[rel[sel] >> 3]
    return out & _PACK_MASKS[lengths]


def _fixed_width_keys(arr: pa.Array) -> Optional[np.ndarray]:
    """:func:`packed_keys` of a ``fixed_size_binary`` array of at most 8 bytes whose nulls stand
    for empty strings (the CSV reader's fixed-width parse): the data buffer viewed as integers,
    zero where null. ``None`` when a value holds a NUL byte."""
    n, width = len(arr), arr.type.byte_width
    if width > 8:
        return None
    validity, data = arr.buffers()
    mat = np.frombuffer(data, dtype=np.uint8, count=(arr.offset + n) * width)[arr.offset * width:]
    mat = mat.reshape(n, width)
    valid = None if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
    if not (mat.all() if valid is None else mat[valid].all()):
        return None  # a NUL byte: packing would not be one-to-one
    if width == 8:
        keys = mat.view("<u8")[:, 0].copy()
    else:
        keys = np.zeros((n, 8), dtype=np.uint8)
        keys[:, :width] = mat
        keys = keys.view("<u8")[:, 0]
    if valid is not None:
        keys[~valid] = 0
    return keys


def text_values(arr: pa.Array) -> pa.Array:
    """A categorical column as strings (a fixed-width parse's nulls are empty strings)."""
    if arr.type == pa.string():
        return arr
    return pc.fill_null(pc.cast(pc.cast(arr, pa.binary()), pa.string()), "")


def unpack_keys(keys: np.ndarray) -> pa.Array:
    """The strings of :func:`packed_keys`' keys."""
    mat = np.ascontiguousarray(keys, dtype="<u8").view(np.uint8).reshape(-1, 8)
    nonzero = mat != 0
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(nonzero.sum(axis=1), out=offsets[1:])
    data = mat[nonzero]
    if offsets[-1] >= 1 << 31:
        return pa.LargeStringArray.from_buffers(len(keys), pa.py_buffer(offsets), pa.py_buffer(data))
    return pa.StringArray.from_buffers(len(keys), pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data))


class Vocabulary:
    """Raw value strings -> ids (``values[i]`` has id ``i + 1``; everything else is id 0).

    ``keys``: the values' :func:`packed_keys` when every value packs; blocks that pack too are
    then looked up by integer key (each distinct key of a block once, by binary search).
    """

    def __init__(self, name: str, values: pa.Array, keys: Optional[np.ndarray] = None):
        self.name = name
        self.values = values
        _, self.lengths, _ = _string_parts(values) if len(values) else (None, np.zeros(0, np.int64), None)
        self.width = int(self.lengths.max()) if len(values) else 0
        self.seed: Optional[int] = None if self.width <= 8 else 1
        self.packed = keys is not None
        if self.packed:  # one-to-one keys, equal to string_keys(values, width, None)
            self.order = np.argsort(keys)  # distinct keys: any sort gives this order (SIMD's is fastest)
            self.sorted_keys = keys[self.order]
            return
        for _attempt in range(8):
            keys, _ = string_keys(values, self.width, self.seed)
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            if not (len(keys) > 1 and (sorted_keys[1:] == sorted_keys[:-1]).any()):
                break
            self.seed = 1 if self.seed is None else self.seed + 1  # key collision: rehash
        else:  # pragma: no cover - needs eight 64-bit collisions in a row
            raise RuntimeError(f"feature {name!r}: could not find collision-free lookup keys")
        self.order, self.sorted_keys = order, sorted_keys

    def __len__(self) -> int:
        return len(self.values) + 1

    def encode(self, arr: pa.Array) -> np.ndarray:
        """int32 ids of a string array (0 for values not in the vocabulary)."""
        keys = packed_keys(arr) if self.packed else None
        if keys is not None:
            if len(arr) > 1024:
                d = pa.array(keys).dictionary_encode()
                return self._lookup(d.dictionary.to_numpy())[d.indices.to_numpy(zero_copy_only=False)]
            return self._lookup(keys)
        if len(arr) > 1024:  # look up each distinct value of the block once
            d = arr.dictionary_encode()
            return self._encode(d.dictionary)[d.indices.to_numpy(zero_copy_only=False)]
        return self._encode(arr)

    def encode_distinct(self, dictionary: pa.Array) -> np.ndarray:
        """int32 ids of :func:`dictionary_encode`'s dictionary (packed keys or strings)."""
        if dictionary.type == pa.uint64():
            keys = dictionary.to_numpy(zero_copy_only=False)
            return self._lookup(keys) if self.packed else self._encode(unpack_keys(keys).cast(pa.string()))
        return self._encode(dictionary)

    def _lookup(self, keys: np.ndarray) -> np.ndarray:
        if len(keys) == 0 or len(self.sorted_keys) == 0:
            return np.zeros(len(keys), dtype=np.int32)
        # queries in sorted order: the binary searches then walk the table in order (~5x fewer
        # cache misses than random order at 10M keys)
        q = np.argsort(keys)
        pos = np.empty(len(keys), dtype=np.int64)
        pos[q] = np.searchsorted(self.sorted_keys, keys[q])
        np.minimum(pos, len(self.sorted_keys) - 1, out=pos)
        return np.where(self.sorted_keys[pos] == keys, self.order[pos] + 1, 0).astype(np.int32)

    def _encode(self, arr: pa.Array) -> np.ndarray:
        n = len(arr)
        if n == 0 or len(self.values) == 0:
            return np.zeros(n, dtype=np.int32)
        keys, lengths = string_keys(arr, self.width, self.seed)
        pos = np.minimum(np.searchsorted(self.sorted_keys, keys), len(self.sorted_keys) - 1)
        idx = self.order[pos]
        hit = (self.sorted_keys[pos] == keys) & (self.lengths[idx] == lengths)
        if self.seed is not None and hit.any():  # hashed keys: confirm the strings are equal
            where = np.flatnonzero(hit)
            same = pc.equal(self.values.take(pa.array(idx[where])), arr.take(pa.array(where)))
            hit[where] = same.to_numpy(zero_copy_only=False)
        return np.where(hit, idx + 1, 0).astype(np.int32)


# ------------------------------------------------------------------------------ counting tables
def dictionary_encode(values: pa.Array) -> Tuple[np.ndarray, pa.Array]:
    """``(indices, dictionary)`` of a block's string array: the dictionary holds the distinct
    :func:`packed_keys` (uint64) when every value packs, else the distinct strings; indices are
    the smallest unsigned type that fits (pass 1 stores them for pass 2)."""
    keys = packed_keys(values)
    d = (pa.array(keys) if keys is not None else text_values(values)).dictionary_encode()
    idx = d.indices.to_numpy(zero_copy_only=False)
    m = len(d.dictionary)
    return idx.astype(np.uint8 if m <= 1 << 8 else np.uint16 if m <= 1 << 16 else np.uint32), d.dictionary


def count_distinct(indices: np.ndarray, dictionary: pa.Array, order_keys: np.ndarray):
    """``(values, first order key, count)`` of the dictionary entries that ``indices`` use."""
    m = len(dictionary)
    count = np.bincount(indices, minlength=m)
    first = np.full(m, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, indices, order_keys)
    seen = np.flatnonzero(count)
    return dictionary.take(pa.array(seen)), first[seen], count[seen].astype(np.int64)


def _named(t: pa.Table, names: Dict[str, str]) -> pa.Table:
    """Columns of ``t`` selected and renamed by ``{old: new}`` (aggregate's order varies)."""
    return pa.table({new: t.column(old) for old, new in names.items()})


class ValueCounter:
    """Occurrences and first-seen position of every value of one feature (training rows).

    Values are counted by their :func:`packed_keys` until a block has a value that does not pack;
    from then on (and for what was counted before) by the strings themselves. Packed keys live in
    sorted numpy arrays (``keys``, ``first``, ``count``): pending block results are reduced by a
    sort and merged in by binary search whenever they outgrow the arrays (so every value is
    merged O(log) times). Strings go through a vectorised ``group_by`` per block and merge.
    """

    MERGE_ROWS = 1 << 20  # pending distinct values that trigger a merge, at least

    def __init__(self):
        self.table: Optional[pa.Table] = None  # strings
        self.pending: List[pa.Table] = []
        self.pending_rows = 0
        self.packed = True
        self.keys = np.zeros(0, dtype=np.uint64)
        self.first = np.zeros(0, dtype=np.int64)
        self.count = np.zeros(0, dtype=np.int64)
        self.pending_keys: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def _to_strings(self) -> None:
        self._merge_packed()
        if len(self.keys):
            self.table = pa.table({"v": unpack_keys(self.keys).cast(pa.string()),
                                   "first": pa.array(self.first), "count": pa.array(self.count)})
        self.keys, self.first, self.count = self.keys[:0], self.first[:0], self.count[:0]
        self.packed = False

    def add(self, values: pa.Array, order_keys: np.ndarray) -> None:
        """Add every value of a block with its order key (first-seen position)."""
        if len(values) == 0:
            return
        keys = packed_keys(values) if self.packed else None
        if keys is None and self.packed:
            self._to_strings()
        t = pa.table({"v": values if keys is None else pa.array(keys),
                      "first": pa.array(order_keys, pa.int64())})
        g = t.group_by("v", use_threads=False).aggregate([("first", "min"), ("first", "count")])
        g = _named(g, {"v": "v", "first_min": "first", "first_count": "count"})
        if keys is not None:
            self.add_groups(g.column("v").combine_chunks(), g.column("first").to_numpy(),
                            g.column("count").to_numpy())
        else:
            self._add_table(g)

    def add_groups(self, values: pa.Array, first: np.ndarray, count: np.ndarray) -> None:
        """Add distinct ``values`` (packed uint64 keys or strings) seen ``count`` times, first at
        order key ``first`` (from :func:`count_distinct`)."""
        if len(values) == 0:
            return
        if values.type == pa.uint64() and self.packed:
            self.pending_keys.append((values.to_numpy(zero_copy_only=False),
                                      np.asarray(first, np.int64), np.asarray(count, np.int64)))
            self.pending_rows += len(values)
            if self.pending_rows >= max(self.MERGE_ROWS, len(self.keys)):
                self._merge_packed()
            return
        if values.type == pa.uint64():
            values = unpack_keys(values.to_numpy(zero_copy_only=False)).cast(pa.string())
        elif self.packed:
            self._to_strings()
        g = pa.table({"v": values, "first": pa.array(first, pa.int64()), "count": pa.array(count, pa.int64())})
        self._add_table(g)

    def _merge_packed(self) -> None:
        parts, self.pending_keys, self.pending_rows = self.pending_keys, [], 0
        if not parts:
            return
        k, f, c = (np.concatenate([p[i] for p in parts]) for i in range(3))
        o = np.argsort(k)  # equal keys' min and sum do not depend on their order: no stable sort
        k, f, c = k[o], f[o], c[o]
        start = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
        k, f, c = k[start], np.minimum.reduceat(f, start), np.add.reduceat(c, start)
        if not len(self.keys):
            self.keys, self.first, self.count = k, f, c
            return
        pos = np.searchsorted(self.keys, k)  # k sorted: the searches walk the arrays in order
        hit = pos < len(self.keys)
        hit[hit] = self.keys[pos[hit]] == k[hit]
        at = pos[hit]
        self.first[at] = np.minimum(self.first[at], f[hit])
        self.count[at] += c[hit]
        new = ~hit
        self.keys = np.insert(self.keys, pos[new], k[new])
        self.first = np.insert(self.first, pos[new], f[new])
        self.count = np.insert(self.count, pos[new], c[new])

    def _add_table(self, g: pa.Table) -> None:
        self.pending.append(g)
        self.pending_rows += g.num_rows
        if self.pending_rows >= max(self.MERGE_ROWS, self.table.num_rows if self.table is not None else 0):
            self._merge()

    def _merge(self) -> None:
        parts = ([self.table] if self.table is not None else []) + self.pending
        self.pending, self.pending_rows = [], 0
        if not parts:
            return
        t = pa.concat_tables(parts)
        if len(parts) > 1:
            t = t.group_by("v", use_threads=False).aggregate([("first", "min"), ("count", "sum")])
            t = _named(t, {"v": "v", "first_min": "first", "count_sum": "count"})
        self.table = t

    def result(self) -> pa.Table:
        """``v``, ``first``, ``count`` of every distinct value (``v``: uint64 packed keys while
        :attr:`packed`, else strings)."""
        if self.packed:
            self._merge_packed()
            if len(self.keys):
                return pa.table({"v": pa.array(self.keys), "first": pa.array(self.first),
                                 "count": pa.array(self.count)})
        self._merge()
        if self.table is None:
            return pa.table({"v": pa.array([], pa.string()), "first": pa.array([], pa.int64()),
                             "count": pa.array([], pa.int64())})
        return self.table


def build_vocabulary(name: str, table: pa.Table, min_count: int) -> Tuple[Vocabulary, np.ndarray, int]:
    """``(vocabulary, counts [V], distinct values)``: values with ``count >= min_count`` in
    descending count, ties by first-seen position; ``counts[0]`` = occurrences of the rest."""
    count = table.column("count").to_numpy().astype(np.int64)
    first = table.column("first").to_numpy()
    keep = count >= min_count
    idx = np.flatnonzero(keep)
    order = idx[np.lexsort((first[idx], -count[idx]))]
    counts = np.concatenate([[int(count[~keep].sum())], count[order]]).astype(np.int64)
    v = table.column("v")
    if v.type == pa.uint64():  # packed keys
        keys = v.to_numpy()[order]
        return Vocabulary(name, unpack_keys(keys), keys), counts, int(len(count))
    values = v.combine_chunks().take(pa.array(order, pa.int64()))
    return Vocabulary(name, values), counts, int(len(count))


# ------------------------------------------------------------------------------------- parsing
@dataclass
class BadRows:
    """Malformed rows per reason and the first one seen."""

    counts: Dict[str, int] = field(default_factory=dict)
    first: Optional[Tuple[str, int, str, str]] = None  # (path, line, reason, text)
    rows: int = 0  # good + bad

    def add(self, path: str, line: int, reason: str, text: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        if self.first is None or (self.first[0] == path and line < self.first[1]):
            self.first = (path, line, reason, text)  # the earliest line of the first bad file

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def check(self, max_bad_fraction: float, final: bool) -> None:
        if not self.total or (not final and self.rows < MIN_ROWS_FOR_BAD_CHECK):
            return
        if self.total > max_bad_fraction * self.rows:
            path, line, reason, text = self.first
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
            raise ValueError(
                f"{path}: {self.total} of {self.rows} rows read are malformed ({reasons}), more "
                f"than --max-bad-fraction={max_bad_fraction}; the first is line {line} "
                f"({reason}): {text[:200]!r}. Check --format/--delimiter and the column flags "
                "against the file, fix or drop those lines, or raise --max-bad-fraction.")


@dataclass
class Block:
    """One parsed block of good rows."""

    path: str
    lines: np.ndarray  # 1-based physical line of every good row
    order: np.ndarray  # int64 global order key (file index << 40 | line; < 2**55)
    label: np.ndarray  # int8
    dense: List[np.ndarray]  # float32 [n] per dense column
    cats: Dict[str, pa.Array]  # string arrays
    multi: Dict[str, Tuple[pa.Array, np.ndarray]]  # (flat string values, int64 row of each)


def _label_error(path: str, column: str, line: int, value) -> ValueError:
    return ValueError(
        f"{path}:{line}: label column {column!r} has value {value!r}; labels must be 0 or 1. "
        "Binarise the label first (e.g. rating >= 4 -> 1) or point --label-column at the "
        "click column.")


class FileReader:
    """Streams one file block by block (pyarrow), yielding :class:`Block` s of good rows."""

    def __init__(self, spec: Spec, path: str, file_index: int, block_size: int,
                 max_bad_fraction: float):
        self.spec, self.path, self.file_index, self.block_size = spec, path, file_index, block_size
        self._max_bad = max_bad_fraction
        self.skipped: List[int] = []  # physical lines of rows with a wrong field count
        self.skipped_text: List[str] = []
        self.raw: Optional[pa.NativeFile] = None
        # pieces a block is parsed in (see _record_batches); whole blocks if they do not divide it
        self.parse_split = block_size // PARSE_PIECE if FAST_PATH and block_size % PARSE_PIECE == 0 else 1

    def _handler(self, row) -> str:
        self.skipped.append(row.number)
        self.skipped_text.append(row.text)
        return "skip"

    def _open(self, level: int):
        """The pyarrow streaming reader at a parsing ``level``: 2 = as 1, and the categorical
        columns as ``fixed_size_binary`` of ``spec.fixed_width`` bytes (empty = null; the
        data buffer is then the packed keys); 1 = dense columns parsed as float64 by the CSV
        reader (empty = null); 0 = every column as strings."""
        spec = self.spec
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such file (check --input/--test-input)")
        if os.path.getsize(self.path) == 0:
            raise ValueError(f"{self.path}: empty file; nothing to preprocess")
        self.raw = pa.OSFile(self.path, "rb")
        stream = pa.CompressedInputStream(self.raw, "gzip") if self.path.endswith(".gz") else self.raw
        cols = spec.source_columns()
        types = {c: pa.string() for c in cols}
        if level >= 1:
            types.update({c: pa.float64() for c in spec.dense})
        if level >= 2:
            types.update({c: pa.binary(spec.fixed_width) for c in spec.categorical})
        read = pcsv.ReadOptions(use_threads=False, block_size=self.block_size // self.parse_split,
                                column_names=spec.column_names)
        parse = pcsv.ParseOptions(delimiter=spec.delimiter, quote_char='"' if spec.quoting else False,
                                  ignore_empty_lines=False, invalid_row_handler=self._handler)
        conv = pcsv.ConvertOptions(column_types=types, include_columns=cols, null_values=[""],
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
        try:
            return pcsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=conv)
        except pa.ArrowInvalid as e:
            if level:
                raise
            if "Empty CSV file" in str(e):
                raise ValueError(f"{self.path}: empty file; nothing to preprocess") from None
            raise ValueError(f"{self.path}: cannot read as {spec.fmt}: {e}") from None

    def position(self) -> int:
        """Bytes of the file consumed so far (for the progress bar)."""
        try:
            return self.raw.tell() if self.raw is not None else 0
        except Exception:
            return 0

    def _lines(self, first_good: int, n: int, skipped: List[int]) -> np.ndarray:
        """Physical lines of good rows ``first_good .. first_good + n - 1`` (0-based)."""
        base = 1 + int(self.spec.header)  # line of the first data row
        k = np.arange(first_good, first_good + n, dtype=np.int64)
        if not skipped:
            return k + base
        s = np.asarray(skipped, dtype=np.int64)
        at = s - base - np.arange(len(s))  # number of good rows before each skipped line
        return k + base + np.searchsorted(at, k, side="right")

    def _reset(self) -> None:
        if self.raw is not None:
            self.raw.close()
        self.skipped, self.skipped_text = [], []

    def _record_batches(self):
        """``(record batch, lines skipped so far)``; the next block is parsed in a background
        thread while the caller works on this one (pyarrow releases the GIL). Dense (and, with
        ``spec.fixed_width``, categorical) columns are converted by the CSV reader when every
        value of the file converts; at the first block that does not, the file is read again
        one :meth:`_open` level lower from that block on.

        Blocks are parsed in :attr:`parse_split` pieces of ``PARSE_PIECE`` bytes (a third less
        CPU than 16 MiB at once: a piece stays in the CPU's caches) and put together again:
        pyarrow's block ``k`` holds the lines that end in bytes ``[k * size, (k + 1) * size)``,
        so ``parse_split`` consecutive pieces are one block of ``--block-size`` and the output
        (its parquet row groups) does not change. A line longer than a piece makes pyarrow
        fail: then the file is read again in whole blocks."""
        levels = [0]
        if FAST_PATH and self.spec.dense:
            levels.insert(0, 1)
        if FAST_PATH and self.spec.fixed_width and self.spec.categorical:
            levels.insert(0, 2)
        done = 0  # batches handed out
        with ThreadPoolExecutor(1) as pool:
            while True:
                try:
                    reader = self._open(levels[0])
                    for _ in range(done):  # after a fall-back: skip what was handed out
                        self._next_batch(reader)
                    fut = pool.submit(self._next_batch, reader)
                    while True:
                        item = fut.result()
                        if item is None:
                            return
                        fut = pool.submit(self._next_batch, reader)
                        done += 1
                        yield item
                except pa.ArrowInvalid as e:
                    if "straddl" in str(e) and self.parse_split > 1:  # a line longer than a piece
                        self.parse_split = 1
                    elif len(levels) == 1:
                        raise
                    else:
                        levels.pop(0)
                    fut = None
                    self._reset()

    def _next_batch(self, reader):
        """The next block (:attr:`parse_split` pieces put together), or ``None`` at the end."""
        pieces = []
        for _ in range(self.parse_split):
            try:
                pieces.append(reader.read_next_batch())
            except StopIteration:
                break
        if not pieces:
            return None
        rb = pieces[0] if len(pieces) == 1 else pa.concat_batches(pieces)
        return rb, len(self.skipped)

    def blocks(self, bad: BadRows):
        spec = self.spec
        good_seen = 0  # rows pyarrow returned so far
        reported = 0
        rows_in_file = 0
        for rb, nskip in self._record_batches():
            n = rb.num_rows
            lines = self._lines(good_seen, n, self.skipped[:nskip])
            good_seen += n
            for line, text in zip(self.skipped[reported:nskip], self.skipped_text[reported:nskip]):
                bad.add(self.path, line, "wrong_field_count", text)
            bad.rows += nskip - reported
            reported = nskip
            keep = np.ones(n, dtype=bool)
            # blank lines come back as all-empty rows: drop them silently
            label_col = rb.column("click" if spec.fmt == "avazu_csv" else spec.label)
            blank = pc.equal(pc.binary_length(label_col), 0).to_numpy(zero_copy_only=False)
            if blank.any():
                for c in rb.column_names:
                    col = rb.column(c)
                    empty = pc.equal(pc.binary_length(col), 0) if col.type == pa.string() else pc.is_null(col)
                    blank &= empty.to_numpy(zero_copy_only=False)
            keep &= ~blank
            is01 = pc.is_in(label_col, value_set=pa.array(["0", "1"])).to_numpy(zero_copy_only=False)
            badlabel = keep & ~is01
            if badlabel.any():
                i = int(np.flatnonzero(badlabel)[0])
                raise _label_error(self.path, spec.label, int(lines[i]), label_col[i].as_py())
            dense = []  # float64 [n] per column (contiguous: one pass each)
            nonnum = np.zeros(n, dtype=bool)
            for c in spec.dense:
                col = rb.column(c)
                if col.type == pa.float64():  # parsed by the CSV reader; empty = null
                    vals, ok = col, np.ones(n, dtype=bool)
                else:
                    empty = pc.equal(pc.binary_length(col), 0)
                    col = pc.if_else(empty, pa.scalar(None, pa.string()), col)
                    try:
                        vals = pc.cast(col, pa.float64())
                        ok = np.ones(n, dtype=bool)
                    except pa.ArrowInvalid:
                        ok = pc.fill_null(pc.match_substring_regex(
                            col, r"^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$"), True)
                        ok = ok.to_numpy(zero_copy_only=False)
                        vals = pc.cast(pc.if_else(pa.array(ok), col, pa.scalar(None, pa.string())), pa.float64())
                v = pc.fill_null(vals, 0.0).to_numpy(zero_copy_only=False)
                ok &= np.isfinite(v)
                nonnum |= keep & ~ok
                dense.append(np.where(ok, v, 0.0))
            self._bad_mask(bad, nonnum, lines, rb, "non_numeric_dense")
            keep &= ~nonnum
            cats: Dict[str, pa.Array] = {}
            if spec.fmt == "avazu_csv":
                ts = pc.strptime(rb.column("hour"), format="%y%m%d%H", unit="s", error_is_null=True)
                badhour = keep & ~pc.is_valid(ts).to_numpy(zero_copy_only=False)
                self._bad_mask(bad, badhour, lines, rb, "bad_hour")
                keep &= ~badhour
                ts = pc.fill_null(ts, pa.scalar(0, pa.timestamp("s")))
                cats["hour_of_day"] = pc.cast(pc.hour(ts), pa.string())
                cats["weekday"] = pc.cast(pc.day_of_week(ts), pa.string())
            nb = int(keep.sum())
            bad.rows += int((~blank).sum())
            rows_in_file += nb + int(nonnum.sum())
            bad.check(self._max_bad, final=False)
            if nb == 0:
                continue
            mask = pa.array(keep)
            label = label_col.filter(mask)
            label = pc.equal(label, "1").to_numpy(zero_copy_only=False).astype(np.int8)
            for c in spec.categorical:
                if c not in cats:
                    cats[c] = rb.column(c)
                cats[c] = cats[c].filter(mask) if nb < n else cats[c]
            multi = {}
            for c in spec.multi_hot:
                col = rb.column(c).filter(mask) if nb < n else rb.column(c)
                lists = pc.split_pattern(col, pattern=spec.separator)
                flat = lists.flatten()
                parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
                nonempty = pc.greater(pc.binary_length(flat), 0)
                if not pc.all(nonempty).as_py():
                    flat = flat.filter(nonempty)
                    parent = parent[nonempty.to_numpy(zero_copy_only=False)]
                multi[c] = (flat, parent)
            good_lines = lines[keep]
            order = (np.int64(self.file_index) << np.int64(40)) | good_lines
            yield Block(self.path, good_lines, order, label,
                        [(d[keep] if nb < n else d).astype(np.float32) for d in dense],
                        cats, multi)
        for line, text in zip(self.skipped[reported:], self.skipped_text[reported:]):
            bad.add(self.path, line, "wrong_field_count", text)
        bad.rows += len(self.skipped) - reported
        rows_in_file += len(self.skipped)
        self._reset()
        if rows_in_file == 0:
            raise ValueError(f"{self.path}: no data rows (empty file{' after the header' if spec.header else ''})")

    def _bad_mask(self, bad: BadRows, mask: np.ndarray, lines: np.ndarray, rb, reason: str) -> None:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            text = self.spec.delimiter.join(str(text_values(rb.column(c).slice(i, 1))[0].as_py())
                                            if pa.types.is_fixed_size_binary(rb.column(c).type)
                                            else str(rb.column(c)[i].as_py()) for c in rb.column_names)
            bad.add(self.path, int(lines[i]), reason, text, n=int(mask.sum()))


def count_data_lines(path: str, header: bool) -> int:
    """Physical data lines of a file (newline count, plus an unterminated last line)."""
    opener = gzip.open if path.endswith(".gz") else open
    n, last = 0, b"\n"
    with opener(path, "rb") as f:
        while True:
            chunk = f.read(1 << 24)
            if not chunk:
                break
            n += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        n += 1
    return max(0, n - int(header))


# ------------------------------------------------------------------------------------ splitting
class Splitter:
    """Split of each row from its order key (0 = train, 1 = val, 2 = test)."""

    def __init__(self, fractions: Sequence[float], by_order: bool, seed: int, num_inputs: int,
                 file_bases: Optional[List[int]], total_lines: int, header: bool,
                 random_val_test: bool = False):
        self.cum = np.cumsum(fractions)
        self.by_order, self.seed, self.num_inputs = by_order, seed, num_inputs
        self.file_bases, self.total, self.header = file_bases, total_lines, header
        self.random_val_test = random_val_test
        held_out = fractions[1] + fractions[2]
        self.val_share = fractions[1] / held_out if held_out > 0 else 0.0

    def assign(self, file_index: int, order: np.ndarray, lines: np.ndarray) -> np.ndarray:
        if file_index >= self.num_inputs:  # --test-input files
            return np.full(len(order), 2, dtype=np.int8)
        if self.by_order:
            pos = self.file_bases[file_index] + lines - 1 - int(self.header)
            cuts = np.floor(self.cum[:2] * self.total + 1e-6).astype(np.int64)  # 0.7+0.2 < 0.9
            split = np.searchsorted(cuts, pos, side="right").astype(np.int8)
            if self.random_val_test:  # the held-out tail: val or test by the row hash
                held = split > 0
                split[held] = np.where(row_uniform(self.seed, order[held]) < self.val_share, 1, 2)
            return split
        u = row_uniform(self.seed, order)
        return np.searchsorted(self.cum[:2], u, side="right").astype(np.int8)


def parse_fractions(text: str, test_input: bool) -> List[float]:
    try:
        fr = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--split/--split-by-order {text!r}: expected fractions like 0.8,0.1,0.1") from None
    if test_input:
        if len(fr) == 3 and fr[2] != 0:
            raise ValueError(f"with --test-input the split {text!r} gives train,val fractions of "
                             "--input (e.g. 0.9,0.1); the test split is the --test-input files")
        fr = fr[:2] + [0.0]
    if len(fr) != 3 or any(f < 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise ValueError(f"--split/--split-by-order {text!r}: need three non-negative fractions "
                         "train,val,test summing to 1 (two, train,val, with --test-input)")
    return fr


# ------------------------------------------------------------------------------ per-block work
def _bag_order_keys(order: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """First-seen order key of each bag value: (row, place in the bag)."""
    place = np.arange(len(parent)) - np.searchsorted(parent, parent)
    return (order[parent] << np.int64(8)) | np.minimum(place, 255)


def _dense_out(spec: Spec, dense: List[np.ndarray]) -> List[np.ndarray]:
    """The written float32 dense columns of a block's parsed columns."""
    out = []
    for j in range(len(spec.dense)):
        d = dense[j]
        if spec.dense_transform == "log":
            d = np.log1p(np.maximum(d, 0.0))
        out.append(d.astype(np.float32))
    return out


def _spill_block(spill: Spill, spec: Spec, b: Block, split: np.ndarray,
                 counters: Dict[str, "ValueCounter"], pool: ThreadPoolExecutor) -> dict:
    """Pass 1 on the fast path: dictionary-encode each feature of the block, count the train
    rows' values from the dictionary (features in parallel on ``pool``: the work is in numpy
    and pyarrow, which release the GIL), and store what pass 2 needs; returns the references."""
    tr = split == 0
    any_train = bool(tr.any())
    order_tr = b.order[tr]

    def categorical(name: str):
        idx, dic = dictionary_encode(b.cats[name])
        if any_train:
            counters[name].add_groups(*count_distinct(idx[tr], dic, order_tr))
        return idx, dic

    def multi_hot(name: str):
        flat, parent = b.multi[name]
        idx, dic = dictionary_encode(flat)
        sel = tr[parent]
        if sel.any():
            counters[name].add_groups(*count_distinct(idx[sel], dic, _bag_order_keys(b.order, parent)[sel]))
        return idx, dic, parent

    cats = pool.map(categorical, spec.categorical)
    multi = pool.map(multi_hot, spec.multi_hot)
    rec = {"split": spill.put(split), "label": spill.put(b.label),
           "dense": [spill.put(d) for d in _dense_out(spec, b.dense)]}
    for name, arrays in zip(spec.categorical, cats):
        rec[name] = tuple(spill.put(a) for a in arrays)
    for name, arrays in zip(spec.multi_hot, multi):
        rec[name] = tuple(spill.put(a) for a in arrays)
    return rec


def _block_tables(spec: Spec, schema: pa.Schema, oov_rows: Dict[str, int], split: np.ndarray,
                  label: np.ndarray, dense: List[np.ndarray], ids: Dict[str, np.ndarray],
                  bags: Dict[str, Tuple[np.ndarray, np.ndarray]]) -> List[Tuple[str, pa.Table]]:
    """Pass 2: one block's encoded rows per split; counts train OOV rows."""
    n = len(split)
    cols = {"label": pa.array(label)}
    for c, d in zip(spec.dense, dense):
        cols[c] = pa.array(d)
    for name in spec.categorical:
        oov_rows[name] += int(((ids[name] == 0) & (split == 0)).sum())
        cols[name] = pa.array(ids[name])
    for name in spec.multi_hot:
        parent, bag_ids = bags[name]
        lengths = np.bincount(parent, minlength=n)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        oov_rows[name] += int(np.unique(parent[(bag_ids == 0) & (split[parent] == 0)]).size)
        cols[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(bag_ids))
    table = pa.table(cols, schema=schema)
    return [(s, table.filter(pa.array(split == si))) for si, s in enumerate(SPLITS) if (split == si).any()]


def _write_parts(writers, rows2: np.ndarray, parts: List[Tuple[str, pa.Table]]) -> None:
    for s, t in parts:
        writers[s].write_table(t)
        rows2[SPLITS.index(s)] += t.num_rows


def _encode_spilled(spill: Spill, blocks: List[dict], spec: Spec, vocabs: Dict[str, "Vocabulary"],
                    schema: pa.Schema, writers, oov_rows, rows2, bar, pool: ThreadPoolExecutor) -> None:
    """Pass 2 from pass 1's stored blocks: each block dictionary's ids, looked up once (features
    in parallel on ``pool``); each split's parquet file is written in a thread of its own, in
    block order, at most one block behind."""

    def lookup(item):
        name, (idx, dic) = item
        return vocabs[name].encode_distinct(dic)[idx]

    split_writers = {s: ThreadPoolExecutor(1) for s in SPLITS}  # one each: keeps block order
    try:
        pending: List[list] = []
        for rec in blocks:
            names = list(spec.categorical) + list(spec.multi_hot)
            stored = [(name, tuple(spill.get(r) for r in rec[name])) for name in names]
            found = list(pool.map(lookup, [(name, a[:2]) for name, a in stored]))
            ids = dict(zip(spec.categorical, found))
            bags = {name: (a[2], f) for (name, a), f in zip(stored[len(spec.categorical):],
                                                            found[len(spec.categorical):])}
            parts = _block_tables(spec, schema, oov_rows, spill.get(rec["split"]), spill.get(rec["label"]),
                                  [spill.get(r) for r in rec["dense"]], ids, bags)
            while len(pending) > 1:
                for f in pending.pop(0):
                    f.result()
            pending.append([split_writers[s].submit(_write_parts, writers, rows2, [(s, t)]) for s, t in parts])
            bar.update(rec["bytes"])
        for fs in pending:
            for f in fs:
                f.result()
    finally:
        for w in split_writers.values():
            w.shutdown()


def _encode_reparsed(args, spec: Spec, files: List[str], sizes: List[int], splitter: "Splitter",
                     vocabs: Dict[str, "Vocabulary"], schema: pa.Schema, writers, oov_rows, rows2,
                     bar) -> None:
    """Pass 2 by parsing the input again (the string path)."""
    bad2 = BadRows()
    for fi, p in enumerate(files):
        reader = FileReader(spec, p, fi, args.block_size, args.max_bad_fraction)
        done = 0
        for b in reader.blocks(bad2):
            split = splitter.assign(fi, b.order, b.lines)
            ids = {name: vocabs[name].encode(b.cats[name]) for name in spec.categorical}
            bags = {}
            for name in spec.multi_hot:
                flat, parent = b.multi[name]
                bags[name] = (parent, vocabs[name].encode(flat))
            _write_parts(writers, rows2, _block_tables(spec, schema, oov_rows, split, b.label,
                                                       _dense_out(spec, b.dense), ids, bags))
            pos = reader.position()
            bar.update(pos - done)
            done = pos
        bar.update(sizes[fi] - done) if sizes[fi] > done else None


# ----------------------------------------------------------------------------------------- main
def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def preprocess(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the command line ``argv``; returns the written meta dict."""
    args = build_parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    inputs = _split_list(args.input)
    tests = _split_list(args.test_input)
    if not inputs:
        raise ValueError("--input: give at least one file")
    if args.split and args.split_by_order:
        raise ValueError("give either --split or --split-by-order, not both")
    by_order = args.split_by_order is not None
    if args.random_val_test and not by_order:
        raise ValueError("--random-val-test splits the held-out tail of --split-by-order between "
                         "val and test; give --split-by-order too (--split is random already)")
    if args.random_val_test and tests:
        raise ValueError("--random-val-test with --test-input: the test split is the "
                         "--test-input files; leave --random-val-test out")
    fractions = parse_fractions(args.split_by_order or args.split or ("0.9,0.1" if tests else "0.8,0.1,0.1"),
                                bool(tests))
    if args.min_count < 1:
        raise ValueError(f"--min-count must be >= 1, got {args.min_count}")
    if not 0 <= args.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    files = inputs + tests
    if len(files) > 1 << 14:
        raise ValueError(f"{len(files)} input files; at most {1 << 14} (concatenate some)")
    headered = args.format != "criteo_tsv"
    delimiter = "\t" if args.format == "criteo_tsv" else (args.delimiter if args.format == "csv" else ",")
    headers = {p: read_header(p, delimiter) for p in files} if headered else {}
    for p in files:
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p}: no such file (check --input/--test-input)")
    spec = build_spec(args, headers.get(files[0]), files[0])
    for p in files:
        if headered:
            check_columns(spec, p, headers[p])
    check_feature_names(spec)

    bases, total = None, 0
    if by_order:
        bases = []
        for p in inputs:
            bases.append(total)
            total += count_data_lines(p, spec.header)
    splitter = Splitter(fractions, by_order, args.seed, len(inputs), bases, total, spec.header,
                        random_val_test=args.random_val_test)
    sizes = [os.path.getsize(p) for p in files]

    # ---- pass 1: count (and, on the fast path, keep every block's encoded columns for pass 2)
    counters = {name: ValueCounter() for name, _ in spec.features}
    os.makedirs(args.out, exist_ok=True)
    spill = Spill(os.path.join(args.out, ".pass1.tmp")) if FAST_PATH else None
    blocks: List[dict] = []
    try:
        with ThreadPoolExecutor(WORKERS) as pool:  # per-feature work; numpy/pyarrow release the GIL
            return _preprocess(args, argv, spec, files, inputs, sizes, splitter, fractions, by_order,
                               tests, counters, spill, blocks, pool)
    finally:
        if spill is not None:
            spill.close()


def _preprocess(args, argv, spec, files, inputs, sizes, splitter, fractions, by_order, tests,
                counters, spill, blocks, pool) -> dict:
    progress = not args.no_progress
    rows = np.zeros(3, dtype=np.int64)
    clicks = np.zeros(3, dtype=np.int64)
    bad1 = BadRows()
    file_stats = []
    with _progress(sum(sizes), "pass 1/2 (count)", progress) as bar:
        for fi, p in enumerate(files):
            reader = FileReader(spec, p, fi, args.block_size, args.max_bad_fraction)
            good, done = 0, 0
            for b in reader.blocks(bad1):
                split = splitter.assign(fi, b.order, b.lines)
                rows += np.bincount(split, minlength=3)
                clicks += np.bincount(split, weights=b.label, minlength=3).astype(np.int64)
                good += len(split)
                tr = split == 0
                pos = reader.position()
                if spill is not None:  # dictionary-encode every value once; keep for pass 2
                    blocks.append(dict(_spill_block(spill, spec, b, split, counters, pool), bytes=pos - done))
                elif tr.any():
                    trm = pa.array(tr)
                    for name in spec.categorical:
                        counters[name].add(b.cats[name].filter(trm), b.order[tr])
                    for name in spec.multi_hot:
                        flat, parent = b.multi[name]
                        sel = tr[parent]
                        counters[name].add(flat.filter(pa.array(sel)), _bag_order_keys(b.order, parent)[sel])
                bar.update(pos - done)
                done = pos
            bar.update(sizes[fi] - done) if sizes[fi] > done else None
            file_stats.append({"path": os.path.abspath(p), "bytes": sizes[fi], "rows": good})
    bad1.check(args.max_bad_fraction, final=True)
    if bad1.total:
        logger.warning("skipped %d malformed rows of %d: %s", bad1.total, bad1.rows, bad1.counts)
    if rows[0] == 0:
        raise ValueError(f"the train split is empty ({int(rows.sum())} good rows in {files}); "
                         "check --split and the input")

    # ---- vocabularies
    os.makedirs(os.path.join(args.out, "counts"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "vocab"), exist_ok=True)
    def vocabulary(feature: Tuple[str, str]) -> Tuple[Vocabulary, dict]:
        name, kind = feature
        vocab, counts, distinct = build_vocabulary(name, counters[name].result(), args.min_count)
        counters[name] = None  # free the counting table
        np.save(os.path.join(args.out, "counts", f"{name}.npy"), counts)
        pq.write_table(pa.table({
            "id": pa.array(np.arange(len(vocab), dtype=np.int32)),
            "value": pa.concat_arrays([pa.array([None], pa.string()), vocab.values.cast(pa.string())]),
            "count": pa.array(counts),
        }), os.path.join(args.out, "vocab", f"{name}.parquet"))
        return vocab, {"name": name, "kind": kind, "vocab_size": len(vocab), "oov_id": 0,
                       "distinct_train_values": distinct, "oov_train_rows": 0}

    built = list(pool.map(vocabulary, spec.features))  # sorting, grouping and writing release the GIL
    vocabs: Dict[str, Vocabulary] = {name: v for (name, _), (v, _) in zip(spec.features, built)}
    features_meta = [m for _, m in built]

    # ---- pass 2: encode and write
    schema_fields = [pa.field("label", pa.int8())] + [pa.field(c, pa.float32()) for c in spec.dense]
    schema_fields += [pa.field(n, pa.int32()) for n in spec.categorical]
    schema_fields += [pa.field(n, pa.list_(pa.int32())) for n in spec.multi_hot]
    schema = pa.schema(schema_fields)
    tmp_paths = {s: os.path.join(args.out, f".{s}.parquet.tmp") for s in SPLITS}
    writers = {s: pq.ParquetWriter(tmp_paths[s], schema) for s in SPLITS}
    oov_rows = {name: 0 for name, _ in spec.features}
    rows2 = np.zeros(3, dtype=np.int64)
    try:
        with _progress(sum(sizes), "pass 2/2 (encode)", progress) as bar:
            if spill is not None:
                _encode_spilled(spill, blocks, spec, vocabs, schema, writers, oov_rows, rows2, bar, pool)
            else:
                _encode_reparsed(args, spec, files, sizes, splitter, vocabs, schema, writers,
                                 oov_rows, rows2, bar)
    finally:
        for w in writers.values():
            w.close()
    if not np.array_equal(rows, rows2):  # the passes must agree row for row
        raise RuntimeError(f"pass 2 read {rows2.tolist()} rows per split, pass 1 {rows.tolist()}: "
                           "the input changed during preprocessing?")
    for s in SPLITS:
        os.replace(tmp_paths[s], os.path.join(args.out, f"{s}.parquet"))
    for fm in features_meta:
        fm["oov_train_rows"] = oov_rows[fm["name"]]

    meta = {
        "format_version": FORMAT_VERSION,
        "command": ["python", "-m", "torchrec_cce.data.preprocess"] + argv,
        "source": {
            "format": spec.fmt, "inputs": file_stats[: len(inputs)], "test_inputs": file_stats[len(inputs):],
            "split": {"fractions": fractions, "by_order": by_order, "seed": args.seed,
                      "random_val_test": bool(args.random_val_test),
                      "test_from_test_input": bool(tests)},
            "delimiter": spec.delimiter, "multi_hot_separator": spec.separator if spec.multi_hot else None,
            "dense_transform": spec.dense_transform,
            "bad_rows": {"total": bad1.total, "rows_read": bad1.rows, "by_reason": bad1.counts,
                         "first": None if bad1.first is None else {"path": bad1.first[0], "line": bad1.first[1],
                                                                   "reason": bad1.first[2]}},
        },
        "label": spec.label,
        "dense_features": list(spec.dense),
        "features": features_meta,
        "splits": {s: {"rows": int(rows[i]), "click_rate": float(clicks[i] / rows[i]) if rows[i] else None}
                   for i, s in enumerate(SPLITS)},
        "min_count": args.min_count,
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchrec_cce.data.preprocess",
        description="Build vocabularies (contiguous ids, OOV id 0, descending training frequency), "
        "per-id training counts and encoded train/val/test parquet splits from a click log.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--format", required=True, choices=["criteo_tsv", "avazu_csv", "csv"],
                   help="criteo_tsv: Criteo Kaggle train.txt (label, 13 ints, 26 hex categoricals, no "
                   "header); avazu_csv: Avazu train.csv (header; all columns but id/click categorical, "
                   "hour -> hour_of_day + weekday); csv: any headered CSV, columns given by the flags below")
    p.add_argument("--input", required=True, help="comma-separated input files (.gz ok)")
    p.add_argument("--test-input", default=None,
                   help="comma-separated files that form the test split (then --split is train,val of --input)")
    p.add_argument("--split", default=None, help="random train,val,test fractions (default 0.8,0.1,0.1; "
                   "0.9,0.1 with --test-input), seeded by --seed")
    p.add_argument("--split-by-order", default=None,
                   help="like --split but in file order: the first fraction of lines is train, etc.")
    p.add_argument("--random-val-test", action="store_true",
                   help="with --split-by-order: train stays the first fraction of lines, the rest "
                   "goes to val or test at random (seeded by --seed), so both come from the same "
                   "period (validation then ranks models as test does)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split")
    p.add_argument("--label-column", default=None, help="csv: the 0/1 label column (default 'label')")
    p.add_argument("--categorical-columns", default=None,
                   help="csv: categorical columns (default: every column not named by another flag)")
    p.add_argument("--dense-columns", default=None, help="csv: numeric columns (float32 dense features)")
    p.add_argument("--multi-hot-columns", default=None, help="csv: columns holding several values per cell")
    p.add_argument("--multi-hot-separator", default="|", help="csv: separator inside multi-hot cells")
    p.add_argument("--ignore-columns", default=None,
                   help="csv: columns not to use when --categorical-columns is not given")
    p.add_argument("--delimiter", default=",", help="csv: field delimiter")
    p.add_argument("--dense-transform", default="auto", choices=["auto", "none", "log"],
                   help="log: log(1 + max(x, 0)) (auto = log for criteo_tsv, none otherwise); empty = 0")
    p.add_argument("--min-count", type=int, default=1,
                   help="values seen fewer times in the train split share the OOV id 0")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail when more than this fraction of rows is malformed")
    p.add_argument("--block-size", type=int, default=16 << 20, help="bytes per pyarrow CSV block")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output directory")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        meta = preprocess(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s, v in meta["splits"].items():
        print(f"{s}: {v['rows']} rows, click rate {v['click_rate']}")
    print("vocabulary sizes: " + ", ".join(f"{f['name']}={f['vocab_size']}" for f in meta["features"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
