"""Helpers shared by the readers: batch building, id remapping, rank split, bad-line accounting,
block selection and the bounded shuffle buffer of the streaming readers."""

import gzip
import logging
from collections import Counter
from typing import (Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar,
                    Union)

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_cce.hashing import derive_seed

logger = logging.getLogger(__name__)

PathOrPaths = Union[str, Sequence[str]]
T = TypeVar("T")

# Default rows held by a streaming reader's shuffle buffer: a parsed Criteo row is ~1.3 KB of
# Python objects, so 100k rows are ~130 MB per rank.
DEFAULT_SHUFFLE_BUFFER = 100_000
_DRAWS = 4096  # random indices drawn per numpy call


def shuffle_rows(rows: Iterable[T], buffer_size: int, seed: int) -> Iterator[T]:
    """Bounded shuffle of a stream (the streaming analogue of a per-epoch permutation).

    The first ``buffer_size`` rows fill a buffer; then every incoming row replaces a uniformly
    drawn buffered row, which is emitted; at the end of the stream the remaining buffer is
    emitted in a random permutation. Every row is emitted exactly once, a row moves at most
    ``buffer_size`` places earlier, and the order is a pure function of ``(rows, buffer_size,
    seed)`` (numpy's PCG64 seeded with ``seed``). ``buffer_size <= 1`` keeps the order.
    """
    if buffer_size < 0:
        raise ValueError(f"shuffle buffer size must be >= 0 rows, got {buffer_size} (0 = off)")
    if buffer_size <= 1:
        yield from rows
        return
    rng = np.random.default_rng(seed)
    buffer: List[T] = []
    draws: List[int] = []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        if not draws:
            draws = rng.integers(0, buffer_size, _DRAWS).tolist()[::-1]
        j = draws.pop()
        yield buffer[j]
        buffer[j] = row
    for j in rng.permutation(len(buffer)).tolist():
        yield buffer[j]


def select_blocks(rows: Iterable[T], block_size: int,
                  keep: Optional[Callable[[int], bool]]) -> Iterator[T]:
    """The rows whose block ``row_index // block_size`` satisfies ``keep`` (all when None).

    With ``block_size`` = the batch size, block ``i`` is exactly the unshuffled stream's batch
    ``i``, so a split by batch index is made *before* shuffling and stays the same every epoch.
    """
    if keep is None:
        yield from rows
        return
    for i, row in enumerate(rows):
        if keep(i // block_size):
            yield row


def batched(rows: Iterable[T], batch_size: int, drop_last: bool) -> Iterator[List[T]]:
    """Consecutive lists of ``batch_size`` rows (the last one shorter unless ``drop_last``)."""
    chunk: List[T] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk and not drop_last:
        yield chunk


def check_rank(rank: int, world_size: int) -> None:
    """Fail loudly on an impossible (rank, world_size)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def check_num_embeddings(
    num_embeddings_per_feature: Optional[Sequence[int]], num_features: int
) -> Optional[List[int]]:
    """Validate ``num_embeddings_per_feature`` (None, or one positive int per feature)."""
    if num_embeddings_per_feature is None:
        return None
    sizes = [int(n) for n in num_embeddings_per_feature]
    if len(sizes) != num_features:
        raise ValueError(
            f"num_embeddings_per_feature has {len(sizes)} entries, the data has {num_features} "
            "categorical features: pass one table size per feature"
        )
    if any(n <= 0 for n in sizes):
        raise ValueError(f"num_embeddings_per_feature must be positive, got {sizes}")
    return sizes


def remap_ids(ids: torch.Tensor, num_embeddings_per_feature: Optional[List[int]]) -> torch.Tensor:
    """Ids ``[B, F]`` modulo the per-feature table sizes (non-negative for any int64 id)."""
    if num_embeddings_per_feature is None:
        return ids
    sizes = torch.tensor(num_embeddings_per_feature, dtype=torch.int64, device=ids.device)
    return torch.remainder(ids, sizes)


def make_batch(
    dense: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor, keys: List[str]
) -> Batch:
    """A ``Batch`` from dense ``[B, n_dense]``, ids ``[B, F]`` (one id per sample and feature)
    and labels ``[B]``. The KJT is feature-major, as TorchRec expects."""
    batch_size, num_features = ids.shape
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=ids.to(torch.int64).t().reshape(-1),
        lengths=torch.ones(batch_size * num_features, dtype=torch.int32),
        stride=batch_size,
    )
    return Batch(
        dense_features=dense.to(torch.float32),
        sparse_features=kjt,
        labels=labels.to(torch.float32).reshape(-1),
    )


def open_text(path: str):
    """Open a text file for streaming; ``.gz`` files are decompressed on the fly."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", newline="")
    return open(path, "r", newline="")


def rank_lines(
    paths: PathOrPaths, rank: int, world_size: int, skip_header: bool = False
) -> Iterator[Tuple[str, int, str]]:
    """Yield ``(path, line_number, line)`` for the rows this rank owns.

    Data row ``i`` (counted over all files, blank lines and headers excluded) belongs to rank
    ``i % world_size``, so ranks never overlap and together cover every row. Line numbers are
    1-based within their file. Lines are read lazily: nothing beyond one line is held here.
    """
    check_rank(rank, world_size)
    row = 0
    for path in [paths] if isinstance(paths, str) else list(paths):
        with open_text(path) as f:
            for line_number, line in enumerate(f, start=1):
                if skip_header and line_number == 1:
                    continue
                line = line.rstrip("\r\n")
                if not line:
                    continue
                if row % world_size == rank:
                    yield path, line_number, line
                row += 1


class BadLines:
    """Counts malformed lines per reason and raises once they are too many.

    The fraction ``bad / lines`` is checked after every bad line once at least
    ``min_lines_for_check`` lines were seen (so a few early bad lines do not abort a big file),
    and always at the end of the data (:meth:`finish`).
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_lines_for_check: int = 10_000):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.min_lines_for_check = min_lines_for_check
        self.counts: Counter = Counter()
        self.lines = 0
        self.last_bad: Optional[Tuple[str, int, str]] = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> Dict[str, int]:
        return dict(self.counts)

    def good(self) -> None:
        self.lines += 1

    def bad(self, path: str, line_number: int, reason: str) -> None:
        self.lines += 1
        self.counts[reason] += 1
        self.last_bad = (path, line_number, reason)
        if self.lines >= self.min_lines_for_check:
            self._check()

    def finish(self) -> None:
        """End of data: check the threshold and log a summary if any line was bad."""
        if self.total:
            logger.warning(self.summary())
        self._check()

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"
        return f"skipped {self.total} bad lines of {self.lines} read ({reasons})"

    def _check(self) -> None:
        if self.total > self.max_bad_fraction * self.lines:
            path, line_number, reason = self.last_bad
            raise ValueError(
                f"{path}:{line_number}: {reason}; too many bad lines: {self.summary()}, "
                f"more than max_bad_fraction={self.max_bad_fraction}. Check the file format "
                "or raise max_bad_fraction."
            )


class StreamOrder:
    """Row order of a streaming reader: optional block selection, then the bounded shuffle.

    Readers set ``batch_size``, ``rank``, ``drop_last``, ``shuffle_buffer``, ``seed`` and
    ``blocks`` and call :meth:`ordered_batches` on their parsed-row generator. The shuffle seed
    is derived from ``(seed, epoch, rank)``: call :meth:`set_epoch` before each epoch for a new
    order; the same epoch always gives the same order (what an exact resume needs).
    """

    batch_size: int
    rank: int
    drop_last: bool
    shuffle_buffer: int = 0
    seed: int = 0
    epoch: int = 0
    blocks: Optional[Callable[[int], bool]] = None

    def _init_order(self, shuffle_buffer: int, seed: int,
                    blocks: Optional[Callable[[int], bool]]) -> None:
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 rows (0 = file order), got "
                             f"{shuffle_buffer}")
        self.shuffle_buffer, self.seed, self.blocks, self.epoch = shuffle_buffer, seed, blocks, 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s shuffle order for the next pass."""
        self.epoch = int(epoch)

    def shuffle_seed(self) -> int:
        return derive_seed(self.seed, "raw_stream_shuffle", self.epoch, f"rank{self.rank}")

    def ordered_batches(self, rows: Iterable[T]) -> Iterator[List[T]]:
        """This pass's batches of parsed rows: selected blocks, shuffled, batched."""
        rows = select_blocks(rows, self.batch_size, self.blocks)
        rows = shuffle_rows(rows, self.shuffle_buffer, self.shuffle_seed())
        return batched(rows, self.batch_size, self.drop_last)
