"""Per-id state (O(V)) sharded across ranks by id range and fetched at lookup time.

Used for MEmCom's per-id weights (one float per id) and MPE's fp32 master weights (one row of
``dim`` floats per id). Rank ``r`` owns ids ``[r * per, min(V, (r + 1) * per))`` with ``per =
ceil(V / world)``, the same split as CCE's assignment
(:class:`~torchrec_cce.distributed.id_routing.IdRange`). A lookup sends each id to its owner
and the owner's rows back with ``all_to_all_single``; the reply goes through
``torch.distributed.nn.functional.all_to_all_single``, whose backward is the reverse
all-to-all, so each row's gradient arrives at its owner's shard (a plain ``nn.Parameter``) and
is stepped there by its optimizer (in backward: :func:`per_id_fused_optimizer`).

Autograd across ranks needs every rank to run the same backward collectives in the same order:
:func:`fetch_per_id_rows` returns, besides the rows, a zero scalar that depends on the reply;
the sharded module adds it to its codebook outputs, so a rank that looked up nothing still
joins the backward all-to-all, right after the codebooks' output all-to-all like every other
rank.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from torchrec_cce.distributed.id_routing import IdRange, return_to_requesters, route_to_owners

# (ids in [0, V), range, local shard): a 1-D shard holds one value per id, a 2-D one a row.
PerIdRequest = Tuple[torch.Tensor, IdRange, torch.Tensor]


def fetch_per_id_rows(requests: List[PerIdRequest], group: Optional[dist.ProcessGroup] = None,
                      sparse_grad: Union[bool, Sequence[bool]] = False
                      ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """``(rows, anchor)``: ``rows[i][j]`` = the value (1-D shard) or row (2-D shard) of
    ``requests[i]``'s id ``j``, fetched from its owner (differentiable with respect to every
    owner's shard); ``anchor`` is a zero scalar to add to the module's output (see the module
    docstring).

    ``sparse_grad=True`` (or one flag per request) gathers 2-D rows with ``F.embedding(...,
    sparse=True)``: the shard's gradient is a sparse COO tensor of the rows asked for (its
    optimizer must accept sparse gradients, e.g. :class:`torchrec_cce.optim.RowWiseAdagrad`).
    Tables of different widths go through one all-to-all (rows padded to the widest).

    Every rank must call this once per step with the same tables in the same order (it may
    pass an empty ``ids`` tensor). Ids must already be reduced to ``[0, V)``.
    """
    routed = route_to_owners([ids for ids, _, _ in requests], [rng for _, rng, _ in requests],
                             group)
    widths = [1 if shard.dim() == 1 else shard.shape[1] for _, _, shard in requests]
    sparse = ([bool(sparse_grad)] * len(requests) if isinstance(sparse_grad, bool)
              else list(sparse_grad))
    width = max(widths, default=1)
    # Owner side: gather the requested rows from the local shards (differentiably).
    served = torch.zeros(routed.incoming.numel(), width, dtype=torch.float32,
                         device=routed.incoming.device)
    for t, (_, _, shard) in enumerate(requests):
        sel, rows = routed.rows_for(t)
        if shard.dim() == 1:
            values = shard[rows].float().unsqueeze(1)
        else:
            values = F.embedding(rows, shard, sparse=sparse[t]).float()
        served = served.index_put((sel,), F.pad(values, (0, width - widths[t])))
    out = return_to_requesters(routed, served, group, differentiable=True)
    anchor = torch.cat(out).sum() * 0.0 if out else served.sum() * 0.0
    rows_out = [x[:, 0] if shard.dim() == 1 else x[:, :w]
                for x, w, (_, _, shard) in zip(out, widths, requests)]
    return rows_out, anchor


def fetch_per_id_weights(requests: List[PerIdRequest], group: Optional[dist.ProcessGroup] = None,
                         sparse_grad: Union[bool, Sequence[bool]] = False
                         ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """:func:`fetch_per_id_rows` for shards of one value per id (1-D, or a ``[n, 1]`` column
    like MEmCom's per-id weights): ``weights[i][j]`` = the weight of ``requests[i]``'s id
    ``j`` (1-D)."""
    rows, anchor = fetch_per_id_rows(requests, group, sparse_grad)
    return [r.reshape(-1) for r in rows], anchor


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
    """``local`` (this rank's ``[hi - lo, ...]`` slice of a ``[V, ...]`` tensor: per-id values,
    rows, or a per-row optimizer state) as a ShardedTensor view, so that DCP saves and
    reshards it."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata

    trailing = list(local.shape[1:])
    shards = []
    if rng.hi > rng.lo:
        meta = ShardMetadata(shard_offsets=[rng.lo] + [0] * len(trailing),
                             shard_sizes=[rng.hi - rng.lo] + trailing,
                             placement=f"rank:{rng.rank}/{local.device}")
        shards.append(Shard(tensor=local, metadata=meta))
    return ShardedTensor._init_from_local_shards(shards, tuple([rng.num_ids] + trailing),
                                                 process_group=group)


def per_id_fused_optimizer(entries: List[Tuple[str, torch.nn.Parameter, IdRange]],
                           group: Optional[dist.ProcessGroup]):  # noqa: ANN201 - FusedOptimizer
    """The in-backward optimizers of the per-id state as one TorchRec ``FusedOptimizer``
    whose params and per-id states (Adagrad's ``sum`` of the param's shape, row-wise Adagrad's
    ``[rows, 1]`` ``sum``: any state with one entry per stored id) are ShardedTensor views by id
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
                per_id = (torch.is_tensor(value) and value.dim() >= 1
                          and value.shape[0] == param.shape[0])
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
