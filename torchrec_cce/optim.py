"""Sparse-row optimizer helpers: row-wise Adagrad stepped outside fbgemm's TBE (MPE's id-range master
weights) and :func:`reset_optimizer_state` for rows rewritten by re-clustering or MPE selection.

fbgemm's ``EXACT_ROWWISE_ADAGRAD`` (what ``--sparse-optimizer rowwise_adagrad`` gives every
codebook) keeps one accumulator per row: for each row with a gradient ``g`` (duplicates summed
first), ``sum += mean(g^2)``, ``w -= lr * g / (sqrt(sum) + eps)``. TorchRec's
:class:`torchrec.optim.RowWiseAdagrad` implements that rule in torch, for dense gradients only;
:class:`RowWiseAdagrad` here is the same optimizer (same state: ``sum`` ``[rows, 1]`` and
``step``) that also takes sparse COO gradients (``F.embedding(..., sparse=True)``), so a step
costs O(rows looked up), not O(rows stored). ``torch.optim.Adagrad`` is *not* this rule on 2-D
rows: it keeps one accumulator per element.

With ``weight_decay`` a sparse step decays only the rows it touches (fbgemm's behaviour); a
dense step decays every row (TorchRec's).
"""

from typing import Iterable, Optional, Sequence

import torch
from torch import nn
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad as _TorchRecRowWiseAdagrad
from torchrec.optim.rowwise_adagrad import adagrad as _dense_rowwise_adagrad


class RowWiseAdagrad(_TorchRecRowWiseAdagrad):
    """TorchRec's row-wise Adagrad (fbgemm's rule) accepting sparse gradients (see module)."""

    @torch.no_grad()
    def step(self, closure=None) -> Optional[torch.Tensor]:  # noqa: ANN001
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            dense = [p for p in group["params"] if p.grad is not None and not p.grad.is_sparse]
            if dense:
                _dense_rowwise_adagrad(
                    dense, [p.grad for p in dense], [self.state[p]["sum"] for p in dense],
                    [self.state[p]["step"] for p in dense], lr=group["lr"],
                    weight_decay=group["weight_decay"], lr_decay=group["lr_decay"],
                    eps=group["eps"], maximize=group["maximize"])
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    self._sparse_step(p, group)
        return loss

    def _sparse_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] += 1
        grad = p.grad.coalesce()  # one entry per row (duplicates summed)
        if grad.sparse_dim() != 1:  # element-sparse: as rows
            grad = grad.to_dense().to_sparse(sparse_dim=1)
        rows, g = grad.indices()[0], grad.values()
        if rows.numel() == 0:
            return
        if group["maximize"]:
            g = -g
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p[rows]
        acc = state["sum"][rows] + g.pow(2).mean(dim=1, keepdim=True)
        state["sum"][rows] = acc
        clr = group["lr"] / (1 + (float(state["step"]) - 1) * group["lr_decay"])
        p[rows] = p[rows].addcdiv(g, acc.sqrt().add_(group["eps"]), value=-clr)


def _initial_accumulator(opt: torch.optim.Optimizer, param: torch.Tensor) -> float:
    """The value ``opt``'s state for ``param`` starts from (Adagrad's
    ``initial_accumulator_value`` of ``param``'s group, else 0)."""
    for group in opt.param_groups:
        if any(q is param for q in group["params"]):
            return float(group.get("initial_accumulator_value", 0.0))
    return 0.0


def reset_optimizer_state(params: Iterable[nn.Parameter],
                          optimizers: Sequence[torch.optim.Optimizer] = ()) -> int:
    """Zero the per-row optimizer state (moments, Adagrad sums) of rewritten parameters.

    Looks in ``optimizers`` and in TorchRec's in-backward optimizers
    (``apply_optimizer_in_backward`` stores them on ``param._in_backward_optimizers``).
    Adagrad's accumulators go back to the group's ``initial_accumulator_value``; a ``step``
    counter (Adam's bias correction) goes back to 0. Returns the number of row-state tensors
    reset.
    """
    n = 0
    for p in params:
        opts = list(optimizers) + list(getattr(p, "_in_backward_optimizers", []))
        for opt in opts:
            st = opt.state.get(p)
            if not st:
                continue
            init = _initial_accumulator(opt, p)
            for key, value in st.items():
                if not (isinstance(value, torch.Tensor)
                        and type(value).__name__ in ("Tensor", "Parameter")):
                    continue
                if value.shape == p.shape:
                    value.fill_(init if key == "sum" else 0.0)
                    n += 1
                elif key == "step":  # bias corrections (Adam) restart with the moments
                    value.zero_()
    return n


def reset_optimizer_rows(param: nn.Parameter, rows: torch.Tensor,
                         optimizers: Sequence[torch.optim.Optimizer] = ()) -> int:
    """Reset the optimizer state of rows ``rows`` of ``param`` only (rows given a new meaning:
    a hot tier's migrated rows), in ``optimizers`` and ``param``'s in-backward optimizers:
    every state tensor with one entry per row of ``param`` (Adagrad sums, row-wise sums
    ``[rows, 1]``, Adam moments) gets those rows set back to their initial value (Adagrad's
    ``initial_accumulator_value``, else 0). Step counters are shared by all rows and left as
    they are. Sharded state (``ShardedTensor``, a sharded module's fused optimizer) is left to
    its module (:mod:`torchrec_cce.distributed.hot_migration`). Returns the number of state
    tensors touched."""
    n = 0
    if rows.numel() == 0:
        return 0
    for opt in list(optimizers) + list(getattr(param, "_in_backward_optimizers", [])):
        st = opt.state.get(param)
        if not st:
            continue
        init = _initial_accumulator(opt, param)
        for key, value in st.items():
            if (isinstance(value, torch.Tensor) and type(value).__name__ in ("Tensor", "Parameter")
                    and value.dim() >= 1 and value.shape[0] == param.shape[0] and key != "step"):
                value[rows] = init if key == "sum" else 0.0
                n += 1
    return n


__all__ = ["RowWiseAdagrad", "reset_optimizer_rows", "reset_optimizer_state"]
