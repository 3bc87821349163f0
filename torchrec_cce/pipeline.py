"""Re-clustering inside TorchRec's TrainPipelineSparseDist: nothing to call.

``TrainPipelineSparseDist.progress`` starts the input dist of batch ``i+1`` before it trains on
batch ``i``. A CCE table's input dist *is* its remap (``p`` and ``h``), so after re-clustering at
step ``i`` the already-distributed batch ``i+1`` carries codebook ids of the old state. The
sharded module notices (every re-clustering bumps its remap version, which each batch's context
records at input dist) and redoes that batch's input dist before computing it, on every rank
at the same step. The sharded module also adds a batch's ids to the re-clustering sample when
the batch is computed, not at its input dist, so the sample is the same as in a plain loop.

:func:`redo_pending_input_dist` is kept for scripts written before that: it redoes the pending
input dist at once, after which the module has nothing left to redo (same numbers either way).
"""

from typing import Any


def redo_pending_input_dist(pipeline: Any) -> bool:
    """Re-run the input dist of the batch a ``TrainPipelineSparseDist`` has in flight.

    Not needed any more (see the module docstring); harmless. Returns False if nothing was
    pending (e.g. a plain, non-pipelined loop)."""
    batches = getattr(pipeline, "batches", None)
    if not batches or not hasattr(pipeline, "contexts"):
        return False
    context = pipeline.contexts[0]
    context.input_dist_tensors_requests.clear()
    pipeline.start_sparse_data_dist(batches[0], context)
    pipeline.wait_sparse_data_dist(context)
    return True
