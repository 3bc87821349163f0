"""MPE (Mixed-Precision Embeddings): quantiser, training hook and serving export.

The table itself is :class:`torchrec_cce.methods.mpe.MPETable` (built from ``MPEConfig``).
"""

from torchrec_cce.mpe.export import (
    MPEServingTable,
    export_mpe,
    install_serving_tables,
    load_mpe,
    save_mpe,
    serving_bytes,
)
from torchrec_cce.mpe.hook import MPESchedule, mpe_penalty, mpe_summary, mpe_tables

__all__ = [
    "MPESchedule",
    "MPEServingTable",
    "export_mpe",
    "install_serving_tables",
    "load_mpe",
    "mpe_penalty",
    "mpe_summary",
    "mpe_tables",
    "save_mpe",
    "serving_bytes",
]
