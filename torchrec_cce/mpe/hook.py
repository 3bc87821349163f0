"""The MPE training-loop hook: warm-up -> search -> select -> retrain (nothing hidden in forward).

Like :class:`~torchrec_cce.clustering.schedule.ReclusterSchedule`, call :meth:`MPESchedule.step`
after every optimizer step, and add :func:`mpe_penalty` to the loss::

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

Every rank must call :meth:`step` at the same steps (it is collective when groups are built).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn


def mpe_tables(model: nn.Module) -> List[nn.Module]:
    """Every ``MPETable`` inside ``model`` (unsharded collections, sharded ones, DMP/DDP)."""
    from torchrec_cce.methods.mpe import MPETable

    return [m for m in model.modules() if isinstance(m, MPETable)]


def mpe_penalty(model: nn.Module) -> torch.Tensor:
    """The memory penalty ``sum over MPE tables of lam * sum_g sum_b p_g(b) * b / group_weight_g``
    for the tables in the search stage (0 otherwise): add it to the training loss."""
    terms = [t.penalty() for t in mpe_tables(model)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def mpe_summary(model: nn.Module) -> Dict[str, Dict[str, float]]:
    """Per MPE table: stage, mean selected width over ids (what selection would pick now in
    the search stage) and the fraction of pruned ids."""
    out = {}
    for t in mpe_tables(model):
        widths = t.current_selection().to(torch.float64)
        sizes = t.group_sizes().to(torch.float64)
        out[t.table_name] = {
            "stage": t.stage_name,
            "mean_bits": float((widths * sizes).sum() / sizes.sum()),
            "pruned_fraction": float(sizes[widths == 0].sum() / sizes.sum()),
        }
    return out


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
        from torchrec_cce.methods.mpe import WARMUP

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
