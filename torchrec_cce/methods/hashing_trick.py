"""The hashing trick: ``e(x) = H[h(x)]``."""

from typing import List

import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce.configs import HashingTrickConfig
from torchrec_cce.hashing import derive_seed, hash_ids
from torchrec_cce.methods.base import Codebook, CompressedTable, StreamSpec


class HashingTrickTable(CompressedTable):
    method_name = "hashing"
    concat_compose = True

    def __init__(self, table: EmbeddingBagConfig, config: HashingTrickConfig) -> None:
        super().__init__(table)
        self.rows = config.rows
        self.hash_key = derive_seed(config.seed, table.name, 0, "hash")
        self.codebooks = [Codebook("hash", config.rows, table.embedding_dim, ["hash"])]

    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        return [hash_ids(ids, self.hash_key, self.rows)]

    def stream_specs(self) -> List[StreamSpec]:
        return [StreamSpec("hash", self.rows, key=self.hash_key)]

    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        return pooled[0]
