"""Training-loop hooks that change a model's compressed state between steps (nothing is hidden
inside ``forward``): :class:`ReclusterSchedule` (CCE re-clustering), :class:`MPESchedule`
(MPE's warm-up -> search -> select -> retrain) and :class:`MigrationSchedule` (online hot
tiers). Every rank calls them at the same steps.

**Hot-tier migration.** An ``OnlineTieredConfig`` table migrates after every
``migrate_every``-th global step (its sketch's hot set becomes the hot tier).

**Re-clustering.** The paper re-clusters a few times early in training: after 1/4 and 1/2 of the
first epoch for one-epoch runs, and once per epoch for the first epochs of multi-epoch runs.

**MPE.** Call :meth:`MPESchedule.step` after every optimizer step, and add
:func:`~torchrec_cce.api.mpe_penalty` to the loss::

    schedule = MPESchedule(search_steps=len(loader))     # e.g. search for one epoch
    for step, batch in enumerate(loader, start=1):
        loss = criterion(model(batch)) + mpe_penalty(model)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        schedule.step(model, step, optimizers=[optimizer])

Stages (global optimizer steps, 1-based):

* ``1 .. warmup_steps``: tables without per-id counts count the ids they see (rows
  unquantised); after step ``warmup_steps`` their frequency groups are built (collective under
  DMP: counts are summed over ranks) and they start searching. Tables with counts search from
  step 1.
* until step ``warmup_steps + search_steps``: search (mixture of widths, memory penalty);
* after it: selection and restart (:meth:`~torchrec_cce.methods.mpe.MPETable.select`), then
  retraining at the frozen widths until training ends (the training script's best-epoch
  selection plays the paper's early stopping).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from torchrec_cce.api import migrate_hot, mpe_tables, recluster
from torchrec_cce.clustering.recluster import LLOYD_ITERS
from torchrec_cce.methods import OnlineTieredTable
from torchrec_cce.methods.mpe import WARMUP


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
    iters: int = LLOYD_ITERS

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.at_steps):
            raise ValueError(f"ReclusterSchedule steps must be >= 1, got {self.at_steps}")
        self.at_steps = sorted(set(int(s) for s in self.at_steps))

    @classmethod
    def from_epochs(cls, steps_per_epoch: int, fractions: Sequence[float] = (),
                    every_epoch: int = 0, iters: int = LLOYD_ITERS) -> "ReclusterSchedule":
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


@dataclass
class MPESchedule:
    """Search for ``search_steps`` steps after an optional warm-up, then select and retrain."""

    search_steps: int
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.search_steps <= 0:
            raise ValueError(f"MPESchedule.search_steps must be >= 1, got {self.search_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"MPESchedule.warmup_steps must be >= 0, got {self.warmup_steps}")

    @property
    def select_step(self) -> int:
        return self.warmup_steps + self.search_steps

    def due(self, step: int) -> bool:
        return (self.warmup_steps > 0 and step == self.warmup_steps) or step == self.select_step

    def step(self, model: nn.Module, step: int,
             optimizers: Sequence[torch.optim.Optimizer] = ()) -> Optional[Dict[str, Dict]]:
        """Call after optimizer step ``step``. Returns ``{table: event}`` when something
        happened (groups built, or widths selected), else None."""
        tables = mpe_tables(model)
        if step == 1 and self.warmup_steps == 0:
            missing = [t.table_name for t in tables if int(t.stage) == WARMUP]
            if missing:
                raise ValueError(
                    f"MPE tables {missing} have no per-id counts and MPESchedule has no "
                    f"warm-up; pass MPEConfig(counts=...) or MPESchedule(warmup_steps=N)")
        if not self.due(step):
            return None
        events: Dict[str, Dict] = {}
        if self.warmup_steps > 0 and step == self.warmup_steps:
            for t in tables:
                if int(t.stage) == WARMUP:
                    t.build_groups()
                    events[t.table_name] = {"event": "groups_built"}
        if step == self.select_step:
            for t in tables:
                widths = t.select(optimizers)
                sizes = t.group_sizes()
                events[t.table_name] = {
                    "event": "selected",
                    "bits_per_group": widths.tolist(),
                    "mean_bits": float((widths * sizes).sum()) / float(sizes.sum()),
                }
        return events


@dataclass
class MigrationSchedule:
    """Migrate the online hot tiers of a model after every step that is a multiple of a
    table's ``migrate_every`` (``OnlineTieredConfig``); ``every``: those periods.

    Example::

        schedule = MigrationSchedule.from_model(model)
        for step, batch in enumerate(loader, start=1):
            train_step(batch)
            schedule.step(model, step, optimizers=[dense_opt])
    """

    every: List[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if any(e <= 0 for e in self.every):
            raise ValueError(f"MigrationSchedule periods must be >= 1, got {self.every}")
        self.every = sorted(set(int(e) for e in self.every))

    @classmethod
    def from_model(cls, model: nn.Module) -> "MigrationSchedule":
        """The ``migrate_every`` of every online tiered table in ``model``."""
        return cls(every=[m.migrate_every for m in model.modules()
                          if isinstance(m, OnlineTieredTable)])

    def due(self, step: int) -> bool:
        return any(step % e == 0 for e in self.every)

    def step(self, model: nn.Module, step: int,
             optimizers: Sequence[torch.optim.Optimizer] = ()) -> Optional[Dict[str, Dict]]:
        """Call after optimizer step ``step``; migrates (collectively) the tables due."""
        if not self.due(step):
            return None
        return migrate_hot(model, optimizers=optimizers, step=step)
