"""Sharding CCE collections with TorchRec (DMP, planner, TrainPipelineSparseDist, DCP)."""

from torchrec_cce.distributed.planning import (
    CCEStorageReservation,
    assignment_bytes_per_rank,
    format_plan_memory,
    mpe_bytes_per_rank,
    per_id_bytes_per_rank,
    plan_memory,
)
from torchrec_cce.distributed.sharder import (
    CCEEmbeddingBagCollectionSharder,
    ShardedCCEEmbeddingBagCollection,
)

__all__ = [
    "CCEEmbeddingBagCollectionSharder",
    "CCEStorageReservation",
    "ShardedCCEEmbeddingBagCollection",
    "assignment_bytes_per_rank",
    "format_plan_memory",
    "mpe_bytes_per_rank",
    "per_id_bytes_per_rank",
    "plan_memory",
]
