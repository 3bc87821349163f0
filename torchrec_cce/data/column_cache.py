"""Memory-mapped numpy copies of a preprocessed split's parquet columns, shared by every process
that reads the split.

Decoding ``train.parquet`` into private numpy arrays costs every rank the whole split (Criteo
Kaggle: ~5.9 GB of labels, dense values and ids per rank, x ranks per host). Instead the split is
decoded once into ``.npy`` files under ``<data_dir>/mmap/<split>/`` and every process maps them
read-only (``np.load(mmap_mode="r")``, as TorchRec's ``InMemoryBinaryCriteoIterDataPipe`` does
with ``mmap_mode``): the rows live once in the page cache, shared by the ranks, and the kernel can
evict them under memory pressure.

The first process to need a split builds its cache under an exclusive ``flock`` (the others wait
and then map it); ids are range-checked once, while building. ``stamp.json`` records the size
and modification time of the parquet file(s) it was built from: a re-run of the preprocessing
invalidates it. A directory the process cannot write to gets no cache: the split is decoded into
private memory as before.
"""

import fcntl
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

CACHE_VERSION = 1


Allocate = Callable[[str, Tuple[int, ...], type], np.ndarray]  # (name, shape, dtype) -> array


class SplitColumns:
    """A split's columns: ``labels`` float32 ``[n]``, ``dense`` float32 ``[n, n_dense]``, ``ids``
    ``[n, n_single]`` (int32 or int64, single-hot features in meta order) and, per multi-hot
    feature, ``bags[f] = (offsets int64 [n + 1] from 0, values)``. Arrays are read-only memory
    maps when ``mapped``."""

    def __init__(self, labels: np.ndarray, dense: np.ndarray, ids: np.ndarray,
                 bags: Dict[str, Tuple[np.ndarray, np.ndarray]], mapped: bool = False) -> None:
        self.labels, self.dense, self.ids, self.bags, self.mapped = labels, dense, ids, bags, mapped


def bag_names(index: int) -> Tuple[str, str]:
    """The array names of the ``index``-th multi-hot feature's offsets and values."""
    return f"bag_{index}_offsets", f"bag_{index}_values"


def _parquet_files(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                  if f.endswith(".parquet"))


def source_stamp(parquet_path: str) -> dict:
    """What a cache was built from: every parquet file's name, size and mtime (ns)."""
    return {"version": CACHE_VERSION,
            "files": [[os.path.relpath(f, os.path.dirname(parquet_path)), os.path.getsize(f),
                       os.stat(f).st_mtime_ns] for f in _parquet_files(parquet_path)]}


def _names(num_multi: int) -> List[str]:
    return ["labels", "dense", "ids"] + [n for i in range(num_multi) for n in bag_names(i)]


def _writable_dir(path: str) -> bool:
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    return os.path.isdir(probe) and os.access(probe, os.W_OK)


def _private(name: str, shape: Tuple[int, ...], dtype: type) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


def _load(cache: str, multi: List[str]) -> SplitColumns:
    def m(name: str) -> np.ndarray:
        return np.load(os.path.join(cache, f"{name}.npy"), mmap_mode="r")

    bags = {f: tuple(m(n) for n in bag_names(i)) for i, f in enumerate(multi)}
    return SplitColumns(m("labels"), m("dense"), m("ids"), bags, mapped=True)


def _is_current(cache: str, stamp: dict, names: List[str]) -> bool:
    try:
        with open(os.path.join(cache, "stamp.json")) as f:
            if json.load(f) != stamp:
                return False
    except (OSError, ValueError):
        return False
    return all(os.path.isfile(os.path.join(cache, f"{n}.npy")) for n in names)


def split_columns(data_dir: str, split: str, parquet_path: str,
                  fill: Callable[[Allocate], SplitColumns], multi: List[str],
                  cache_dir: Optional[str] = None, mapped: bool = True) -> SplitColumns:
    """The split's columns, memory-mapped from ``cache_dir`` (default ``<data_dir>/mmap``).

    ``fill(allocate)`` decodes and validates the parquet columns into arrays it gets from
    ``allocate(name, shape, dtype)`` (names: ``labels``, ``dense``, ``ids`` and
    :func:`bag_names` of each multi-hot feature in ``multi``'s order) and returns them; it runs
    only when the cache is missing or stale, writing straight into the cache's files, so the
    builder never holds the split in private memory either. An exception in ``fill`` leaves no
    cache. With ``mapped=False`` or without a writable cache directory, ``fill`` gets private
    arrays and its result is returned as is."""
    root = cache_dir or os.path.join(data_dir, "mmap")
    if not mapped or not _writable_dir(root):
        return fill(_private)
    cache = os.path.join(root, split)
    os.makedirs(cache, exist_ok=True)
    stamp, names = source_stamp(parquet_path), _names(len(multi))
    with open(os.path.join(root, f"{split}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait here, then map
        try:
            if not _is_current(cache, stamp, names):
                _build(cache, stamp, fill)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return _load(cache, multi)


def _build(cache: str, stamp: dict, fill: Callable[[Allocate], SplitColumns]) -> None:
    stamp_path = os.path.join(cache, "stamp.json")
    if os.path.exists(stamp_path):
        os.remove(stamp_path)  # a half-rewritten cache never looks current
    tmps: Dict[str, str] = {}

    def allocate(name: str, shape: Tuple[int, ...], dtype: type) -> np.ndarray:
        tmps[name] = os.path.join(cache, f".{name}.{os.getpid()}.tmp")
        return np.lib.format.open_memmap(tmps[name], mode="w+", dtype=dtype, shape=shape)

    try:
        cols = fill(allocate)
        for arr in [cols.labels, cols.dense, cols.ids] + [a for b in cols.bags.values() for a in b]:
            if isinstance(arr, np.memmap):
                arr.flush()
        del cols
        for name, tmp in tmps.items():
            os.replace(tmp, os.path.join(cache, f"{name}.npy"))
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    tmp = os.path.join(cache, f".stamp.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(stamp, f)
    os.replace(tmp, stamp_path)
