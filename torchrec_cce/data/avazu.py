"""Avazu CTR reader (``train.csv`` format: ``id,click,hour,C1,banner_pos,site_id,...,C21``).

Every column except ``id`` and ``click`` is categorical. ``hour`` (``YYMMDDHH``) becomes two
features, ``hour_of_day`` (0-23) and ``weekday`` (0 = Monday .. 6), whose ids are those numbers.
Every other value is read as a string and mapped to an int64 id in ``[0, 2**63)`` by the
project's stable hash (:func:`torchrec_cce.hashing.derive_seed`, a keyed blake2b of the feature
name and the string), so ids agree across processes and machines; Python's salted ``hash()``
is never used. Pass ``num_embeddings_per_feature`` to fold ids into table-sized ranges.

Avazu has no dense features: ``dense_features`` has shape ``[B, 0]``, or ``[B, 1]`` of ones
with ``constant_dense=True`` for models that need at least one dense input.
"""

import datetime
import functools
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch

from torchrec_cce.data.common import (
    BadLines,
    PathOrPaths,
    StreamOrder,
    check_num_embeddings,
    check_rank,
    make_batch,
    open_text,
    rank_lines,
    remap_ids,
)
from torchrec_cce.hashing import derive_seed

# Columns of Avazu's train.csv; all but id and click are features, hour is split in two.
AVAZU_COLUMNS: List[str] = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,"
    "app_category,device_id,device_ip,device_model,device_type,device_conn_type,"
    "C14,C15,C16,C17,C18,C19,C20,C21"
).split(",")
AVAZU_FEATURES: List[str] = ["hour_of_day", "weekday"] + AVAZU_COLUMNS[3:]
HASH_RANGE = 1 << 63


@functools.lru_cache(maxsize=1 << 18)
def string_id(feature: str, value: str) -> int:
    """The stable id of a string value of a feature, in ``[0, 2**63)``."""
    return derive_seed(0, f"avazu/{feature}", 0, value)


@functools.lru_cache(maxsize=1 << 12)
def split_hour(hour: str) -> tuple:
    """``YYMMDDHH`` -> ``(hour_of_day, weekday)`` with Monday = 0; ``ValueError`` if malformed."""
    if len(hour) != 8 or not hour.isdigit():
        raise ValueError(f"hour {hour!r} is not YYMMDDHH")
    yy, mm, dd, hh = (int(hour[i : i + 2]) for i in range(0, 8, 2))
    if hh > 23:
        raise ValueError(f"hour {hour!r} has hour-of-day {hh}")
    return hh, datetime.date(2000 + yy, mm, dd).weekday()


class AvazuCsvDataset(StreamOrder, IterableDataset):
    """Streams Avazu CSV files as ``Batch`` es with keys ``cat_0 .. cat_22``.

    ``cat_i`` is the feature ``AVAZU_FEATURES[i]`` (``feature_names``). Row ``i`` (over all
    files, headers excluded) goes to rank ``i % world_size``. Bad lines (wrong column count,
    click not 0/1, malformed hour) are skipped and counted in :attr:`bad_lines`; too many
    (fraction above ``max_bad_fraction``) raise a ``ValueError`` naming file and line.

    Order: file order by default; ``shuffle_buffer``, ``seed``, :meth:`set_epoch` and
    ``blocks`` work as in :class:`~torchrec_cce.data.criteo.CriteoTsvDataset`.

    Attributes:
        cardinalities: known distinct values per feature (24 and 7 for the hour split, None
            for hashed strings).
        num_embeddings_per_feature: the range ids fall in, ``[0, n)``.
    """

    def __init__(
        self,
        paths: PathOrPaths,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_embeddings_per_feature: Optional[List[int]] = None,
        drop_last: bool = False,
        constant_dense: bool = False,
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
        self.paths: List[str] = [paths] if isinstance(paths, str) else list(paths)
        for path in self.paths:
            self._check_header(path)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.constant_dense = constant_dense
        self.max_bad_fraction = max_bad_fraction
        self.min_lines_for_check = min_lines_for_check
        self.feature_names: List[str] = list(AVAZU_FEATURES)
        self.keys: List[str] = [f"cat_{i}" for i in range(len(AVAZU_FEATURES))]
        self._sizes = check_num_embeddings(num_embeddings_per_feature, len(self.keys))
        hashed = len(self.keys) - 2
        self.num_embeddings_per_feature: List[int] = self._sizes or [24, 7] + [HASH_RANGE] * hashed
        self.cardinalities: List[Optional[int]] = [24, 7] + [None] * hashed
        self._bad = BadLines(max_bad_fraction, min_lines_for_check)

    @staticmethod
    def _check_header(path: str) -> None:
        with open_text(path) as f:
            header = f.readline().rstrip("\r\n").split(",")
        if header != AVAZU_COLUMNS:
            raise ValueError(
                f"{path}:1: expected the Avazu header {','.join(AVAZU_COLUMNS)}, got {header}"
            )

    @property
    def bad_lines(self) -> Dict[str, int]:
        """Bad lines per reason seen by this rank in the latest pass."""
        return self._bad.as_dict()

    def summary(self) -> str:
        return self._bad.summary()

    def _to_batch(self, labels: List[int], ids: List[List[int]]) -> Batch:
        ids_t = remap_ids(torch.from_numpy(np.array(ids, dtype=np.int64)), self._sizes)
        dense = torch.ones(len(labels), int(self.constant_dense))
        return make_batch(dense, ids_t, torch.tensor(labels), self.keys)

    def _rows(self) -> Iterator[tuple]:
        """This rank's good rows ``(label, ids)`` in file order (bad lines counted)."""
        self._bad = BadLines(self.max_bad_fraction, self.min_lines_for_check)
        names = AVAZU_COLUMNS[3:]
        lines = rank_lines(self.paths, self.rank, self.world_size, skip_header=True)
        for path, line_number, line in lines:
            fields = line.split(",")
            if len(fields) != len(AVAZU_COLUMNS):
                self._bad.bad(path, line_number, "wrong_column_count")
                continue
            if fields[1] not in ("0", "1"):
                self._bad.bad(path, line_number, "bad_label")
                continue
            try:
                hour_of_day, weekday = split_hour(fields[2])
            except ValueError:
                self._bad.bad(path, line_number, "bad_hour")
                continue
            self._bad.good()
            yield int(fields[1]), [hour_of_day, weekday] + [string_id(n, v) for n, v in
                                                            zip(names, fields[3:])]
        self._bad.finish()

    def __iter__(self) -> Iterator[Batch]:
        for rows in self.ordered_batches(self._rows()):
            labels, ids = zip(*rows)
            yield self._to_batch(list(labels), list(ids))
