"""Optimizers of a compressed DLRM: the sparse rule stepped in backward for every embedding
row, the dense optimizer of the MLPs, and a linear warm-up that reaches all of them.

    apply_sparse_optimizer(model.model.sparse_arch, "rowwise_adagrad", lr=0.05)  # before DMP
    dmp = DistributedModelParallel(model, ...)
    optim = Optimizers(dmp, dense_optimizer("adagrad", 0.05), dense_lr=0.05, sparse_lr=0.05,
                       warmup_steps=100)
    optim.before_step(step)  # before each training step (1-based)
"""

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import SGD, in_backward_optimizer_filter

from torchrec_cce.methods.mpe import MPETable

SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
DENSE_OPTIMIZERS = ("adagrad", "adam", "sgd")


def sparse_optimizer(name: str) -> Tuple[type, Dict[str, Any]]:
    """The optimizer class and its keyword arguments (besides ``lr``) of a sparse rule."""
    if name == "rowwise_adagrad":
        return RowWiseAdagrad, {"eps": 1e-8}
    if name == "adagrad":
        return torch.optim.Adagrad, {"eps": 1e-8}
    if name == "sgd":
        return SGD, {}
    raise ValueError(f"unknown sparse optimizer {name!r}: pick one of {SPARSE_OPTIMIZERS}")


def dense_optimizer(name: str, lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    """A factory ``params -> optimizer`` of a dense rule at ``lr``."""
    if name == "adam":
        return lambda params: torch.optim.Adam(params, lr=lr)
    if name == "adagrad":
        return lambda params: torch.optim.Adagrad(params, lr=lr, eps=1e-8)
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown dense optimizer {name!r}: pick one of {DENSE_OPTIMIZERS}")


def apply_sparse_optimizer(sparse_arch: nn.Module, name: str, lr: float) -> None:
    """Give every embedding row of ``sparse_arch`` the sparse rule ``name`` at ``lr``, stepped
    in backward (call before DMP).

    Codebooks (2-D TBE tables: fbgemm's fused optimizer) and MPE's fp32 master weights (2-D,
    split by id range: the sharder gives them torch's form of the same rule) get the rule
    itself; MEmCom's 1-D per-id weights get torch's optimizer of the same rule (Adagrad =
    row-wise Adagrad on one-element rows). MPE's small replicated logits, LSQ+ steps and offsets
    are left to the dense optimizer."""
    opt_cls, opt_kw = sparse_optimizer(name)
    mpe_small = {id(p) for m in sparse_arch.modules() if isinstance(m, MPETable)
                 for p in (m.logits, m.alpha, m.beta)}
    sparse = [p for p in sparse_arch.parameters() if id(p) not in mpe_small]
    apply_optimizer_in_backward(opt_cls, [p for p in sparse if p.dim() == 2], {"lr": lr, **opt_kw})
    per_id = [p for p in sparse if p.dim() == 1]
    if per_id:
        per_id_cls = torch.optim.SGD if name == "sgd" else torch.optim.Adagrad
        apply_optimizer_in_backward(per_id_cls, per_id, {"lr": lr, **opt_kw})


DEFAULT_WARMUP_STEPS = 100
DEFAULT_WARMUP_SHARE = 0.25


def default_warmup_steps(total_steps: int) -> int:
    """The warm-up of a run of ``total_steps`` training steps: a quarter of the run, at most
    ``DEFAULT_WARMUP_STEPS``. Adagrad's first steps move every weight by ~lr, so without a
    warm-up the loss jumps (x1.75-2.8 at step 2 on synthetic data); 100 steps keep every step
    <= 1.02x the first on the shared datasets. A short run spent inside a 100-step warm-up never
    trains at its learning rate (12 steps on the Criteo head: worse than a constant
    predictor); a quarter of the run leaves it three quarters at full rate."""
    return max(1, min(DEFAULT_WARMUP_STEPS, int(total_steps * DEFAULT_WARMUP_SHARE)))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: the learning-rate multiplier of training step ``step`` (1-based)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


class Optimizers:
    """The dense optimizer (stepped by the pipeline), the fused sparse optimizers (run inside
    backward by fbgemm / DDP) and one learning-rate knob over all of them.

    The fused TBE optimizers read their lr from ``dmp.fused_optimizer``'s param groups only
    when that KeyedOptimizer's ``zero_grad``/``step`` runs (nothing else calls them when the
    update happens in backward), so :meth:`set_lr` writes the groups and then calls
    ``zero_grad``. Replicated (data-parallel) tables keep their torch optimizers on
    ``param._in_backward_optimizers``; their groups are written directly.

    Attributes: ``dense`` (KeyedOptimizer of the non-embedding parameters), ``fused``
    (``dmp.fused_optimizer`` or None), ``combined`` (both, for checkpoints), ``in_backward``
    (the other in-backward torch optimizers).
    """

    def __init__(self, dmp: nn.Module, dense: Callable[[Any], torch.optim.Optimizer],
                 dense_lr: float, sparse_lr: float, warmup_steps: int = 0) -> None:
        self.dense = KeyedOptimizerWrapper(
            dict(in_backward_optimizer_filter(dmp.named_parameters())), dense)
        self.fused = dmp.fused_optimizer if isinstance(dmp, DistributedModelParallel) else None
        self.combined = CombinedOptimizer(([self.fused] if self.fused else []) + [self.dense])
        fused_ids = {id(g) for g in (self.fused.param_groups if self.fused else [])}
        self.in_backward: List[torch.optim.Optimizer] = [
            opt for p in dmp.parameters() for opt in getattr(p, "_in_backward_optimizers", [])
            if not any(id(g) in fused_ids for g in opt.param_groups)]
        self.dense_lr, self.sparse_lr = dense_lr, sparse_lr
        self.warmup = warmup_steps
        self._factor: Optional[float] = None

    def factor(self, step: int) -> float:
        """The warm-up multiplier of training step ``step`` (1-based)."""
        return warmup_factor(step, self.warmup)

    def before_step(self, step: int) -> None:
        """Set the learning rates for training step ``step`` (1-based) if they change."""
        f = self.factor(step)
        if f != self._factor:
            self.set_lr(self.dense_lr * f, self.sparse_lr * f)
            self._factor = f

    def set_lr(self, dense_lr: float, sparse_lr: float) -> None:
        """Write both learning rates everywhere they are read (fbgemm's TBE modules included)."""
        for group in self.dense.param_groups:
            group["lr"] = dense_lr
        if self.fused is not None:
            for group in self.fused.param_groups:
                group["lr"] = sparse_lr
            self.fused.zero_grad()  # pushes the groups' lr into the fbgemm TBE modules
        for opt in self.in_backward:
            for group in opt.param_groups:
                group["lr"] = sparse_lr

