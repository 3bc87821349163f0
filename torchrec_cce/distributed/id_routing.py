"""Routing ids to the ranks that own them, for O(V) per-id state sharded by id range.

CCE's assignment ``p`` and MEmCom's per-id weights are split the same way: rank ``r`` owns ids
``[r * per, min(V, (r + 1) * per))`` (:class:`IdRange`). A lookup is two all-to-alls:
:func:`route_to_owners` sends every requested id to its owner (batched over tables: each id is
encoded as ``table base + row within the owner's shard``), the owner answers each request
from its local shard, and :func:`return_to_requesters` sends the answers back and restores
request order. The caller chooses what an answer is (packed ``p`` words, a weight) and
whether the way back is differentiable.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class IdRange:
    """The id range ``[lo, hi)`` of a length-``num_ids`` state stored on ``rank`` (``per``
    ids per rank, a multiple of ``align``)."""

    num_ids: int
    rank: int
    world_size: int
    align: int = 1

    @property
    def per(self) -> int:
        per = -(-self.num_ids // self.world_size)
        return max(self.align, -(-per // self.align) * self.align)

    @property
    def lo(self) -> int:
        return min(self.num_ids, self.rank * self.per)

    @property
    def hi(self) -> int:
        return min(self.num_ids, (self.rank + 1) * self.per)


def all_to_all(values: torch.Tensor, send_counts: List[int], recv_counts: List[int],
               group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Non-differentiable ``all_to_all_single`` of rows of ``values``."""
    out = values.new_empty((sum(recv_counts),) + tuple(values.shape[1:]))
    dist.all_to_all_single(out, values.contiguous(), recv_counts, send_counts, group=group)
    return out


@dataclass
class RoutedIds:
    """One round of requests, as the owner sees it and as the requester gets it back.

    ``rows_for(t)`` gives, for table ``t``, the positions in ``incoming`` asked of it and the
    rows of this rank's shard they address; the owner fills an answer tensor with one row per
    ``incoming`` entry and passes it to :func:`return_to_requesters`.
    """

    incoming: torch.Tensor     # encoded (table base + local row) requests received by this rank
    which: torch.Tensor        # table index of each incoming request
    bases: List[int]           # table base offsets of the encoding
    order: torch.Tensor        # requests sorted by owner (stable): sent[i] = requests[order[i]]
    send_counts: List[int]
    recv_counts: List[int]
    sizes: List[int]           # requests per table, in request order

    def rows_for(self, table: int):  # noqa: ANN201 - (positions, local rows)
        sel = torch.nonzero(self.which == table).squeeze(1)
        return sel, self.incoming[sel] - self.bases[table]


def route_to_owners(ids: Sequence[torch.Tensor], ranges: Sequence[IdRange],
                    group: Optional[dist.ProcessGroup] = None) -> RoutedIds:
    """Send ``ids[t]`` (ids in ``[0, ranges[t].num_ids)``) to their owners. Every rank must
    call this with the same tables in the same order (it may pass empty id tensors)."""
    world = dist.get_world_size(group)
    device = ids[0].device if ids else torch.device("cpu")
    bases, offset = [], 0
    for rng in ranges:
        bases.append(offset)
        offset += rng.per
    codes, owners = [], []
    for x, rng, base in zip(ids, ranges, bases):
        owner = torch.div(x, rng.per, rounding_mode="floor")
        codes.append(base + x - owner * rng.per)
        owners.append(owner)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    all_codes = torch.cat(codes) if codes else empty
    all_owners = torch.cat(owners) if owners else empty
    order = torch.argsort(all_owners, stable=True)
    send = torch.bincount(all_owners, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    send_counts, recv_counts = send.tolist(), recv.tolist()
    incoming = all_to_all(all_codes[order], send_counts, recv_counts, group)
    if bases:
        base_t = torch.tensor(bases, dtype=torch.int64, device=device)
        which = torch.searchsorted(base_t, incoming, right=True) - 1
    else:
        which = incoming
    return RoutedIds(incoming, which, bases, order, send_counts, recv_counts,
                     [int(x.numel()) for x in ids])


def return_to_requesters(routed: RoutedIds, answers: torch.Tensor,
                         group: Optional[dist.ProcessGroup] = None,
                         differentiable: bool = False) -> List[torch.Tensor]:
    """Send the owner's ``answers`` (one row per ``routed.incoming``) back; returns one tensor
    per table in request order. ``differentiable=True`` uses
    ``torch.distributed.nn.functional.all_to_all_single``, whose backward returns each
    gradient to the owner."""
    shape = (sum(routed.send_counts),) + tuple(answers.shape[1:])
    if differentiable:
        import torch.distributed.nn.functional as dist_nn

        replies = dist_nn.all_to_all_single(answers.new_empty(shape), answers,
                                            output_split_sizes=routed.send_counts,
                                            input_split_sizes=routed.recv_counts, group=group)
    else:
        replies = all_to_all(answers, routed.recv_counts, routed.send_counts, group)
    if not routed.sizes:
        return []
    inverse = torch.empty_like(routed.order)
    inverse[routed.order] = torch.arange(routed.order.numel(), device=routed.order.device)
    return list(torch.split(replies[inverse], routed.sizes))


__all__ = ["IdRange", "RoutedIds", "all_to_all", "return_to_requesters", "route_to_owners"]
