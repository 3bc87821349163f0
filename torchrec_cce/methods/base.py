"""The interface every compression method implements for one logical table.

A method is a small ``nn.Module`` with two pure stages around a stock TorchRec EBC:

* ``remap(ids)``: the logical table's ids -> one tensor of codebook row ids per *stream*
  (a stream is one pooled lookup into one codebook table, e.g. CCE's ``A_2``);
* ``compose(pooled)``: the pooled stream outputs (SUM-pooled, in stream order) -> the logical
  table's pooled ``[batch, dim]`` vectors.

Codebooks are declared as :class:`Codebook` (name suffix, rows, columns, stream names) and
become ordinary 2-D tables of the inner ``EmbeddingBagCollection``; their names are
``<table>__<suffix>`` and their features ``<feature>__<stream>`` (an empty suffix/stream keeps
the logical name: full tables pass through unchanged).
"""

import abc
from dataclasses import dataclass
from typing import List, Optional

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


def codebook_table_name(table: str, suffix: str) -> str:
    return f"{table}__{suffix}" if suffix else table


def codebook_feature_name(feature: str, stream: str) -> str:
    return f"{feature}__{stream}" if stream else feature


class CompressedTable(nn.Module, abc.ABC):
    """Base class: remap + compose for one logical table. Subclasses fill ``codebooks``."""

    method_name: str = ""

    def __init__(self, table: EmbeddingBagConfig) -> None:
        super().__init__()
        self.table_name: str = table.name
        self.num_embeddings: int = table.num_embeddings
        self.embedding_dim: int = table.embedding_dim
        self.codebooks: List[Codebook] = []

    @abc.abstractmethod
    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        """int64 ids -> one int64 row-id tensor per stream (same length as ``ids``)."""

    def id_weights(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Optional per-id multipliers applied to every stream's lookup (MEmCom); else None."""
        return None

    @abc.abstractmethod
    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        """Pooled stream outputs (in stream order) -> ``[batch, embedding_dim]``."""

    def observe(self, ids: torch.Tensor) -> None:
        """Called with each training batch's ids before ``remap`` (CCE keeps a sample)."""

    def state_bytes(self) -> int:
        """Bytes of non-codebook state stored per table (assignment, per-id weights)."""
        return 0

    def assignment_bytes(self) -> int:
        """Bytes of the learned id -> codebook-row assignment (CCE's ``p``)."""
        return 0

    def extra_parameters(self) -> int:
        """Trainable parameters held outside the codebook EBC (MEmCom's per-id weights)."""
        return 0

    def streams(self) -> List[str]:
        return [s for cb in self.codebooks for s in cb.streams]
