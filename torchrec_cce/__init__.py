"""torchrec_cce: compressed embedding tables (CCE and baselines) for TorchRec.

Public API::

    from torchrec_cce import (CCEEmbeddingBagCollection, CCEConfig, CEConfig, HashingTrickConfig,
                              QRConfig, MEmComConfig, MPEConfig, TieredConfig,
                              OnlineTieredConfig, recluster, migrate_hot,
                              IdBias, with_id_bias,
                              memory_report,
                              plan_compression, compress_trained, export_for_inference,
                              load_unsharded)
"""

from torchrec_cce.budget import (CompressionPlan, TablePlan, plan_candidates, plan_compression,
                                 tier_compression, tier_plan)
from torchrec_cce.configs import (
    CCEConfig,
    CEConfig,
    FullConfig,
    HashingTrickConfig,
    MEmComConfig,
    MPEConfig,
    OnlineTieredConfig,
    QRConfig,
    TieredConfig,
    compression_for_budget,
    total_compression,
)
from torchrec_cce.api import memory_report, migrate_hot, mpe_penalty, recluster
from torchrec_cce.export import export_for_inference, load_unsharded
from torchrec_cce.id_bias import IdBias, WithIdBias, hot_ids_for_bytes, with_id_bias
from torchrec_cce.memory import summarize
from torchrec_cce.modules import CCEEmbeddingBagCollection
from torchrec_cce.schedules import MigrationSchedule, MPESchedule, ReclusterSchedule
from torchrec_cce.warm_start import compress_trained

__all__ = [
    "CCEEmbeddingBagCollection",
    "CCEConfig",
    "CEConfig",
    "CompressionPlan",
    "FullConfig",
    "HashingTrickConfig",
    "IdBias",
    "MEmComConfig",
    "MPEConfig",
    "MigrationSchedule",
    "MPESchedule",
    "OnlineTieredConfig",
    "QRConfig",
    "ReclusterSchedule",
    "compress_trained",
    "compression_for_budget",
    "export_for_inference",
    "hot_ids_for_bytes",
    "load_unsharded",
    "memory_report",
    "migrate_hot",
    "mpe_penalty",
    "plan_candidates",
    "plan_compression",
    "recluster",
    "summarize",
    "TablePlan",
    "tier_compression",
    "tier_plan",
    "TieredConfig",
    "total_compression",
    "WithIdBias",
    "with_id_bias",
]
