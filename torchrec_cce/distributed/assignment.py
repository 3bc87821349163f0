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

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from torchrec_cce.distributed.id_routing import IdRange, return_to_requesters, route_to_owners
from torchrec_cce.methods.cce import CCETable

# Assignments smaller than this (bytes) are replicated on every rank instead of split by id.
DEFAULT_REPLICATE_ASSIGNMENT_BELOW = 1 << 20


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
    max_chunks = max((m.chunks for m, _, _ in requests), default=1)
    # Only covered ids [0, N) travel; the rest use the hash fallback locally.
    covered = [(ids >= 0) & (ids < m.assigned_ids) for m, ids, _ in requests]
    positions = [torch.nonzero(c).squeeze(1) for c in covered]
    routed = route_to_owners([ids[pos] for (_, ids, _), pos in zip(requests, positions)],
                             [rng for _, _, rng in requests], group)
    # Owner side: read the local packed words.
    answer = torch.zeros(routed.incoming.numel(), max_chunks, dtype=torch.int64,
                         device=routed.incoming.device)
    for t, (m, _, _) in enumerate(requests):
        sel, rows = routed.rows_for(t)
        if sel.numel():
            answer[sel, : m.chunks] = m.read_assignment(rows + m.stored_lo)
    replies = return_to_requesters(routed, answer, group)
    out = []
    for (m, ids, _), c, pos, reply in zip(requests, covered, positions, replies):
        if pos.numel() == ids.numel():  # every id covered (the usual case): no hash needed
            out.append(reply[:, : m.chunks].contiguous())
            continue
        p = torch.empty(ids.numel(), m.chunks, dtype=torch.int64, device=ids.device)
        p[pos] = reply[:, : m.chunks]
        rest = torch.nonzero(~c).squeeze(1)
        p[rest] = m.hash_assignment(ids[rest])
        out.append(p)
    return out
