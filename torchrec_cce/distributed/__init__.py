"""Sharding CCE collections with TorchRec (DMP, planner, TrainPipelineSparseDist, DCP)."""

from torchrec_cce.distributed.planning import (
    CCEStorageReservation,
    format_plan_memory,
    plan_memory,
    table_state_bytes_per_rank,
)
from torchrec_cce.distributed.sharder import (
    CCEEmbeddingBagCollectionSharder,
    ShardedCCEEmbeddingBagCollection,
)

__all__ = [
    "CCEEmbeddingBagCollectionSharder",
    "CCEStorageReservation",
    "ShardedCCEEmbeddingBagCollection",
    "format_plan_memory",
    "plan_memory",
    "table_state_bytes_per_rank",
]
