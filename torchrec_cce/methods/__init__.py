"""One file per compression method; :func:`build_table` picks the class for a config."""

from typing import Optional, Tuple

import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce.configs import (
    CCEConfig,
    CEConfig,
    CompressionConfig,
    FullConfig,
    HashingTrickConfig,
    MEmComConfig,
    MPEConfig,
    OnlineTieredConfig,
    QRConfig,
    TieredConfig,
    codebook_data_type,
    cold_table,
)
from torchrec_cce.methods.base import (
    Codebook,
    CompressedTable,
    PerIdState,
    codebook_feature_name,
    codebook_table_name,
)
from torchrec_cce.methods.cce import CCETable
from torchrec_cce.methods.ce import CETable
from torchrec_cce.methods.full import FullTable
from torchrec_cce.methods.hashing_trick import HashingTrickTable
from torchrec_cce.methods.memcom import MEmComTable
from torchrec_cce.methods.mpe import MPETable
from torchrec_cce.methods.online_tiered import OnlineTieredTable
from torchrec_cce.methods.qr import QRTable
from torchrec_cce.methods.tiered import TieredTable


def build_table(
    table: EmbeddingBagConfig,
    config: Optional[CompressionConfig],
    device: Optional[torch.device] = None,
    store_assignment: bool = True,
    id_range: Optional[Tuple[int, int]] = None,
) -> CompressedTable:
    """The remap/compose module for ``table`` compressed by ``config`` (None: full table).

    ``id_range=(lo, hi)``: store the per-id state (:meth:`CompressedTable.per_id_state`) of ids
    ``[lo, hi)`` only (the sharder's split by id range); only for methods that have some.

    Every method's codebook tables are stored at ``config.codebook_dtype`` (None: the logical
    table's ``data_type``), read by ``modules.codebook_configs`` as ``codebook_data_type``."""
    if id_range is not None and not isinstance(getattr(config, "cold", config),
                                               (CCEConfig, MEmComConfig, MPEConfig)):
        raise ValueError(f"table '{table.name}': {type(config).__name__} has no per-id state to "
                         f"store by id range (id_range={id_range})")
    if config is None:
        return FullTable(table)
    config.validate(table)
    if isinstance(config, TieredConfig):  # the cold method on the cold ids, behind hot rows
        cold = build_table(cold_table(table, config.hot_ids), config.cold_config(table),
                           device=device, store_assignment=store_assignment,
                           id_range=id_range)
        return TieredTable(table, config, cold)
    if isinstance(config, OnlineTieredConfig):  # the cold method on all ids, behind hot rows
        cold = build_table(table, config.cold, device=device,
                           store_assignment=store_assignment, id_range=id_range)
        return OnlineTieredTable(table, config, cold, device=device)
    if isinstance(config, CCEConfig):
        method: CompressedTable = CCETable(table, config, device=device,
                                           store_assignment=store_assignment,
                                           id_range=id_range)
    elif isinstance(config, CEConfig):
        method = CETable(table, config)
    elif isinstance(config, HashingTrickConfig):
        method = HashingTrickTable(table, config)
    elif isinstance(config, QRConfig):
        method = QRTable(table, config)
    elif isinstance(config, MEmComConfig):
        method = MEmComTable(table, config, device=device, id_range=id_range)
    elif isinstance(config, MPEConfig):
        return MPETable(table, config, device=device, id_range=id_range)
    elif isinstance(config, FullConfig):
        method = FullTable(table)
    else:
        raise TypeError(
            f"table '{table.name}': unsupported compression config {type(config).__name__}; use "
            f"one of CCEConfig, CEConfig, HashingTrickConfig, QRConfig, MEmComConfig, MPEConfig, "
            f"FullConfig, TieredConfig, OnlineTieredConfig"
        )
    method.codebook_data_type = codebook_data_type(table, getattr(config, "codebook_dtype", None))
    return method


__all__ = [
    "Codebook",
    "CompressedTable",
    "PerIdState",
    "CCETable",
    "CETable",
    "FullTable",
    "HashingTrickTable",
    "MEmComTable",
    "MPETable",
    "OnlineTieredTable",
    "QRTable",
    "TieredTable",
    "build_table",
    "codebook_feature_name",
    "codebook_table_name",
]
