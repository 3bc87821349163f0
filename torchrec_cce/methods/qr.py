"""Quotient-remainder compositional embedding (Shi et al., KDD 2020).

``Q[x // m]`` and ``R[x mod m]`` combined by mult, add or concat (see :class:`QRConfig` for
the pooled semantics of ``mult``: the product of the pooled tables, as in the DLRM reference).
"""

from typing import List

import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce.configs import QRConfig
from torchrec_cce.methods.base import Codebook, CompressedTable, StreamSpec


class QRTable(CompressedTable):
    method_name = "qr"

    def __init__(self, table: EmbeddingBagConfig, config: QRConfig) -> None:
        super().__init__(table)
        self.collisions, self.operation = config.collisions, config.operation
        self.concat_compose = self.operation == "concat"
        self.elementwise_compose = None if self.concat_compose else self.operation
        dim = table.embedding_dim
        q_dim, r_dim = (dim // 2, dim - dim // 2) if self.operation == "concat" else (dim, dim)
        self.codebooks = [
            Codebook("qr_q", config.quotient_rows(table), q_dim, ["qr_q"]),
            Codebook("qr_r", self.collisions, r_dim, ["qr_r"]),
        ]

    def remap(self, ids: torch.Tensor) -> List[torch.Tensor]:
        ids = torch.remainder(ids, self.num_embeddings)
        return [torch.div(ids, self.collisions, rounding_mode="floor"), ids % self.collisions]

    def stream_specs(self) -> List[StreamSpec]:
        return [StreamSpec("qr_quotient", self.collisions, num_ids=self.num_embeddings),
                StreamSpec("qr_remainder", self.collisions, num_ids=self.num_embeddings)]

    def compose(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        q, r = pooled
        if self.operation == "mult":
            return q * r
        if self.operation == "add":
            return q + r
        return torch.cat([q, r], dim=1)
