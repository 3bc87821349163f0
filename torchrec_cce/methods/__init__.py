"""One file per compression method; :func:`build_table` picks the class for a config."""

from typing import Optional, Tuple

import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce.configs import (
    CCEConfig,
    CEConfig,
    CompressionConfig,
    HashingTrickConfig,
    MEmComConfig,
    MPEConfig,
    QRConfig,
)
from torchrec_cce.methods.base import (
    Codebook,
    CompressedTable,
    codebook_feature_name,
    codebook_table_name,
)
from torchrec_cce.methods.cce import CCETable
from torchrec_cce.methods.ce import CETable
from torchrec_cce.methods.full import FullTable
from torchrec_cce.methods.hashing_trick import HashingTrickTable
from torchrec_cce.methods.memcom import MEmComTable
from torchrec_cce.methods.mpe import MPETable
from torchrec_cce.methods.qr import QRTable


def build_table(
    table: EmbeddingBagConfig,
    config: Optional[CompressionConfig],
    device: Optional[torch.device] = None,
    store_assignment: bool = True,
    assignment_range: Optional[Tuple[int, int]] = None,
) -> CompressedTable:
    """The remap/compose module for ``table`` compressed by ``config`` (None: full table)."""
    if config is None:
        return FullTable(table)
    config.validate(table)
    if isinstance(config, CCEConfig):
        return CCETable(table, config, device=device, store_assignment=store_assignment,
                        assignment_range=assignment_range)
    if isinstance(config, CEConfig):
        return CETable(table, config)
    if isinstance(config, HashingTrickConfig):
        return HashingTrickTable(table, config)
    if isinstance(config, QRConfig):
        return QRTable(table, config)
    if isinstance(config, MEmComConfig):
        return MEmComTable(table, config, device=device)
    if isinstance(config, MPEConfig):
        return MPETable(table, config, device=device)
    raise TypeError(
        f"table '{table.name}': unsupported compression config {type(config).__name__}; use one "
        f"of CCEConfig, CEConfig, HashingTrickConfig, QRConfig, MEmComConfig, MPEConfig"
    )


__all__ = [
    "Codebook",
    "CompressedTable",
    "CCETable",
    "CETable",
    "FullTable",
    "HashingTrickTable",
    "MEmComTable",
    "MPETable",
    "QRTable",
    "build_table",
    "codebook_feature_name",
    "codebook_table_name",
]
