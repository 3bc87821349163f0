"""Where a table's per-id state lives across ranks, read from its one declaration.

Every method declares its state with one entry per id (:class:`~torchrec_cce.methods.PerIdState`:
CCE's packed ``p``, MEmCom's per-id weights, MPE's master rows). From that declaration alone:

* :func:`stored_id_range`: which ids a rank stores (the one placement rule the sharder and the
  planner's storage reservation share): trainable state is always split by id range (it is
  fetched where the lookup is computed); read-only state (CCE's ``p``) is split only when the
  world has several ranks and the state is at least ``replicate_below`` bytes, else every rank
  keeps it whole;
* :func:`state_bytes_per_rank`: the bytes of that placement on each rank, plus the small state
  every rank keeps whole;
* :func:`sharded_state` / :func:`load_state`: one rank's slice as a piece of the whole tensor (a
  ShardedTensor, so ``torch.distributed.checkpoint`` saves and reshards it), and back.
"""

from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata

from torchrec_cce.distributed.assignment import DEFAULT_REPLICATE_ASSIGNMENT_BELOW
from torchrec_cce.distributed.id_routing import IdRange
from torchrec_cce.methods.base import CompressedTable, PerIdState


def stored_id_range(method: CompressedTable, rank: int, world_size: int,
                    replicate_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW
                    ) -> Optional[IdRange]:
    """The id range of ``method``'s per-id state that ``rank`` stores, or None when every rank
    stores all of it (no per-id state, or read-only state kept whole)."""
    states = method.per_id_state()
    if not states:
        return None
    if not any(s.trainable for s in states):
        if world_size == 1 or sum(s.total_bytes for s in states) < replicate_below:
            return None
    num_ids = {s.num_ids for s in states}
    if len(num_ids) != 1:
        raise ValueError(f"table '{method.table_name}': its per-id states cover different id "
                         f"counts {sorted(num_ids)}; one id range cannot split them")
    align = max(s.align for s in states)
    return IdRange(num_ids.pop(), rank, world_size, align=align)


def state_bytes_per_rank(method: CompressedTable, world_size: int,
                         replicate_below: int = DEFAULT_REPLICATE_ASSIGNMENT_BELOW) -> List[int]:
    """Bytes of ``method``'s non-codebook state on each rank: its per-id state as
    :func:`stored_id_range` places it, plus the replicated state and the rank's share of the
    training samples (CCE's id reservoir) on every rank."""
    out = []
    for rank in range(world_size):
        rng = stored_id_range(method, rank, world_size, replicate_below)
        per_id = sum(s.total_bytes if rng is None else s.bytes_of(rng.hi - rng.lo)
                     for s in method.per_id_state())
        out.append(per_id + method.replicated_state_bytes() + method.sample_bytes(world_size))
    return out


def sharded_state(local: torch.Tensor, state: PerIdState, rng: IdRange,
                  group: Optional[dist.ProcessGroup]) -> ShardedTensor:
    """``local`` (this rank's entries of ids ``[rng.lo, rng.hi)``) as its piece of the whole
    ``[state.entries(num_ids), ...]`` tensor."""
    trailing = list(local.shape[1:])
    shards = []
    if local.shape[0]:
        meta = ShardMetadata(shard_offsets=[state.entries(rng.lo)] + [0] * len(trailing),
                             shard_sizes=[local.shape[0]] + trailing,
                             placement=f"rank:{rng.rank}/{local.device}")
        shards.append(Shard(tensor=local, metadata=meta))
    return ShardedTensor._init_from_local_shards(
        shards, tuple([state.entries(state.num_ids)] + trailing), process_group=group)


@torch.no_grad()
def load_state(target: torch.Tensor, value: Any, state: PerIdState, rng: IdRange,
               key: str) -> None:
    """Copy this rank's entries of a saved state into ``target``: from a ShardedTensor of any
    world size (its local shards, as DCP's resharding load gives them) or the whole tensor."""
    first = state.entries(rng.lo)
    if isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            lo, n = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
            piece = target[lo - first: lo - first + n]  # (reshape: the 1-D MEmCom
            piece.copy_(shard.tensor.reshape(piece.shape))  # weights of older saves)
        return
    total = state.entries(state.num_ids)
    if value.shape[0] != total:
        raise ValueError(f"{key}: expected a ShardedTensor or the whole tensor of {total} "
                         f"entries ({state.num_ids} ids), got shape {tuple(value.shape)}")
    target.copy_(value[first: first + target.shape[0]].reshape(target.shape))
