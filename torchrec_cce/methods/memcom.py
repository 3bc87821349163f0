"""MEmCom (Pansare et al., "Learning Compressed Embeddings for On-Device Inference", MLSys 2022):
``e(x) = w[x] * H[h(x)]``.

``H`` is hashed and shared; ``w`` is one trainable scalar per id, applied as a per-sample
weight of the pooled lookup, so the codebook stays an ordinary (weighted) EBC table. ``w`` is
stored as a ``[V, 1]`` column (rows of one element), so the optimizer a TorchRec user gives
every sparse parameter applies to it as to any table: row-wise Adagrad on one-element rows is
exactly Adagrad (``apply_optimizer_in_backward(RowWiseAdagrad, ...)`` works on it). A 1-D ``w``
of an older checkpoint loads into the column.

Sharded (``id_range=(lo, hi)``, built by the sharder), the table stores only ``w[lo:hi]`` and
the two stages move to the rank that computes the codebook lookup: :meth:`remap` passes the raw
ids through the input all-to-all, and the sharded module hashes them (:meth:`bucket`) and
fetches their weights from the ranks owning them
(:mod:`torchrec_cce.distributed.per_id_weights`) right before the lookup.
"""

from typing import List, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagConfig

from torchrec_cce.configs import MEmComConfig
from torchrec_cce.hashing import derive_seed, hash_ids
from torchrec_cce.methods.base import Codebook, CompressedTable, PerIdState, StreamSpec


class MEmComTable(CompressedTable):
    method_name = "memcom"
    concat_compose = True

    def __init__(self, table: EmbeddingBagConfig, config: MEmComConfig,
                 device: Optional[torch.device] = None,
                 id_range: Optional[Tuple[int, int]] = None) -> None:
        """``id_range=(lo, hi)`` (built by the sharder) stores the weights of ids ``[lo, hi)``
        only; the sharded module then hashes ids and fetches weights where it looks them up."""
        super().__init__(table)
        self.rows = config.rows
        self.hash_key = derive_seed(config.seed, table.name, 0, "memcom")
        self.codebooks = [Codebook("memcom", config.rows, table.embedding_dim, ["memcom"])]
        self.sharded = id_range is not None
        self.id_lo, self.id_hi = id_range if self.sharded else (0, table.num_embeddings)
        # w[id_lo:id_hi] (all of w unless sharded by id range), one row per id.
        self.id_weight = nn.Parameter(torch.empty(self.id_hi - self.id_lo, 1, device=device))
        self._register_load_state_dict_pre_hook(_column_from_vector)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.id_weight.is_meta:
            with torch.no_grad():
                self.id_weight.fill_(1.0)

    def bucket(self, ids: torch.Tensor) -> torch.Tensor:
        """``h(x)``: the row of ``H`` (int64 ids of any value)."""
        return hash_ids(ids, self.hash_key, self.rows)

    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        if self.sharded:  # hashed where the lookup is computed (see the module docstring)
            return [ids]
        return [self.bucket(ids)]

    def stream_specs(self) -> Optional[List[StreamSpec]]:
        if self.sharded:  # raw ids pass through (no fused description): the reference path
            return None
        return [StreamSpec("hash", self.rows, key=self.hash_key)]

    def id_weights(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        if self.sharded:
            return None
        return self.id_weight[torch.remainder(ids, self.num_embeddings), 0]

    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        return pooled[0]

    def per_id_state(self) -> List[PerIdState]:
        """``w``: one float per id (a ``[V, 1]`` column), trained where ids are looked up."""
        return [PerIdState("id_weight", self.num_embeddings, self.id_weight.element_size())]

    def extra_parameters(self) -> int:
        return self.num_embeddings


def _column_from_vector(state_dict: dict, prefix: str, *args) -> None:  # noqa: ANN002
    """Load a 1-D ``id_weight`` (checkpoints written before it became a column)."""
    key = prefix + "id_weight"
    value = state_dict.get(key)
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        state_dict[key] = value.unsqueeze(1)
