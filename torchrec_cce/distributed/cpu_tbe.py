"""A faster CPU training kernel for the codebook tables' fbgemm TBEs.

TorchRec trains a sharded (table-wise, column-wise ...) embedding table with fbgemm's
``SplitTableBatchedEmbeddingBagsCodegen`` (TBE): a fused lookup whose backward pass updates the
weights in place with the "exact" optimizers (row-wise Adagrad, Adagrad, SGD). On CPU its
backward sorts every table's lookups (``csr2csc``) and, for a table shared by several features
(every CCE/CE codebook table: one feature per chunk), updates rows in a single-threaded scalar
loop. Codebooks are small (a few thousand rows, cache-resident) but looked up many times per
id (CCE: 2 rows per chunk), so that is where a compressed method's training step went
(``benchmarks/speed.py``).

:class:`CodebookTBE` is that same TBE with another CPU compute path
(``torch.ops.torchrec_cce.tbe_forward`` / ``tbe_backward_update``, ``ops/csrc/tbe.cpp``): the
gradient rows are summed through a row -> slot map instead of a sort, and each touched row is
updated once, with fbgemm's update formulas, on fbgemm's own weight and optimizer-state tensors.
So everything around the TBE — TorchRec's fused optimizer and its learning-rate changes,
``state_dict``/DCP checkpoints, ``split_embedding_weights`` — is unchanged; results equal
fbgemm's up to floating-point summation order (``tests/test_tbe_kernel.py``). Weights may be float32 or float16
(computed in float32, each updated row rounded to nearest, as fbgemm's CPU kernels do). Anything
the kernel does not cover (CUDA, other weight precisions, other optimizers, weight decay, max-norm,
gradient clipping, variable batch sizes, per-feature gradient masks, weighted MEAN bags) and TBEs
holding a large table (:data:`SMALL_TABLE_WEIGHTS`) run fbgemm's own kernel.

:func:`use_codebook_kernel` switches the TBEs of a sharded codebook EBC to it (the sharder does,
unless ``TORCHREC_CCE_TBE_KERNEL=0``); each instance keeps all its state, only its class
changes.
"""

import logging
import os
from typing import Any, Optional

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    SplitTableBatchedEmbeddingBagsCodegen,
)
from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType
from fbgemm_gpu.split_embedding_configs import SparseType

from torchrec_cce.ops import fused_available

log = logging.getLogger("torchrec_cce")

# Tables up to this many weights are "small": their gradient rows and Adagrad state stay in
# cache. A TBE with a larger table keeps fbgemm's kernel (measured: the uncompressed Criteo
# tables of benchmarks/speed.py, capped at 1M rows, ran at 0.88x of fbgemm on this kernel).
SMALL_TABLE_WEIGHTS = 1 << 22

_OPTIMIZERS = {OptimType.EXACT_SGD: 0, OptimType.EXACT_ADAGRAD: 1,
               OptimType.EXACT_ROWWISE_ADAGRAD: 2}
_POOLING = {PoolingMode.SUM: 0, PoolingMode.MEAN: 1}


def kernel_enabled() -> bool:
    """Whether sharded codebook TBEs use :class:`CodebookTBE` (``TORCHREC_CCE_TBE_KERNEL=0``
    keeps fbgemm's kernel) and the op is built."""
    if os.environ.get("TORCHREC_CCE_TBE_KERNEL", "1") == "0":
        return False
    return fused_available()


def unsupported_reason(tbe: SplitTableBatchedEmbeddingBagsCodegen) -> Optional[str]:
    """Why :class:`CodebookTBE` would leave ``tbe`` to fbgemm's kernel (None: it covers it)."""
    args = tbe.optimizer_args
    if tbe.current_device.type != "cpu":
        return f"device {tbe.current_device}"
    if tbe.weights_precision not in (SparseType.FP32, SparseType.FP16, SparseType.BF16):
        return f"weights precision {tbe.weights_precision}"
    if tbe.output_dtype != SparseType.FP32.as_int():
        return f"output dtype {tbe.output_dtype}"
    if tbe.optimizer not in _OPTIMIZERS:
        return f"optimizer {tbe.optimizer}"
    if tbe.pooling_mode not in _POOLING:
        return f"pooling {tbe.pooling_mode}"
    if args.gradient_clipping or args.max_norm > 0:
        return "gradient clipping / max-norm"
    if args.weight_decay != 0:  # fbgemm's CPU row-wise Adagrad applies it to shared tables only
        return "weight decay"
    if getattr(tbe, "use_writeback_bwd_prehook", False):
        return "writeback backward hook"
    largest = max((rows * dim for rows, dim, *_ in tbe.embedding_specs), default=0)
    if largest > SMALL_TABLE_WEIGHTS:
        return f"a table of {largest} weights (> {SMALL_TABLE_WEIGHTS}: fbgemm is faster there)"
    return None


class _LookupAndUpdate(torch.autograd.Function):
    """Pooled lookup; its backward applies the fused update in place (like fbgemm's)."""

    @staticmethod
    def forward(ctx: Any, placeholder: torch.Tensor, tbe: "CodebookTBE", indices: torch.Tensor,
                offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.tbe = tbe
        ctx.save_for_backward(indices, offsets, per_sample_weights)
        return torch.ops.torchrec_cce.tbe_forward(
            tbe.weights_host, tbe.weights_offsets, tbe.D_offsets, tbe.total_D,
            tbe._cce_rows_per_feature, indices, offsets, per_sample_weights,
            _POOLING[tbe.pooling_mode])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):  # noqa: ANN205
        tbe = ctx.tbe
        indices, offsets, per_sample_weights = ctx.saved_tensors
        weights_grad = per_sample_weights is not None and ctx.needs_input_grad[4]
        grad_psw = torch.ops.torchrec_cce.tbe_backward_update(
            grad_output, tbe.weights_host, tbe.weights_offsets, tbe.D_offsets, tbe.total_D,
            tbe._cce_rows_per_feature, tbe._cce_feature_table, indices, offsets,
            per_sample_weights, _POOLING[tbe.pooling_mode], weights_grad,
            _OPTIMIZERS[tbe.optimizer], tbe.momentum1_host, tbe.momentum1_offsets,
            float(tbe.learning_rate_tensor), float(tbe.optimizer_args.eps))
        return None, None, None, None, (grad_psw if weights_grad else None)


class CodebookTBE(SplitTableBatchedEmbeddingBagsCodegen):
    """fbgemm's TBE, trained on CPU by ``torchrec_cce``'s kernel (see the module docstring).

    Instances are made by :func:`use_codebook_kernel` from existing TBEs (``__class__`` is
    swapped; no state is added to the checkpoint).
    """

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,  # noqa: D102
                per_sample_weights: Optional[torch.Tensor] = None,
                feature_requires_grad: Optional[torch.Tensor] = None,
                batch_size_per_feature_per_rank: Optional[Any] = None,
                **kwargs: Any) -> torch.Tensor:
        # fbgemm's weighted MEAN backward does not divide by the bag length (its forward does):
        # leave that case to fbgemm rather than train differently from it.
        if (feature_requires_grad is not None or batch_size_per_feature_per_rank is not None
                or kwargs.get("vbe_output") is not None
                or (per_sample_weights is not None and self.pooling_mode != PoolingMode.SUM)):
            return super().forward(indices, offsets, per_sample_weights, feature_requires_grad,
                                   batch_size_per_feature_per_rank, **kwargs)
        if indices.dtype != offsets.dtype:
            indices, offsets = indices.long(), offsets.long()
        self.step += 1
        if self.optimizer == OptimType.EXACT_ROWWISE_ADAGRAD:
            self.iter.add_(1)  # as fbgemm's forward (its iteration count is checkpointed)
        if per_sample_weights is not None and per_sample_weights.dtype != torch.float32:
            per_sample_weights = per_sample_weights.float()
        return _LookupAndUpdate.apply(self.placeholder_autograd_tensor, self, indices, offsets,
                                      per_sample_weights)


def _prepare(tbe: SplitTableBatchedEmbeddingBagsCodegen) -> None:
    """Per-feature rows and table ids as tensors (the kernel's view of fbgemm's layout)."""
    tbe._cce_rows_per_feature = torch.as_tensor(
        [tbe.embedding_specs[t][0] for t in tbe.feature_table_map], dtype=torch.int64)
    tbe._cce_feature_table = torch.as_tensor(list(tbe.feature_table_map), dtype=torch.int64)


def use_codebook_kernel(module: torch.nn.Module) -> int:
    """Switch every eligible fbgemm TBE inside ``module`` (e.g. a sharded codebook EBC) to
    :class:`CodebookTBE`; returns how many were switched. TBEs the kernel does not cover (see
    :func:`unsupported_reason`) keep fbgemm's kernel."""
    if not kernel_enabled():
        return 0
    # A sharded EBC keeps its lookups in a plain list (``_lookups``), outside ``modules()``.
    candidates = [m for lookup in getattr(module, "_lookups", []) for m in lookup.modules()]
    switched = 0
    for sub in candidates + list(module.modules()):
        if type(sub) is not SplitTableBatchedEmbeddingBagsCodegen:
            continue
        reason = unsupported_reason(sub)
        if reason is not None:
            log.debug("torchrec_cce: fbgemm's kernel kept for a TBE (%s)", reason)
            continue
        _prepare(sub)
        sub.__class__ = CodebookTBE
        switched += 1
    return switched


def check_bfloat16_trainable(module: torch.nn.Module) -> None:
    """Raise a ``ValueError`` naming the tables if a CPU TBE of ``module`` (a sharded codebook
    EBC) holds bfloat16 weights that fbgemm would have to train: fbgemm-gpu-cpu has no bfloat16
    kernels (its forward fails deep inside with NotImplementedError)."""
    for lookup in getattr(module, "_lookups", []):
        lookup = getattr(lookup, "module", lookup)  # data-parallel lookups are DDP-wrapped
        for emb in getattr(lookup, "_emb_modules", []):
            tbe = getattr(emb, "_emb_module", None)
            if tbe is None or isinstance(tbe, CodebookTBE):
                continue
            weights = getattr(tbe, "weights_host", None)
            if weights is None or weights.numel() == 0:
                weights = getattr(tbe, "weights", None)
            if not isinstance(weights, torch.Tensor) or weights.dtype != torch.bfloat16 \
                    or weights.device.type != "cpu":
                continue
            names = [t.name for t in emb.config.embedding_tables]
            why = ("TORCHREC_CCE_TBE_KERNEL=0 or the C++ ops are not built"
                   if not kernel_enabled() or type(tbe) is not SplitTableBatchedEmbeddingBagsCodegen
                   else unsupported_reason(tbe))
            raise ValueError(
                f"tables {names}: bfloat16 codebooks train on CPU only with torchrec_cce's TBE "
                f"kernel, model-parallel (fbgemm-gpu-cpu has no bfloat16 kernels), and it does "
                f"not run these ({why}); use codebook_dtype=torch.float16, or place them "
                f"table-wise/column-wise with the kernel on")


__all__ = ["CodebookTBE", "check_bfloat16_trainable", "kernel_enabled", "unsupported_reason",
           "use_codebook_kernel"]
