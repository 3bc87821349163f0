"""What a DLRM does to its pooled embeddings before the interaction: a learned gain, an L2
penalty and dropout, for tables of any method (full included).

    dlrm = DLRM(embedding_bag_collection=ebc, ...)
    regularize_pooled(dlrm, gain=True, l2=1e-2, dropout=0.0)  # before DMP

:class:`PooledRegularizer` wraps the model's interaction arch (``DLRM``, ``DLRM_DCN``,
``DLRM_Projection``: any module called ``inter_arch(dense_features=, sparse_features=[B, F,
D])``); the sparse arch and its embedding collection stay where TorchRec and the sharder expect
them, and the new parameters are dense (replicated, trained by the dense optimizer).

* ``gain``: a learned ``[F, D]`` multiplier, initialised to 1 (outputs unchanged at step 0).
  TorchRec's interaction is a plain dot product and row-wise Adagrad gives each embedding row
  one step size for all its dimensions; a gain shared by all ids of a feature adds
  per-dimension weights (benchmarks/results/quality_notes.md, "Why CCE loses on Yelp2018").
* ``l2``: the gradient of ``l2 / 2 * mean over the batch of sum_{f,d} e[b, f, d]^2`` on the
  pooled embeddings ``e`` (before the gain), added in backward; the forward value and the
  reported loss are unchanged. It reaches whatever rows compose ``e`` (a full table's looked-up
  rows: a frequency-weighted row L2; a compressed table's shared rows the same way), unlike an
  optimizer's weight decay (fbgemm's CPU row-wise Adagrad ignores it on unshared tables).
* ``dropout``: ``nn.Dropout(dropout)`` on the pooled embeddings (training only).
"""

from typing import Any

import torch
import torch.fx
from torch import nn


class _PullToZero(torch.autograd.Function):
    """Identity whose backward adds ``strength / B * x`` (the gradient of ``strength / 2 *
    mean_b sum x[b]^2``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        return grad + (ctx.strength / x.shape[0]) * x, None


def l2_pull(x: torch.Tensor, strength: float) -> torch.Tensor:
    """``x`` in forward; in backward its gradient gains that of ``strength / 2 * mean over
    dim 0 of the per-sample sum of squares`` (an L2 penalty that leaves the loss value alone)."""
    return _PullToZero.apply(x, strength)


torch.fx.wrap("l2_pull")  # a leaf for TorchRec's pipeline tracer


class PooledRegularizer(nn.Module):
    """An interaction arch whose pooled sparse input ``[B, F, D]`` first gets the L2 pull,
    dropout and the learned gain (each optional; see the module docstring)."""

    def __init__(self, interaction: nn.Module, num_features: int, dim: int, gain: bool = False,
                 l2: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        if l2 < 0 or not 0 <= dropout < 1:
            raise ValueError(f"pooled embedding regularizer: l2 must be >= 0 and dropout in "
                             f"[0, 1), got l2={l2}, dropout={dropout}")
        self.interaction = interaction
        self.l2 = float(l2)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.gain = nn.Parameter(torch.ones(num_features, dim)) if gain else None

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor
                ) -> torch.Tensor:
        x = sparse_features
        if self.l2 > 0 and self.training:
            x = l2_pull(x, self.l2)
        if self.dropout is not None:
            x = self.dropout(x)
        if self.gain is not None:
            x = x * self.gain
        return self.interaction(dense_features=dense_features, sparse_features=x)


def regularize_pooled(dlrm: nn.Module, gain: bool = False, l2: float = 0.0,
                      dropout: float = 0.0) -> nn.Module:
    """Wrap ``dlrm.inter_arch`` in a :class:`PooledRegularizer` (nothing if all three are off);
    returns ``dlrm``. ``dlrm`` is a TorchRec DLRM (or DLRM_DCN / DLRM_Projection); call it
    before DistributedModelParallel."""
    if not (gain or l2 or dropout):
        return dlrm
    sparse = dlrm.sparse_arch
    dlrm.inter_arch = PooledRegularizer(dlrm.inter_arch, sparse.F, sparse.D, gain=gain, l2=l2,
                                        dropout=dropout)
    return dlrm
