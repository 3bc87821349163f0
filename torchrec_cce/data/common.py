"""Helpers shared by the readers: batch building, id remapping, rank split, bad-line accounting."""

import gzip
import logging
from collections import Counter
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

logger = logging.getLogger(__name__)

PathOrPaths = Union[str, Sequence[str]]


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
