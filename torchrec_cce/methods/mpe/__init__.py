"""MPE (Mixed-Precision Embeddings; Li et al., arXiv 2409.20305): the table (:mod:`.table`), its
LSQ+ quantiser (:mod:`.quantizer`) and its serving export (:mod:`.export`)."""

from torchrec_cce.methods.mpe.table import (
    INIT_BLOCK_ROWS,
    RETRAIN,
    SEARCH,
    STAGE_NAMES,
    WARMUP,
    MPETable,
    frequency_ordered,
    frequency_ranks,
    select_bits,
    selection_threshold,
)

__all__ = ["INIT_BLOCK_ROWS", "MPETable", "RETRAIN", "SEARCH", "STAGE_NAMES", "WARMUP",
           "frequency_ordered", "frequency_ranks", "select_bits", "selection_threshold"]
