"""MPE (Mixed-Precision Embeddings) for users, in one namespace: the training hook and penalty,
and the serving export. The table itself is :class:`torchrec_cce.methods.mpe.MPETable` (built
from ``MPEConfig``); its code lives in :mod:`torchrec_cce.methods.mpe`."""

from torchrec_cce.api import mpe_penalty, mpe_summary, mpe_tables
from torchrec_cce.methods.mpe.export import (
    MPEServingTable,
    export_mpe,
    install_serving_tables,
    load_mpe,
    save_mpe,
    serving_bytes,
)
from torchrec_cce.schedules import MPESchedule

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
