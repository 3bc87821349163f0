"""An uncompressed table: the logical table itself is the one codebook, ids pass through."""

from typing import List

import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce.methods.base import Codebook, CompressedTable, StreamSpec, check_id_range


class FullTable(CompressedTable):
    """Identity remap. Ids outside ``[0, num_embeddings)`` raise instead of reading out of bounds."""

    method_name = "full"
    concat_compose = True

    def __init__(self, table: EmbeddingBagConfig) -> None:
        super().__init__(table)
        self.codebooks = [Codebook("", table.num_embeddings, table.embedding_dim, [""])]

    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        check_id_range(self.table_name, ids, self.num_embeddings,
                       "take ids modulo num_embeddings upstream or compress the table with a "
                       "hashing-based method")
        return [ids]

    def stream_specs(self) -> List[StreamSpec]:
        return [StreamSpec("identity", self.num_embeddings)]

    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        return pooled[0]
