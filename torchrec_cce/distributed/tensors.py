"""Reading and writing whole tables through their sharded state-dict values.

A sharded codebook's state-dict value is a ``ShardedTensor`` (or ``DTensor``) whose local shards
are views of the TBE weights, or a plain replicated tensor (data parallel). These helpers place
local pieces into a full tensor (all-reduced across ranks) and write a full tensor back.
"""

from typing import Any, List, Tuple

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor


def local_pieces(value: Any) -> List[Tuple[torch.Tensor, List[int]]]:
    """(local tensor, global offsets) pieces of a state-dict value; a plain tensor is one
    replicated piece at offset 0."""
    if isinstance(value, ShardedTensor):
        return [(s.tensor, list(s.metadata.shard_offsets)) for s in value.local_shards()]
    if isinstance(value, DTensor):
        local = value.to_local()
        if hasattr(local, "local_shards"):
            return list(zip(local.local_shards(), [list(o) for o in local.local_offsets()]))
        raise TypeError(f"unsupported DTensor layout for re-clustering: {value.placements}")
    return [(value, [0] * value.dim())]


def gather_full(value: Any, shape: Tuple[int, int], collective: Any) -> torch.Tensor:
    """The full table from its local pieces (sharded: placed and all-reduced; replicated: as is)."""
    if not isinstance(value, (ShardedTensor, DTensor)):
        return value.detach().float().clone()
    pieces = local_pieces(value)
    device = pieces[0][0].device if pieces else torch.device("cpu")
    full = torch.zeros(shape, device=device)
    for tensor, (r, c) in pieces:
        full[r: r + tensor.shape[0], c: c + tensor.shape[1]] = tensor.float()
    return collective.all_reduce_sum(full)


def scatter_full(value: Any, full: torch.Tensor) -> None:
    """Write ``full`` into this rank's pieces of a state-dict value (views of the TBE weights)."""
    for tensor, offsets in local_pieces(value):
        index = tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))
        tensor.copy_(full[index].to(tensor.dtype))


