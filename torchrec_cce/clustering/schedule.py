"""When to re-cluster: a hook for the training loop (nothing is hidden inside ``forward``).

The paper re-clusters a few times early in training: after 1/4 and 1/2 of the first epoch for
one-epoch runs, and once per epoch for the first epochs of multi-epoch runs.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from torchrec_cce.clustering.recluster import recluster


@dataclass
class ReclusterSchedule:
    """Re-cluster after the given global steps (1-based: ``at_steps=[100]`` fires after the
    100th optimizer step).

    Example::

        schedule = ReclusterSchedule.from_epochs(steps_per_epoch=len(loader),
                                                 fractions=[0.25, 0.5])
        for step, batch in enumerate(loader, start=1):
            train_step(batch)
            schedule.step(model, step, optimizers=[dense_opt])
    """

    at_steps: List[int] = field(default_factory=list)
    iters: int = 10

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.at_steps):
            raise ValueError(f"ReclusterSchedule steps must be >= 1, got {self.at_steps}")
        self.at_steps = sorted(set(int(s) for s in self.at_steps))

    @classmethod
    def from_epochs(cls, steps_per_epoch: int, fractions: Sequence[float] = (),
                    every_epoch: int = 0, iters: int = 10) -> "ReclusterSchedule":
        """``fractions`` of the first epoch (e.g. ``[0.25, 0.5]``) and/or the end of each of the
        first ``every_epoch`` epochs."""
        if steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        bad = [f for f in fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"recluster fractions must be in (0, 1], got {bad}")
        steps = [max(1, round(f * steps_per_epoch)) for f in fractions]
        steps += [(e + 1) * steps_per_epoch for e in range(every_epoch)]
        return cls(at_steps=steps, iters=iters)

    def due(self, step: int) -> bool:
        return step in self.at_steps

    def step(self, model: nn.Module, step: int,
             optimizers: Sequence[torch.optim.Optimizer] = ()) -> Optional[Dict[str, Dict]]:
        """Call after optimizer step ``step``; re-clusters (collectively) when due."""
        if not self.due(step):
            return None
        return recluster(model, optimizers=optimizers, iters=self.iters)
