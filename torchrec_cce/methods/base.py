"""The interface every compression method implements for one logical table.

A method is a small ``nn.Module`` with two pure stages around a stock TorchRec EBC:

* ``remap(ids)``: the logical table's ids -> one tensor of codebook row ids per *stream*
  (a stream is one pooled lookup into one codebook table, e.g. CCE's chunk 2). A stream tensor
  is ``[n]`` (one row per id) or ``[n, k]`` (``k`` rows per id, all pooled into the same bag:
  CCE's ``(A_i, B_i)`` pair, so the codebook EBC's SUM pooling does ``A_i + B_i``);
* ``compose(pooled)``: the pooled stream outputs (SUM-pooled, in stream order) -> the logical
  table's pooled ``[batch, dim]`` vectors.

Codebooks are declared as :class:`Codebook` (name suffix, rows, columns, stream names) and
become ordinary 2-D tables of the inner ``EmbeddingBagCollection``; their names are
``<table>__<suffix>`` and their features ``<feature>__<stream>`` (an empty suffix/stream keeps
the logical name: full tables pass through unchanged).

``stream_specs()`` describes the same remap for the fused C++ op (``torchrec_cce.ops``): one
:class:`StreamSpec` per stream; the torch-ops ``remap`` stays the reference.

State with one entry per id (CCE's packed assignment ``p``, MEmCom's per-id weights, MPE's
master rows) is declared once, by ``per_id_state()`` (:class:`PerIdState`): the sharder splits
it by id range from that declaration and saves it as ShardedTensors, the planner's storage
reservation and the byte counts read their bytes from it. A method built with
``id_range=(lo, hi)`` stores only the entries of ids ``[lo, hi)``.
"""

import abc
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import nn
from torchrec import EmbeddingBagConfig


@dataclass(frozen=True)
class Codebook:
    """One codebook table of a compressed table, looked up by ``len(streams)`` id streams."""

    suffix: str
    num_embeddings: int
    embedding_dim: int
    streams: List[str]


@dataclass(frozen=True)
class StreamSpec:
    """One stream of the fused remap op (see ``torchrec_cce/ops/csrc/remap.h``).

    ``kind``: ``"identity"`` (``x``, range-checked against ``rows``), ``"hash"``
    (``h_key(x) mod rows``), ``"cce_pair"`` (two rows per id: ``p_column(x)`` and
    ``rows + h(x)``; ``key`` is p's fallback hash, ``h_key`` h's base key combined with the
    table's hash generation), ``"qr_quotient"`` / ``"qr_remainder"`` (``(x mod num_ids)`` divided
    by / modulo ``rows``). ``offset`` is added to every row id. ``qr_mul``/``qr_add`` (CCE with
    ``init="qr"``; 0 = hashed init): ``p``'s fallback and the initial ``h`` are the quotient and
    remainder of ``x' = (qr_mul (x mod num_ids) + qr_add) mod num_ids``; ``keep_remainder``
    keeps that ``h`` after re-clustering.
    """

    kind: str
    rows: int
    offset: int = 0
    key: int = 0
    h_key: int = 0
    column: int = 0
    num_ids: int = 1
    qr_mul: int = 0
    qr_add: int = 0
    keep_remainder: bool = False
    extra: dict = field(default_factory=dict, compare=False)


def _one_entry_per_id(num_ids: int) -> int:
    return num_ids


@dataclass(frozen=True)
class PerIdState:
    """One tensor of a table holding the state of every id, split by id range when sharded.

    ``name``: the table module's attribute and state-dict key (``"assignment"``, ``"id_weight"``,
    ``"weight"``). It covers ids ``[0, num_ids)``; the first ``n`` ids take ``entries(n)``
    entries along dim 0 (one row per id, or whole packed words), each ``entry_bytes`` bytes.
    Id ranges start at multiples of ``align`` ids. ``trainable``: a parameter read where the
    lookup is computed, with gradients and an in-backward optimizer (MEmCom's weights, MPE's
    masters), always split by id range under the sharder; else a buffer read where ids are
    remapped (CCE's ``p``), kept whole on every rank when small.
    """

    name: str
    num_ids: int
    entry_bytes: int
    entries: Callable[[int], int] = _one_entry_per_id
    align: int = 1
    trainable: bool = True

    def bytes_of(self, num_ids: int) -> int:
        """Bytes of the state of ``num_ids`` consecutive ids (from an aligned id)."""
        return self.entries(num_ids) * self.entry_bytes

    @property
    def total_bytes(self) -> int:
        """Bytes of the state of all ``num_ids`` ids, wherever they are stored."""
        return self.bytes_of(self.num_ids)


def check_id_range(table: str, ids: torch.Tensor, num_ids: int, fix: str) -> None:
    """Raise a ``ValueError`` naming ``table``, the first id outside ``[0, num_ids)`` and
    ``fix`` (what to do about it), if ``ids`` has one (no-op on the meta device)."""
    if ids.numel() and not ids.is_meta:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_ids:
            raise ValueError(f"table '{table}': id {lo if lo < 0 else hi} is outside "
                             f"[0, {num_ids}); {fix}")


def codebook_table_name(table: str, suffix: str) -> str:
    return f"{table}__{suffix}" if suffix else table


def codebook_feature_name(feature: str, stream: str) -> str:
    return f"{feature}__{stream}" if stream else feature


class CompressedTable(nn.Module, abc.ABC):
    """Base class: remap + compose for one logical table. Subclasses fill ``codebooks``."""

    method_name: str = ""
    # True when compose(pooled) == torch.cat(pooled, dim=1): compose is then a column slice.
    concat_compose: bool = False
    # "mult" / "add" when compose(pooled) == pooled[0] * pooled[1] / pooled[0] + pooled[1]
    # (same shapes): the collection then composes every table in a few whole-batch ops.
    elementwise_compose: Optional[str] = None

    def __init__(self, table: EmbeddingBagConfig) -> None:
        super().__init__()
        self.table_name: str = table.name
        self.num_embeddings: int = table.num_embeddings
        self.embedding_dim: int = table.embedding_dim
        self.codebooks: List[Codebook] = []

    @abc.abstractmethod
    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        """int64 ids -> one int64 row-id tensor per stream, ``[n]`` or ``[n, k]`` (``k`` rows
        per id)."""

    def stream_specs(self) -> Optional[List[StreamSpec]]:
        """The fused op's description of :meth:`remap` (one per stream), or None (reference
        path only)."""
        return None

    def id_weights(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Optional per-id multipliers applied to every stream's lookup (MEmCom); else None."""
        return None

    @abc.abstractmethod
    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        """Pooled stream outputs (in stream order) -> ``[batch, embedding_dim]``."""

    def observe(self, ids: torch.Tensor) -> None:
        """Called with each training batch's ids before ``remap`` (CCE keeps a sample)."""

    def per_id_state(self) -> List[PerIdState]:
        """The state with one entry per id (see :class:`PerIdState`); none by default."""
        return []

    def replicated_state_bytes(self) -> int:
        """Bytes of the non-codebook state every rank keeps whole (CCE's hash generation,
        MPE's logits and buffers)."""
        return 0

    def state_bytes(self) -> int:
        """Bytes of non-codebook state this module stores: its part of the per-id state (all
        of it, or its id range) plus the replicated state."""
        return sum(_tensor_bytes(getattr(self, s.name)) for s in self.per_id_state()) \
            + self.replicated_state_bytes()

    def logical_state_bytes(self) -> int:
        """:meth:`state_bytes` of the whole table (all ids), wherever the state is stored."""
        return sum(s.total_bytes for s in self.per_id_state()) + self.replicated_state_bytes()

    def assignment_bytes(self) -> int:
        """Bytes of the learned id -> codebook-row assignment (CCE's ``p``)."""
        return 0

    def sample_bytes(self, world_size: Optional[int] = None) -> int:
        """Bytes of training-only samples kept outside every state dict, by *each* rank (CCE's
        id reservoir, which re-clustering draws from): as held now, or once sharded over
        ``world_size`` ranks; 0 by default."""
        return 0

    def share_sample(self, world_size: int) -> None:
        """Called once sharded over ``world_size`` ranks: size the per-rank samples so that
        all ranks' together stay the unsharded size (CCE's reservoir); no-op by default."""

    def extra_parameters(self) -> int:
        """Trainable parameters held outside the codebook EBC (MEmCom's per-id weights)."""
        return 0

    def per_id_bytes(self) -> int:
        """Bytes of the whole trainable per-id state (MEmCom's ``w``; MPE's master rows)."""
        return sum(s.total_bytes for s in self.per_id_state() if s.trainable)

    def streams(self) -> List[str]:
        return [s for cb in self.codebooks for s in cb.streams]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
