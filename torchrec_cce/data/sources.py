"""Data sources of the DLRM example, chosen by its flags: the splits of one rank as a
:class:`Data` (train batches per epoch, val, test, per-id counts, notes), and one TorchRec table
config per feature (:func:`table_configs`).

``load_data(args, rank, world)`` reads these attributes of ``args`` (the flags of
``examples/dlrm/train.py``): ``data``, ``data_dir``, ``train_path``, ``val_path``,
``test_path``, ``test_fraction``, ``shuffle_buffer``, ``num_embeddings_per_feature``,
``max_ids_per_feature``, ``synthetic_scale``, ``synthetic_{train,val,test}_batches``,
``batch_size`` and ``seed``.
"""

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_cce.data.avazu import AvazuCsvDataset
from torchrec_cce.data.criteo import CriteoNpyDataset, CriteoTsvDataset
from torchrec_cce.data.preprocessed import PreprocessedDataset, load_meta
from torchrec_cce.data.synthetic import CriteoSyntheticDataset
from torchrec_cce.hashing import derive_seed

DATA_CHOICES = ["synthetic", "preprocessed", "criteo_tsv", "avazu_csv", "criteo_npy"]


@dataclass
class Data:
    """This rank's splits and what the model needs to know about the features.

    ``train(epoch)`` yields the epoch's training batches (in that epoch's shuffled order where
    the source supports it); ``val()``/``test()`` the evaluation batches. ``counts(feature)`` is
    the per-id training frequency (int64 ``[V]``) when the data has it, else None.
    """

    feature_names: List[str]
    sizes: List[int]
    dense_in: int
    train: Callable[[int], Iterable[Batch]]
    val: Callable[[], Iterable[Batch]]
    test: Callable[[], Iterable[Batch]]
    steps_per_epoch: Optional[int] = None
    bayes_logloss: Optional[float] = None
    counts: Callable[[str], Optional[np.ndarray]] = lambda feature: None
    collisions: Optional["ModuloIds"] = None
    notes: List[str] = field(default_factory=list)


def load_data(args: Any, rank: int, world: int) -> Data:
    """This rank's splits of ``--data`` (see the module docstring for the flags read), with
    evaluation cut to the first ``--limit-val-batches`` / ``--limit-test-batches`` batches per
    rank when given (TorchRec's ``dlrm_main`` flags of the same names)."""
    builders = {"synthetic": synthetic_data, "preprocessed": preprocessed_data,
                "criteo_tsv": raw_file_data, "avazu_csv": raw_file_data, "criteo_npy": npy_data}
    data = builders[args.data](args, rank, world)
    return limit_eval_batches(data, getattr(args, "limit_val_batches", None),
                              getattr(args, "limit_test_batches", None))


def limit_eval_batches(data: Data, val: Optional[int], test: Optional[int]) -> Data:
    """``data`` whose ``val()`` / ``test()`` stop after ``val`` / ``test`` batches (None: all).
    Every rank yields the same number of evaluation batches, so the cut keeps them in step."""
    for name, limit in (("val", val), ("test", test)):
        if limit is not None and limit < 1:
            raise ValueError(f"--limit-{name}-batches must be >= 1, got {limit}")

    def cut(batches: Callable[[], Iterable[Batch]], limit: Optional[int]
            ) -> Callable[[], Iterable[Batch]]:
        return batches if limit is None else (lambda: itertools.islice(batches(), limit))

    return dataclasses.replace(data, val=cut(data.val, val), test=cut(data.test, test))


def synthetic_data(args: Any, rank: int, world: int) -> Data:
    """The Criteo-shaped generator; the training order of its (fixed) batches is a permutation
    drawn per epoch from ``(seed, epoch)``, the same on every rank."""
    sizes = _sizes_flag(args)
    kw = dict(batch_size=args.batch_size, rank=rank, world_size=world, seed=args.seed,
              scale=args.synthetic_scale, num_embeddings_per_feature=sizes)
    n_train = args.synthetic_train_batches or 64 * world
    n_test = args.synthetic_test_batches or 8 * world
    n_val = args.synthetic_val_batches or n_test
    train = CriteoSyntheticDataset("train", num_batches=n_train, **kw)
    val = CriteoSyntheticDataset("val", num_batches=n_val, **kw)
    test = CriteoSyntheticDataset("test", num_batches=n_test, **kw)

    def train_batches(epoch: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(derive_seed(args.seed, "train/order", epoch))
        order = torch.randperm(n_train, generator=g).tolist()
        return (train.batch(i) for i in order[rank::world])

    return Data(feature_names=list(train.keys), sizes=train.num_embeddings_per_feature,
                dense_in=13, train=train_batches, val=lambda: iter(val), test=lambda: iter(test),
                steps_per_epoch=len(train), bayes_logloss=test.bayes_logloss())


def preprocessed_data(args: Any, rank: int, world: int) -> Data:
    """A ``torchrec_cce.data.preprocess`` directory: one table per feature of exactly the
    vocabulary size (ids are already contiguous, nothing is taken modulo anything)."""
    meta = load_meta(args.data_dir)
    kw = dict(batch_size=args.batch_size, rank=rank, world_size=world)
    splits = {}
    for split in ("train", "val", "test"):
        rows = int(meta["splits"].get(split, {}).get("rows", 0))
        if rows == 0:
            raise ValueError(f"{args.data_dir}: the {split} split is empty; re-run "
                             "`python -m torchrec_cce.data.preprocess` with --split (or "
                             "--split-by-order / --test-input) giving it rows")
        splits[split] = PreprocessedDataset(args.data_dir, split=split, shuffle=split == "train",
                                            seed=args.seed, **kw)
    train = splits["train"]
    fix = (lambda b: b) if train.dense_names else constant_dense

    def train_batches(epoch: int) -> Iterator[Batch]:
        train.set_epoch(epoch)
        return map(fix, train)

    notes = [] if train.dense_names else [
        "no dense features: DLRM gets one constant-1 dense column (its dense MLP learns a bias)"]
    return Data(feature_names=list(train.feature_names), sizes=[int(v) for v in train.vocab_sizes],
                dense_in=max(1, len(train.dense_names)), train=train_batches,
                val=lambda: map(fix, splits["val"]), test=lambda: map(fix, splits["test"]),
                steps_per_epoch=len(train), counts=train.counts, notes=notes)


def constant_dense(batch: Batch) -> Batch:
    """The batch with a constant-1 dense column in place of its (empty) dense features.

    TorchRec's DLRM needs ``dense_in_features >= 1``; a constant input makes the dense arch's
    output a learned vector, exactly what a dense-free model has (DLRM's bias terms)."""
    ones = torch.ones(batch.labels.shape[0], 1, dtype=torch.float32)
    return Batch(dense_features=ones, sparse_features=batch.sparse_features, labels=batch.labels)


def raw_file_data(args: Any, rank: int, world: int) -> Data:
    """Stream raw Criteo TSV / Avazu CSV files. Ids are taken modulo the table sizes here
    (:class:`ModuloIds`, which also reports collisions); missing val/test files are replaced by
    batches held out of the training stream."""
    criteo = args.data == "criteo_tsv"
    cls = CriteoTsvDataset if criteo else AvazuCsvDataset
    extra = {} if criteo else {"constant_dense": True}
    bs = args.batch_size

    def reader(path: str, **order: Any) -> Any:
        return cls(path, bs, rank=rank, world_size=world, **extra, **order)  # raw ids, no modulo

    held = []  # residues of the (unshuffled) batch index held out of train: 0 = test, 1 = val
    if not args.test_path:
        held.append(0)
    if not args.val_path:
        held.append(1)
    period = max(len(held) + 1, round(1 / args.test_fraction)) if held else 0
    # Held-out blocks are removed before the shuffle buffer, so they are the same every epoch.
    train = reader(args.train_path, shuffle_buffer=args.shuffle_buffer, seed=args.seed,
                   blocks=(lambda i: i % period not in held) if held else None)
    sizes = _sizes_flag(args) or [min(c or args.max_ids_per_feature, args.max_ids_per_feature)
                                  for c in train.cardinalities]
    names = list(train.keys)
    modulo = ModuloIds(names, sizes)

    def part(path: Optional[str], residue: int) -> Callable[[], Iterator[Batch]]:
        if path:
            return lambda: map(modulo, reader(path))
        return lambda: map(modulo, reader(args.train_path, blocks=lambda i: i % period == residue))

    def train_batches(epoch: int) -> Iterator[Batch]:
        train.set_epoch(epoch)  # the epoch's shuffle order: the same on a resume
        return map(modulo, train)

    steps = _train_batches((_count_lines(args.train_path) - (not criteo)) // world, bs,
                           (lambda i: i % period in held) if held else None)
    order = (f"through a {args.shuffle_buffer:,}-row shuffle buffer" if args.shuffle_buffer > 1
             else "in file order (not shuffled)")
    notes = [f"{'Criteo TSV' if criteo else 'Avazu CSV'} streamed {order}; "
             f"table sizes {'from the flag' if args.num_embeddings_per_feature else 'Criteo Kaggle cardinalities' if criteo else '24/7/--max-ids-per-feature'}"]
    if held:
        parts = {0: "test (batch index % {p} == 0)", 1: "val (== 1)"}
        notes.append(f"held out of --train-path for " + ", ".join(
            parts[r].format(p=period) for r in held) + ": these batches are never trained on")
    return Data(feature_names=names, sizes=sizes, dense_in=13 if criteo else 1,
                train=train_batches, val=part(args.val_path, 1), test=part(args.test_path, 0),
                steps_per_epoch=max(1, steps), collisions=modulo, notes=notes)


def npy_data(args: Any, rank: int, world: int) -> Data:
    """TorchRec's Criteo npy layout: val/test are the first/second half of the test prefixes'
    files (TorchRec's convention; pass --test-path, e.g. day_23, for data disjoint from train)."""
    sizes = _sizes_flag(args) or [args.max_ids_per_feature] * 26
    kw = dict(batch_size=args.batch_size, rank=rank, world_size=world,
              num_embeddings_per_feature=sizes)

    def paths(prefixes: str) -> List[List[str]]:
        return [[f"{x}_{kind}.npy" for x in prefixes.split(",")]
                for kind in ("dense", "sparse", "labels")]

    train = CriteoNpyDataset(*paths(args.train_path), stage="train", **kw)
    test_prefixes = args.test_path or args.train_path
    val = CriteoNpyDataset(*paths(test_prefixes), stage="val", **kw)
    test = CriteoNpyDataset(*paths(test_prefixes), stage="test", **kw)
    return Data(feature_names=list(train.keys), sizes=sizes, dense_in=13,
                train=lambda epoch: iter(train), val=lambda: iter(val), test=lambda: iter(test),
                steps_per_epoch=len(train))


def _sizes_flag(args: Any) -> Optional[List[int]]:
    if not args.num_embeddings_per_feature:
        return None
    return [int(x) for x in args.num_embeddings_per_feature.split(",")]


def _train_batches(rows: int, batch_size: int, held: Optional[Callable[[int], bool]]) -> int:
    """Training batches of a rank with ``rows`` rows (lines are dealt to ranks in turn; the
    smallest rank's count is what every rank trains): the rows of the blocks (unshuffled
    batches) not ``held`` out, batched again, the last batch partial."""
    starts = range(0, rows, batch_size)
    kept = sum(min(batch_size, rows - s) for i, s in enumerate(starts) if not (held and held(i)))
    return max(1, -(-kept // batch_size))


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


class ModuloIds:
    """Takes raw ids modulo the table sizes and detects collisions on the way.

    Per feature, it remembers the first raw id seen at every table row (an int64 array of the
    table's size) while ``tracking``; a row reached by a second, different raw id is a
    collision: two of the data's values share an embedding, even with ``--method full``.
    Tracking covers the first epoch (about one table's worth of int64 per feature, freed at the
    first collision or at :meth:`stop`); it sees this rank's rows only, so it can only miss
    collisions, never invent one.
    """

    def __init__(self, names: Sequence[str], sizes: Sequence[int]) -> None:
        self.names = list(names)
        self.sizes = [int(n) for n in sizes]
        self._sizes = torch.tensor(self.sizes, dtype=torch.int64).view(-1, 1)
        self._first: Dict[int, torch.Tensor] = {
            f: torch.full((n,), -1, dtype=torch.int64) for f, n in enumerate(self.sizes)}
        self.collided = [False] * len(self.sizes)
        self.reported = [False] * len(self.sizes)

    def __call__(self, batch: Batch) -> Batch:
        kjt = batch.sparse_features
        stride = kjt.stride()
        values = kjt.values().view(len(self.sizes), stride)  # one id per sample and feature
        if self._first:
            self._observe(values)
        remapped = torch.remainder(values, self._sizes).reshape(-1)
        kjt = KeyedJaggedTensor(keys=kjt.keys(), values=remapped, lengths=kjt.lengths(),
                                stride=stride)
        return Batch(dense_features=batch.dense_features, sparse_features=kjt,
                     labels=batch.labels)

    def _observe(self, values: torch.Tensor) -> None:
        for f in list(self._first):
            first, raw = self._first[f], values[f]
            rows = torch.remainder(raw, self.sizes[f])
            unseen = first[rows] < 0
            first[rows[unseen]] = raw[unseen]
            if bool((first[rows] != raw).any()):
                self.collided[f] = True
                del self._first[f]

    def stop(self) -> None:
        self._first.clear()

    def report(self) -> Optional[str]:
        """Collective: the newly found colliding features over all ranks, as one line (or None)."""
        flags = torch.tensor([int(c) for c in self.collided])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        new = [f for f, c in enumerate(flags.tolist()) if c and not self.reported[f]]
        for f in new:
            self.reported[f] = self.collided[f] = True
        if not new:
            return None
        shown = ", ".join(f"{self.names[f]} ({self.sizes[f]} rows)" for f in new[:6])
        more = f" and {len(new) - 6} more" if len(new) > 6 else ""
        return (f"warning: ids taken modulo the table size collide in {len(new)} feature(s): "
                f"{shown}{more}; distinct values share rows even with --method full. Preprocess "
                "the files (python -m torchrec_cce.data.preprocess) and use --data preprocessed "
                "for tables of the true vocabulary sizes.")


def table_configs(data: Data, dim: int) -> List[EmbeddingBagConfig]:
    """One table ``t_<feature>`` per feature, ``num_embeddings`` = the data's table size."""
    tables, seen = [], set()
    for feature, n in zip(data.feature_names, data.sizes):
        name = "t_" + re.sub(r"\W", "_", feature)
        if name in seen:
            raise ValueError(f"features {data.feature_names} give the table name {name!r} twice "
                             "(non-alphanumeric characters become '_'): rename a feature")
        seen.add(name)
        tables.append(EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=int(n),
                                         feature_names=[feature]))
    return tables


def table_counts(data: Data, tables: List[EmbeddingBagConfig]) -> Optional[Dict[str, np.ndarray]]:
    """``{table: per-id training frequency}`` when the data has counts, else None."""
    counts = {t.name: data.counts(t.feature_names[0]) for t in tables}
    return None if any(c is None for c in counts.values()) else counts
