"""An uncompressed table: the logical table itself is the one codebook, ids pass through."""

from typing import List

import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce.methods.base import Codebook, CompressedTable, StreamSpec


class FullTable(CompressedTable):
    """Identity remap. Ids outside ``[0, num_embeddings)`` raise instead of reading out of bounds."""

    method_name = "full"
    concat_compose = True

    def __init__(self, table: EmbeddingBagConfig) -> None:
        super().__init__(table)
        self.codebooks = [Codebook("", table.num_embeddings, table.embedding_dim, [""])]

    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        if ids.numel() and not ids.is_meta:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_embeddings:
                raise ValueError(
                    f"table '{self.table_name}': id {lo if lo < 0 else hi} is outside "
                    f"[0, {self.num_embeddings}); take ids modulo num_embeddings upstream or "
                    f"compress the table with a hashing-based method"
                )
        return [ids]

    def stream_specs(self) -> List[StreamSpec]:
        return [StreamSpec("identity", self.num_embeddings)]

    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        return pooled[0]
