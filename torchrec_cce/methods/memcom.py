"""MEmCom (Pansare et al., MLSys 2022): ``e(x) = w[x] * H[h(x)]``.

``H`` is hashed and shared; ``w`` is one trainable scalar per id, applied as a per-sample
weight of the pooled lookup, so the codebook stays an ordinary (weighted) EBC table.
"""

from typing import List, Optional

import torch
from torch import nn
from torchrec import EmbeddingBagConfig

from torchrec_cce.configs import MEmComConfig
from torchrec_cce.hashing import derive_seed, hash_ids
from torchrec_cce.methods.base import Codebook, CompressedTable, StreamSpec


class MEmComTable(CompressedTable):
    method_name = "memcom"
    concat_compose = True

    def __init__(self, table: EmbeddingBagConfig, config: MEmComConfig,
                 device: Optional[torch.device] = None) -> None:
        super().__init__(table)
        self.rows = config.rows
        self.hash_key = derive_seed(config.seed, table.name, 0, "memcom")
        self.codebooks = [Codebook("memcom", config.rows, table.embedding_dim, ["memcom"])]
        self.id_weight = nn.Parameter(torch.empty(table.num_embeddings, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.id_weight.is_meta:
            with torch.no_grad():
                self.id_weight.fill_(1.0)

    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        return [hash_ids(ids, self.hash_key, self.rows)]

    def stream_specs(self) -> List[StreamSpec]:
        return [StreamSpec("hash", self.rows, key=self.hash_key)]

    def id_weights(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        return self.id_weight[torch.remainder(ids, self.num_embeddings)]

    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        return pooled[0]

    def state_bytes(self) -> int:
        return self.id_weight.numel() * self.id_weight.element_size()

    def extra_parameters(self) -> int:
        return self.id_weight.numel()
