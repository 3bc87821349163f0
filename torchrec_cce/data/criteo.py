"""Criteo readers: the Kaggle TSV format, and TorchRec's preprocessed ``.npy`` layout.

Both yield ``torchrec.datasets.utils.Batch``: dense float32 ``[B, 13]``, a KJT with one int64
id per sample for each of ``cat_0 .. cat_25`` (TorchRec's ``DEFAULT_CAT_NAMES``), float32 labels
``[B]``.
"""

from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchrec.datasets.criteo import (
    CAT_FEATURE_COUNT,
    DEFAULT_CAT_NAMES,
    INT_FEATURE_COUNT,
    InMemoryBinaryCriteoIterDataPipe,
)
from torchrec.datasets.utils import Batch

from torchrec_cce.data.common import (
    BadLines,
    PathOrPaths,
    StreamOrder,
    check_num_embeddings,
    check_rank,
    make_batch,
    rank_lines,
    remap_ids,
)

# Distinct ids per categorical feature in the full Criteo Kaggle train set (45,840,617 rows).
CRITEO_KAGGLE_CARDINALITIES: List[int] = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]

# The id of an empty categorical field: one past the largest 8-hex-digit value, so it never
# collides with a real id. Without ``num_embeddings_per_feature`` raw ids lie in [0, 2**32].
MISSING_ID = 1 << 32
_NUM_COLUMNS = 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT
_DENSE_LIMIT = 1 << 62  # dense ints must fit int64


def _parse_line(fields: List[str]):
    """``(label, dense ints, ids)`` of one split line, or the reason string if it is bad."""
    if len(fields) != _NUM_COLUMNS:
        return "wrong_column_count"
    if fields[0] not in ("0", "1"):
        return "bad_label"
    try:
        dense = [int(s) if s else 0 for s in fields[1 : 1 + INT_FEATURE_COUNT]]
    except ValueError:
        return "non_integer_dense"
    if max(dense) > _DENSE_LIMIT or min(dense) < -_DENSE_LIMIT:
        return "dense_out_of_range"
    try:
        ids = [int(s, 16) if s else MISSING_ID for s in fields[1 + INT_FEATURE_COUNT :]]
    except ValueError:
        return "non_hex_categorical"
    if min(ids) < 0 or max(ids) > MISSING_ID:  # e.g. "-1f" or a 9+ digit value
        return "non_hex_categorical"
    return int(fields[0]), dense, ids


def log_transform(dense: torch.Tensor) -> torch.Tensor:
    """Criteo's dense transform ``log(1 + max(x, 0))`` as float32."""
    return torch.log1p(dense.to(torch.float64).clamp_min(0)).to(torch.float32)


class CriteoTsvDataset(StreamOrder, IterableDataset):
    """Streams Criteo Kaggle ``train.txt``-format TSV files as ``Batch`` es.

    Columns: label, 13 integers (empty -> 0, then ``log(1 + max(x, 0))``), 26 categoricals as
    8-hex-digit strings (``int(s, 16)``; empty -> :data:`MISSING_ID` = 2**32). Row ``i`` goes to
    rank ``i % world_size``. Bad lines (wrong column count, label not 0/1, non-integer or huge
    dense, non-hex categorical) are skipped and counted per reason in :attr:`bad_lines`; a
    ``ValueError`` naming the file and line is raised when their fraction exceeds
    ``max_bad_fraction`` (checked continuously after ``min_lines_for_check`` lines, and at the
    end). Counts cover this rank's rows of the most recent pass.

    Order: file order by default. ``shuffle_buffer=N`` passes this rank's rows through a
    bounded shuffle buffer of ``N`` rows (:func:`~torchrec_cce.data.common.shuffle_rows`) seeded
    by ``(seed, epoch, rank)``; :meth:`set_epoch` selects the epoch. ``blocks`` keeps only the
    rows of the blocks ``i`` (``row // batch_size`` of the unshuffled stream, i.e. its batch
    ``i``) with ``blocks(i)`` true, selected before shuffling (a held-out split).

    Attributes:
        cardinalities: distinct ids per feature of the full Kaggle set (the data's own).
        num_embeddings_per_feature: the range ids fall in, ``[0, n)`` (2**32 + 1 unless given).
    """

    def __init__(
        self,
        paths: PathOrPaths,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_embeddings_per_feature: Optional[List[int]] = None,
        drop_last: bool = False,
        max_bad_fraction: float = 0.01,
        min_lines_for_check: int = 10_000,
        shuffle_buffer: int = 0,
        seed: int = 0,
        blocks: Optional[Callable[[int], bool]] = None,
    ) -> None:
        check_rank(rank, world_size)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._init_order(shuffle_buffer, seed, blocks)
        self.paths = paths
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.max_bad_fraction = max_bad_fraction
        self.min_lines_for_check = min_lines_for_check
        self.keys: List[str] = list(DEFAULT_CAT_NAMES)
        self._sizes = check_num_embeddings(num_embeddings_per_feature, CAT_FEATURE_COUNT)
        raw_range = [MISSING_ID + 1] * CAT_FEATURE_COUNT
        self.num_embeddings_per_feature: List[int] = self._sizes or raw_range
        self.cardinalities: List[int] = list(CRITEO_KAGGLE_CARDINALITIES)
        self._bad = BadLines(max_bad_fraction, min_lines_for_check)

    @property
    def bad_lines(self) -> Dict[str, int]:
        """Bad lines per reason seen by this rank in the latest pass."""
        return self._bad.as_dict()

    @property
    def lines_read(self) -> int:
        return self._bad.lines

    def summary(self) -> str:
        return self._bad.summary()

    def _to_batch(self, labels: List[int], dense: List[List[int]], ids: List[List[int]]) -> Batch:
        ids_t = remap_ids(torch.from_numpy(np.array(ids, dtype=np.int64)), self._sizes)
        dense_t = log_transform(torch.from_numpy(np.array(dense, dtype=np.int64)))
        return make_batch(dense_t, ids_t, torch.tensor(labels), self.keys)

    def _rows(self) -> Iterator[tuple]:
        """This rank's good rows ``(label, dense, ids)`` in file order (bad lines counted)."""
        self._bad = BadLines(self.max_bad_fraction, self.min_lines_for_check)
        for path, line_number, line in rank_lines(self.paths, self.rank, self.world_size):
            parsed = _parse_line(line.split("\t"))
            if isinstance(parsed, str):
                self._bad.bad(path, line_number, parsed)
                continue
            self._bad.good()
            yield parsed
        self._bad.finish()

    def __iter__(self) -> Iterator[Batch]:
        for rows in self.ordered_batches(self._rows()):
            labels, dense, ids = zip(*rows)
            yield self._to_batch(list(labels), list(dense), list(ids))


class _BinaryPipe(InMemoryBinaryCriteoIterDataPipe):
    """TorchRec's npy pipe with its arrays cast to the project's dtypes before batching."""

    def _np_arrays_to_batch(self, dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> Batch:
        # np.array copies, so memory-mapped (read-only) slices become writable tensors.
        return super()._np_arrays_to_batch(
            np.array(dense, dtype=np.float32),
            np.array(sparse, dtype=np.int64),
            np.array(labels, dtype=np.float32),
        )


class CriteoNpyDataset(IterableDataset):
    """TorchRec's preprocessed Criteo layout (``*_dense.npy`` float32 ``[N, 13]``, already
    log-transformed; ``*_sparse.npy`` int ``[N, 26]``; ``*_labels.npy`` int ``[N, 1]``), read
    through ``torchrec.datasets.criteo.InMemoryBinaryCriteoIterDataPipe``.

    The rank split is TorchRec's: batches are dealt round-robin (batch ``j`` to rank
    ``j % world_size``) and the final partial rows are shared out so every row is read once.
    ``mmap_mode=True`` (the default here) memory-maps the files instead of loading them;
    ``stage="val"``/``"test"`` read the first/second half of the first file. Ids are taken modulo
    ``num_embeddings_per_feature`` (TorchRec's ``hashes``) when given.
    """

    def __init__(
        self,
        dense_paths: Sequence[str],
        sparse_paths: Sequence[str],
        labels_paths: Sequence[str],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_embeddings_per_feature: Optional[List[int]] = None,
        stage: str = "train",
        drop_last: bool = False,
        mmap_mode: bool = True,
        shuffle_batches: bool = False,
    ) -> None:
        check_rank(rank, world_size)
        self.num_embeddings_per_feature = check_num_embeddings(
            num_embeddings_per_feature, CAT_FEATURE_COUNT
        )
        self.keys: List[str] = list(DEFAULT_CAT_NAMES)
        self._pipe = _BinaryPipe(
            stage=stage,
            dense_paths=list(dense_paths),
            sparse_paths=list(sparse_paths),
            labels_paths=list(labels_paths),
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            shuffle_batches=shuffle_batches,
            mmap_mode=mmap_mode,
            hashes=self.num_embeddings_per_feature,
        )

    def __len__(self) -> int:
        return len(self._pipe)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._pipe)
