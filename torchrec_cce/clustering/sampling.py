"""A bounded reservoir of the ids seen in training, for frequency-aware re-clustering.

Reservoir sampling (Vitter's algorithm R, vectorised per batch) keeps a uniform sample of all
id *occurrences* seen so far, so frequent ids appear in proportion to their frequency, in
``capacity`` int64 slots whatever the length of training. The reservoir is training state, not
model state: it is not saved in ``state_dict`` (checkpoints keep it per rank, see
:mod:`torchrec_cce.checkpoint`). Under DMP each rank keeps its share of a table's sample
(``CCETable.share_sample``).
"""

from typing import Any, Optional

import numpy as np
import torch
from torch import nn


class IdReservoir(nn.Module):
    """Uniform sample of observed ids, ``capacity`` slots."""

    def __init__(self, capacity: int, seed: int = 0, device: Optional[torch.device] = None) -> None:
        super().__init__()
        if capacity <= 0:
            raise ValueError(f"IdReservoir capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self.register_buffer("ids", torch.zeros(capacity, dtype=torch.int64, device=device),
                             persistent=False)
        self.seen = 0
        self._generator: Optional[torch.Generator] = None

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    @torch.no_grad()
    def observe(self, ids: torch.Tensor) -> None:
        """Add one batch of id occurrences."""
        if ids.numel() == 0 or ids.is_meta:
            return
        ids = ids.to(self.ids.device, torch.int64)
        n, cap = ids.numel(), self.capacity
        fill = max(0, min(n, cap - self.seen))
        if fill:
            self.ids[self.seen: self.seen + fill] = ids[:fill]
        rest = ids[fill:]
        if rest.numel():
            # Occurrence number t (0-based) replaces a random slot with probability cap / (t+1).
            t = torch.arange(self.seen + fill, self.seen + n, device=ids.device, dtype=torch.float64)
            u = torch.rand(rest.numel(), generator=self._rng(ids.device), device=ids.device,
                           dtype=torch.float64)
            slot = torch.floor(u * (t + 1)).to(torch.int64)
            keep = slot < cap
            self.ids[slot[keep]] = rest[keep]
        self.seen += n

    def sample(self) -> torch.Tensor:
        """The current sample (``min(seen, capacity)`` ids)."""
        return self.ids[: min(self.seen, self.capacity)]

    def reset(self) -> None:
        self.seen = 0


def expected_distinct(draws: int, counts: Any) -> float:
    """Expected number of distinct ids among ``draws`` occurrences drawn in proportion to
    ``counts`` (per-id training frequencies, e.g. the preprocessing counts): ``sum_i 1 -
    exp(-draws * p_i)``, the Poisson approximation of sampling with replacement, which is what
    a reservoir of ``draws`` slots over many more occurrences holds."""
    c = torch.as_tensor(np.asarray(counts), dtype=torch.float64).reshape(-1)
    total = float(c.sum())
    if draws <= 0 or total <= 0:
        return 0.0
    return float((-torch.expm1(-float(draws) / total * c)).sum())
