"""MEmCom's per-id weights (one float per id, O(V)) sharded across ranks by id range.

Rank ``r`` owns ids ``[r * per, min(V, (r + 1) * per))`` with ``per = ceil(V / world)``, the
same split as CCE's assignment (:class:`~torchrec_cce.distributed.assignment.IdRange`). A
lookup sends each id to its owner and the owner's weights back with ``all_to_all_single``;
the reply goes through ``torch.distributed.nn.functional.all_to_all_single``, whose backward
is the reverse all-to-all, so each weight's gradient arrives at its owner's shard (a plain
``nn.Parameter``) and is stepped there by its optimizer.

Autograd across ranks needs every rank to run the same backward collectives in the same order:
:func:`fetch_per_id_weights` returns, besides the weights, a zero scalar that depends on the
reply; the sharded module adds it to its codebook outputs, so a rank that looked up nothing
still joins the backward all-to-all, right after the codebooks' output all-to-all like every
other rank.
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from torchrec_cce.distributed.id_routing import IdRange, return_to_requesters, route_to_owners

PerIdRequest = Tuple[torch.Tensor, IdRange, torch.Tensor]  # (ids in [0, V), range, local shard)


def fetch_per_id_weights(requests: List[PerIdRequest], group: Optional[dist.ProcessGroup] = None
                         ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """``(weights, anchor)``: ``weights[i][j]`` = the per-id weight of ``requests[i]``'s id ``j``,
    fetched from its owner (differentiable with respect to every owner's shard); ``anchor`` is
    a zero scalar to add to the module's output (see the module docstring).

    Every rank must call this once per step with the same tables in the same order (it may
    pass an empty ``ids`` tensor). Ids must already be reduced to ``[0, V)``.
    """
    routed = route_to_owners([ids for ids, _, _ in requests], [rng for _, rng, _ in requests],
                             group)
    # Owner side: gather the requested weights from the local shards (differentiably).
    served = torch.zeros(routed.incoming.numel(), dtype=torch.float32,
                         device=routed.incoming.device)
    for t, (_, _, shard) in enumerate(requests):
        sel, rows = routed.rows_for(t)
        served = served.index_put((sel,), shard[rows].float())
    out = return_to_requesters(routed, served, group, differentiable=True)
    anchor = torch.cat(out).sum() * 0.0 if out else served.sum() * 0.0
    return out, anchor


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad * ctx.scale, None


def id_range_sharded(local: torch.Tensor, rng: IdRange,
                     group: Optional[dist.ProcessGroup]) -> "ShardedTensor":
    """``local`` (this rank's ``[hi - lo]`` slice of a length-``V`` tensor) as a ShardedTensor
    view, so that DCP saves and reshards it."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata

    shards = []
    if rng.hi > rng.lo:
        meta = ShardMetadata(shard_offsets=[rng.lo], shard_sizes=[rng.hi - rng.lo],
                             placement=f"rank:{rng.rank}/{local.device}")
        shards.append(Shard(tensor=local, metadata=meta))
    return ShardedTensor._init_from_local_shards(shards, (rng.num_ids,), process_group=group)


def per_id_fused_optimizer(entries: List[Tuple[str, torch.nn.Parameter, IdRange]],
                           group: Optional[dist.ProcessGroup]):  # noqa: ANN201 - FusedOptimizer
    """The in-backward optimizers of the per-id weights as one TorchRec ``FusedOptimizer``
    whose params and per-id states (e.g. Adagrad's ``sum``) are ShardedTensor views by id
    range, so ``dmp.fused_optimizer`` checkpoints them with DCP like the codebooks' states.
    None if no entry has an in-backward optimizer."""
    from torchrec.optim.fused import FusedOptimizer

    params, state, groups = {}, {}, []
    for key, param, rng in entries:
        opts = getattr(param, "_in_backward_optimizers", [])
        if not opts:
            continue
        view = id_range_sharded(param.detach(), rng, group)
        params[key] = view
        entry = {}
        for opt in opts:
            for name, value in opt.state.get(param, {}).items():
                per_id = torch.is_tensor(value) and value.shape == param.shape
                entry[name] = id_range_sharded(value, rng, group) if per_id else value
            groups.append({**{k: v for k, v in opt.param_groups[0].items() if k != "params"},
                           "params": [view]})
        state[view] = entry
    if not params:
        return None

    class _PerIdFusedOptimizer(FusedOptimizer):
        def step(self, closure=None) -> None:  # noqa: ANN001 - stepped in backward
            pass

        def zero_grad(self, set_to_none: bool = False) -> None:
            pass

    return _PerIdFusedOptimizer(params, state, groups)
