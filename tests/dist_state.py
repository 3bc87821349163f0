"""Test helpers for DMP-wrapped collections: full tensors of a sharded state dict, and a
wrapper module returning the pooled tensor."""

from typing import Dict

import torch
import torch.distributed as dist
from torchrec import KeyedJaggedTensor

from torchrec_cce.distributed.tensors import local_pieces


def gathered_state(dmp: torch.nn.Module, strip: str = "") -> Dict[str, torch.Tensor]:
    """Every state-dict value as a full tensor (local pieces placed, then summed over ranks);
    ``strip``: a key prefix removed once."""
    out = {}
    for key, value in dmp.state_dict().items():
        if strip:
            key = key.replace(strip, "", 1)
        if not hasattr(value, "local_shards") and not hasattr(value, "to_local"):
            out[key] = value.detach().clone()
            continue
        full = torch.zeros(tuple(value.size()))
        for t, off in local_pieces(value):
            full[tuple(slice(o, o + n) for o, n in zip(off, t.shape))] = t.float()
        dist.all_reduce(full)
        out[key] = full
    return out


class PooledValues(torch.nn.Module):
    """Returns the pooled tensor (DDP needs a tensor output to all-reduce in its first step)."""

    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(features).values()
