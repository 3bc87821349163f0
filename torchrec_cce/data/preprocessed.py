"""Reader of a directory written by ``python -m torchrec_cce.data.preprocess``.

A split's columns are decoded once into ``.npy`` files that every process memory-maps
(:mod:`torchrec_cce.data.column_cache`: the rows sit once in the page cache, shared by the
ranks; ``mmap=False`` or a read-only directory decodes them into private memory instead);
batches are gathered with vector ops (fancy indexing, and ``repeat``/``cumsum`` for multi-hot
bags), never a per-row Python loop.

Batch order over ranks (``B`` = ``batch_size``, ``w`` = ``world_size``, ``N`` = rows):

* ``drop_last=True`` (the default for the train split, with ``shuffle=True``): each epoch the
  rows are permuted by a generator seeded with ``(seed, epoch)``, identical on every rank;
  global batch ``k`` is rows ``[k*B*w, (k+1)*B*w)`` of that order and rank ``r`` takes its
  slice ``[r*B, (r+1)*B)``; the ``N % (B*w)`` tail rows are dropped, so every rank yields
  ``N // (B*w)`` full batches.
* ``drop_last=False`` (the default for val/test, with ``shuffle=False``): every row is yielded
  exactly once over all ranks, and every rank yields ``ceil(N / (B*w))`` batches. All global
  batches but the last are dealt as above; the last one's ``m`` rows are dealt in contiguous
  shares whose sizes differ by at most one (rank ``r`` gets ``floor((r+1)m/w) - floor(rm/w)``
  rows). If ``m < w`` (some share would be empty), the last two global batches are dealt
  together: the last batch of every rank has one row and the one before it the rest, dealt
  the same way. So a rank's last one or two batches may be smaller than ``B``, never empty
  (``N >= w`` is required, and ``B >= 2`` when ``m < w``).
"""

import json
import os
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_cce.data.column_cache import SplitColumns, bag_names, split_columns

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
_REQUIRED = ("format_version", "label", "dense_features", "features", "splits", "min_count")


def load_meta(data_dir: str) -> dict:
    """``meta.json`` of a preprocessed directory, validated (errors name the directory)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{data_dir}: no meta.json; this is not a preprocessed data directory. Create one with "
            "python -m torchrec_cce.data.preprocess --format ... --input ... --out DIR")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); re-run the preprocessing") from None
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; re-run the preprocessing")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta['format_version']}, this reader reads "
                         f"{FORMAT_VERSION}; re-run the preprocessing with this version")
    for feat in meta["features"]:
        if feat.get("kind") not in ("categorical", "multi_hot") or int(feat.get("vocab_size", 0)) < 1:
            raise ValueError(f"{path}: bad feature entry {feat}; re-run the preprocessing")
    for s in SPLITS:
        if s not in meta["splits"]:
            raise ValueError(f"{path}: no split {s!r} in 'splits'; re-run the preprocessing")
    return meta


def _split_file(data_dir: str, split: str) -> str:
    single = os.path.join(data_dir, f"{split}.parquet")
    if os.path.exists(single):  # a file, or a directory of parquet parts
        return single
    raise FileNotFoundError(f"{data_dir}: no {split}.parquet; re-run the preprocessing")


def eval_batch_bounds(num_rows: int, batch_size: int, world_size: int) -> np.ndarray:
    """``[K, w + 1]`` cut points: rank ``r``'s batch ``k`` is rows ``[c[k, r], c[k, r+1])``.

    Every row once, ``K = ceil(N / (B*w))`` batches per rank, no empty batch (module docstring).
    """
    n, b, w = num_rows, batch_size, world_size
    if n < w:
        raise ValueError(f"{n} rows cannot give each of {w} ranks a batch; use fewer ranks")
    g = b * w
    k = -(-n // g)
    m = n - (k - 1) * g
    cuts = np.empty((k, w + 1), dtype=np.int64)
    starts = np.arange(k, dtype=np.int64) * g
    cuts[:, :] = starts[:, None] + np.arange(w + 1, dtype=np.int64)[None, :] * b
    r = np.arange(w + 1, dtype=np.int64)
    if m >= w:
        cuts[-1] = starts[-1] + (r * m) // w
    else:
        if b < 2:
            raise ValueError(f"batch_size=1 with world_size={w} and {n} rows would leave a rank "
                             "an empty last batch; use batch_size >= 2")
        rest = g + m - w  # rows of the second-to-last global batch, dealt evenly
        cuts[-2] = starts[-2] + (r * rest) // w
        cuts[-1] = starts[-2] + rest + r
    return cuts


class PreprocessedDataset(IterableDataset):
    """Batches of one split of a preprocessed directory (``torchrec.datasets.utils.Batch``).

    ``dense_features`` float32 ``[b, n_dense]`` (``n_dense`` may be 0), ``sparse_features`` a
    KJT with keys = feature names in meta order and int64 values (one id per sample for
    categorical features, a bag for multi-hot ones), ``labels`` float32 ``[b]``. See the
    module docstring for the exact rank/batch semantics. ``mmap``: map the split's columns from
    a cache of ``.npy`` files in ``cache_dir`` (default ``<data_dir>/mmap``, built on first use)
    instead of decoding them into this process's memory.
    """

    def __init__(self, data_dir: str, split: str = "train", batch_size: int = 4096, rank: int = 0,
                 world_size: int = 1, shuffle: Optional[bool] = None, seed: int = 0,
                 drop_last: Optional[bool] = None, mmap: bool = True,
                 cache_dir: Optional[str] = None) -> None:
        import pyarrow.parquet as pq

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.data_dir, self.split, self.batch_size = data_dir, split, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.drop_last = self.shuffle if drop_last is None else drop_last
        self.meta = load_meta(data_dir)
        self.feature_names: List[str] = [f["name"] for f in self.meta["features"]]
        self.vocab_sizes: List[int] = [int(f["vocab_size"]) for f in self.meta["features"]]
        self.kinds: List[str] = [f["kind"] for f in self.meta["features"]]
        self.dense_names: List[str] = list(self.meta["dense_features"])
        self.epoch = 0

        path = _split_file(data_dir, split)
        names = pq.read_schema(path).names if os.path.isfile(path) else pq.ParquetDataset(path).schema.names
        for c in ["label"] + self.dense_names + self.feature_names:
            if c not in names:
                raise ValueError(f"{data_dir}: column {c!r} missing from {split}.parquet; re-run the preprocessing")

        def column(name):  # one column at a time: peak memory ~ one column
            return pq.read_table(path, columns=[name]).column(0).combine_chunks()

        # ids are stored as int32 (vocabularies < 2**31) and widened to int64 per batch
        id_dtype = np.int32 if max(self.vocab_sizes, default=1) < (1 << 31) else np.int64
        single = [f for f, k in zip(self.feature_names, self.kinds) if k == "categorical"]
        multi = [f for f, k in zip(self.feature_names, self.kinds) if k == "multi_hot"]
        expected = int(self.meta["splits"][split]["rows"])

        def fill(allocate) -> SplitColumns:
            label = column("label").to_numpy()
            n = len(label)
            if n != expected:
                raise ValueError(f"{data_dir}: {split}.parquet has {n} rows, meta.json says "
                                 f"{expected}; re-run the preprocessing")
            labels = allocate("labels", (n,), np.float32)
            labels[:] = label
            dense = allocate("dense", (n, len(self.dense_names)), np.float32)
            for j, c in enumerate(self.dense_names):
                dense[:, j] = column(c).to_numpy()
            ids = allocate("ids", (n, len(single)), id_dtype)
            for j, c in enumerate(single):
                ids[:, j] = column(c).to_numpy()
                check(c, ids[:, j])
            bags = {}
            for i, f in enumerate(multi):
                col = column(f)
                offs = col.offsets.to_numpy().astype(np.int64)
                vals = col.values.to_numpy()[offs[0]: offs[-1]]
                check(f, vals)
                off_name, val_name = bag_names(i)
                bags[f] = (allocate(off_name, offs.shape, np.int64),
                           allocate(val_name, vals.shape, id_dtype))
                bags[f][0][:] = offs - offs[0]
                bags[f][1][:] = vals
            return SplitColumns(labels, dense, ids, bags)

        def check(feature: str, arr: np.ndarray) -> None:
            v = self.vocab_sizes[self.feature_names.index(feature)]
            if arr.size and (arr.min() < 0 or arr.max() >= v):
                raise ValueError(f"{data_dir}: ids of {feature!r} outside [0, {v}); re-run the "
                                 "preprocessing")

        cols = split_columns(data_dir, split, path, fill, multi, cache_dir, mapped=mmap)
        self.labels, self.dense, self.ids, self.bags = cols.labels, cols.dense, cols.ids, cols.bags
        self.mapped: bool = cols.mapped
        n = self.num_rows = len(self.labels)
        self._single_col = {f: j for j, f in enumerate(single)}
        if self.drop_last:
            self._num_batches = n // (batch_size * world_size)
            if self._num_batches == 0:
                raise ValueError(
                    f"{data_dir}: split {split!r} has {n} rows, fewer than batch_size * world_size = "
                    f"{batch_size * world_size}; use a smaller batch size")
            self._cuts = None
        else:
            if n == 0:
                raise ValueError(f"{data_dir}: split {split!r} is empty (0 rows); preprocess with a "
                                 "non-zero fraction for it")
            self._cuts = eval_batch_bounds(n, batch_size, world_size)
            self._num_batches = len(self._cuts)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation (seeded by ``(seed, epoch)``; same on every rank)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._num_batches

    def counts(self, feature: str) -> np.ndarray:
        """int64 ``[V]`` training occurrences of every id of ``feature``."""
        if feature not in self.feature_names:
            raise KeyError(f"unknown feature {feature!r}; features are {self.feature_names}")
        return np.load(os.path.join(self.data_dir, "counts", f"{feature}.npy"))

    def order(self) -> np.ndarray:
        """The epoch's row order (a permutation when shuffling, else ``arange``)."""
        if not self.shuffle:
            return np.arange(self.num_rows, dtype=np.int64)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)

    def batch_rows(self) -> Iterator[np.ndarray]:
        """The row indices of this rank's batches, in order."""
        order = self.order()
        if self._cuts is None:
            g, b, r = self.batch_size * self.world_size, self.batch_size, self.rank
            for k in range(self._num_batches):
                yield order[k * g + r * b: k * g + (r + 1) * b]
        else:
            for cut in self._cuts:
                yield order[cut[self.rank]: cut[self.rank + 1]]

    def make_batch(self, rows: np.ndarray) -> Batch:
        """The ``Batch`` of the given row indices (vectorised gather)."""
        b = len(rows)
        ids = self.ids[rows].T.astype(np.int64)  # [n_single, b], feature-major
        if not self.bags:  # all single-hot: the KJT values are the transposed id matrix
            kjt = KeyedJaggedTensor(keys=self.feature_names, values=torch.from_numpy(ids.reshape(-1)),
                                    lengths=torch.from_numpy(np.ones(b * len(self.feature_names), np.int32)),
                                    stride=b)
            return Batch(dense_features=torch.from_numpy(self.dense[rows]), sparse_features=kjt,
                         labels=torch.from_numpy(self.labels[rows]))
        values, lengths = [], []
        for f in self.feature_names:
            j = self._single_col.get(f)
            if j is not None:
                values.append(ids[j])
                lengths.append(np.ones(b, dtype=np.int32))
            else:
                offs, vals = self.bags[f]
                starts, lens = offs[rows], offs[rows + 1] - offs[rows]
                total = int(lens.sum())
                ends = np.cumsum(lens)
                pos = np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lens), lens)
                values.append(vals[pos].astype(np.int64))
                lengths.append(lens.astype(np.int32))
        kjt = KeyedJaggedTensor(
            keys=self.feature_names,
            values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, np.int32)),
            stride=b,
        )
        return Batch(dense_features=torch.from_numpy(self.dense[rows]), sparse_features=kjt,
                     labels=torch.from_numpy(self.labels[rows]))

    def __iter__(self) -> Iterator[Batch]:
        for rows in self.batch_rows():
            yield self.make_batch(rows)
