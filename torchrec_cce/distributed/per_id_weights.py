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
import torch.distributed.nn.functional as dist_nn

from torchrec_cce.distributed.assignment import IdRange

PerIdRequest = Tuple[torch.Tensor, IdRange, torch.Tensor]  # (ids in [0, V), range, local shard)


def _all_to_all(values: torch.Tensor, send_counts: List[int], recv_counts: List[int],
                group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    out = values.new_empty((sum(recv_counts),) + tuple(values.shape[1:]))
    dist.all_to_all_single(out, values.contiguous(), recv_counts, send_counts, group=group)
    return out


def fetch_per_id_weights(requests: List[PerIdRequest], group: Optional[dist.ProcessGroup] = None
                         ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """``(weights, anchor)``: ``weights[i][j]`` = the per-id weight of ``requests[i]``'s id ``j``,
    fetched from its owner (differentiable with respect to every owner's shard); ``anchor`` is
    a zero scalar to add to the module's output (see the module docstring).

    Every rank must call this once per step with the same tables in the same order (it may
    pass an empty ``ids`` tensor). Ids must already be reduced to ``[0, V)``.
    """
    world = dist.get_world_size(group)
    device = requests[0][2].device if requests else torch.device("cpu")
    bases, offset = [], 0
    for _, rng, _ in requests:
        bases.append(offset)
        offset += rng.per
    codes, owners = [], []
    for (ids, rng, _), base in zip(requests, bases):
        owner = torch.div(ids, rng.per, rounding_mode="floor")
        codes.append(base + ids - owner * rng.per)
        owners.append(owner)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    all_codes = torch.cat(codes) if codes else empty
    all_owners = torch.cat(owners) if owners else empty
    order = torch.argsort(all_owners, stable=True)
    send = torch.bincount(all_owners, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    send_counts, recv_counts = send.tolist(), recv.tolist()
    incoming = _all_to_all(all_codes[order], send_counts, recv_counts, group)

    # Owner side: gather the requested weights from the local shards (differentiably).
    served = torch.zeros(incoming.numel(), dtype=torch.float32, device=device)
    if requests:
        base_t = torch.tensor(bases, dtype=torch.int64, device=device)
        which = torch.searchsorted(base_t, incoming, right=True) - 1
        for t, (_, _, shard) in enumerate(requests):
            sel = torch.nonzero(which == t).squeeze(1)
            served = served.index_put((sel,), shard[incoming[sel] - bases[t]].float())
    reply = dist_nn.all_to_all_single(served.new_empty(sum(send_counts)), served,
                                      output_split_sizes=send_counts,
                                      input_split_sizes=recv_counts, group=group)
    # Back in request order.
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    in_order = reply[inverse]
    out, start = [], 0
    for ids, _, _ in requests:
        out.append(in_order[start: start + ids.numel()])
        start += ids.numel()
    return out, reply.sum() * 0.0


class ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad * ctx.scale, None
