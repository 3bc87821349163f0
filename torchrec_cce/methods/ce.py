"""Compositional embedding with concatenation: ``e(x) = concat_i(C_i[h_i(x)])``.

The ``chunks`` codebooks ``C_i`` (``rows x dim/chunks`` each) are stored stacked in one table
``<table>__ce`` of ``chunks * rows`` rows; chunk ``i`` reads rows ``[i*rows, (i+1)*rows)``.
"""

from typing import List

import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce.configs import CEConfig
from torchrec_cce.hashing import derive_seed, hash_ids
from torchrec_cce.methods.base import Codebook, CompressedTable, StreamSpec


class CETable(CompressedTable):
    method_name = "ce"
    concat_compose = True

    def __init__(self, table: EmbeddingBagConfig, config: CEConfig) -> None:
        super().__init__(table)
        self.rows, self.chunks = config.rows, config.chunks
        self.hash_keys = [derive_seed(config.seed, table.name, i, "ce") for i in range(self.chunks)]
        self.codebooks = [
            Codebook("ce", self.chunks * self.rows, table.embedding_dim // self.chunks,
                     [f"ce{i}" for i in range(self.chunks)])
        ]

    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        return [hash_ids(ids, key, self.rows) + i * self.rows for i, key in enumerate(self.hash_keys)]

    def stream_specs(self) -> List[StreamSpec]:
        return [StreamSpec("hash", self.rows, offset=i * self.rows, key=key)
                for i, key in enumerate(self.hash_keys)]

    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat(pooled, dim=1)
