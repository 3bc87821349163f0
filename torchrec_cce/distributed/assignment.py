"""CCE's learned assignment ``p`` (bit-packed, covered ids ``[0, N)``) sharded by id range.

Rank ``r`` stores the packed words of ids ``[r * per, min(N, (r + 1) * per))``, with
``per = ceil(N / world)`` rounded up to the packing's id alignment so that every range starts
on a word boundary: the ranks' words are consecutive pieces of the one packed array (how it is
checkpointed and resharded). So the O(V) state of a CCE table costs about
``N * chunks * bits / 8 / world`` bytes per rank. A forward pass routes each covered id to its
owner and back with two ``all_to_all_single`` calls (plus one for the counts), batched over
every id-range table of the module; other ids (uncovered ``[N, V)``, or outside ``[0, V)``)
never travel: they use the hash fallback locally (see ``CCETable.lookup_assignment``).
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from torchrec_cce.methods.cce import CCETable


@dataclass
class IdRange:
    """The id range ``[lo, hi)`` of ``p`` stored on ``rank`` (``per`` ids per rank, a multiple
    of ``align``)."""

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


def _all_to_all(values: torch.Tensor, send_counts: List[int], recv_counts: List[int],
                group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    out = values.new_empty((sum(recv_counts),) + tuple(values.shape[1:]))
    dist.all_to_all_single(out, values.contiguous(), recv_counts, send_counts, group=group)
    return out


@torch.no_grad()
def lookup_sharded_assignments(
    requests: List[Tuple[CCETable, torch.Tensor, IdRange]],
    group: Optional[dist.ProcessGroup] = None,
) -> List[torch.Tensor]:
    """``p(x)`` for every request ``(method, ids, id_range)``, fetched from owners (``method``
    stores this rank's range, ``id_range``).

    Every rank must call this with the same tables in the same order (the module's forward does).
    Returns one ``[len(ids), chunks]`` int64 tensor per request.
    """
    world = dist.get_world_size(group)
    device = requests[0][1].device if requests else torch.device("cpu")
    max_chunks = max((m.chunks for m, _, _ in requests), default=1)
    # Encode (table, local row) as one int64: base offset of the table + row within the owner.
    bases, offset = [], 0
    for _, _, rng in requests:
        bases.append(offset)
        offset += rng.per
    codes, owners, positions = [], [], []
    for (m, ids, rng), base in zip(requests, bases):
        inside = (ids >= 0) & (ids < m.assigned_ids)
        pos = torch.nonzero(inside).squeeze(1)
        x = ids[pos]
        owner = torch.div(x, rng.per, rounding_mode="floor")
        codes.append(base + x - owner * rng.per)
        owners.append(owner)
        positions.append(pos)
    all_codes = torch.cat(codes) if codes else torch.empty(0, dtype=torch.int64, device=device)
    all_owners = torch.cat(owners) if owners else torch.empty(0, dtype=torch.int64, device=device)
    order = torch.argsort(all_owners, stable=True)
    send = torch.bincount(all_owners, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    send_counts, recv_counts = send.tolist(), recv.tolist()
    incoming = _all_to_all(all_codes[order], send_counts, recv_counts, group)

    # Owner side: decode and gather from the local shards.
    answer = torch.zeros(incoming.numel(), max_chunks, dtype=torch.int64, device=device)
    base_t = torch.tensor(bases, dtype=torch.int64, device=device)
    which = torch.searchsorted(base_t, incoming, right=True) - 1
    for t, (m, _, _) in enumerate(requests):
        sel = torch.nonzero(which == t).squeeze(1)
        if sel.numel():
            answer[sel, : m.chunks] = m.read_assignment(incoming[sel] - bases[t] + m.stored_lo)
    replies = _all_to_all(answer, recv_counts, send_counts, group)

    # Back in request order; uncovered ids and ids outside [0, V) use the hash fallback.
    unsorted = torch.empty_like(replies)
    unsorted[order] = replies
    out, start = [], 0
    for (m, ids, _), pos in zip(requests, positions):
        p = m.hash_assignment(ids)
        n = pos.numel()
        p[pos] = unsorted[start: start + n, : m.chunks]
        start += n
        out.append(p)
    return out


