"""Training hooks: re-clustering (CCE), MPE's warm-up / search / selection and the migration of
online hot tiers, behind one small interface, run between training steps.

    hooks = training_hooks(dmp, steps_per_epoch=len(loader), optimizers=[dense_opt])
    for step in range(1, steps + 1):
        loss = pipeline.progress(it)
        for line in hooks.after_step(step):
            print(line)

A hook has ``due(step) -> bool`` and ``run(model, step, optimizers=()) -> record or None``
(collective: every rank calls it at the same step). A model with MPE tables trains with their
memory penalty added to the loss (:class:`MPEDLRMTrain`, or ``loss + mpe_penalty(model)``).
"""

import time
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRMTrain

from torchrec_cce.api import mpe_penalty, mpe_summary, mpe_tables
from torchrec_cce.clustering.recluster import LLOYD_ITERS
from torchrec_cce.methods.cce import CCETable
from torchrec_cce.methods.mpe import WARMUP
from torchrec_cce.methods import OnlineTieredTable
from torchrec_cce.schedules import MigrationSchedule, MPESchedule, ReclusterSchedule
from torchrec_cce.pipeline import redo_pending_input_dist


class TrainingHook(Protocol):
    """Something to run after some training steps (1-based global step numbers)."""

    def due(self, step: int) -> bool:
        ...

    def run(self, model: nn.Module, step: int,
            optimizers: Sequence[torch.optim.Optimizer] = ()) -> Optional[Dict[str, Any]]:
        """Run at ``step``; returns what happened (also appended to ``self.log``) or None."""
        ...


class _TimedScheduleHook:
    """A hook that runs a schedule's ``step`` on the schedule's steps, timing it: ``log`` holds
    ``{"step", "tables": per-table statistics}`` per run and ``seconds`` their wall time.
    Subclasses say what happened in :meth:`message`; ``skip_empty``: a run that touched no
    table is not logged."""

    changes_remap = True
    skip_empty = False

    def __init__(self, schedule: Any) -> None:
        self.schedule = schedule
        self.log: List[Dict[str, Any]] = []
        self.seconds = 0.0
        self.last_message = ""

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    def run(self, model: nn.Module, step: int,
            optimizers: Sequence[torch.optim.Optimizer] = ()) -> Optional[Dict[str, Any]]:
        t0 = time.perf_counter()
        stats = self.schedule.step(model, step, optimizers=optimizers)
        self.seconds += time.perf_counter() - t0
        if stats is None or (self.skip_empty and not stats):
            return None
        record = {"step": step, "tables": stats}
        self.log.append(record)
        self.last_message = self.message(step, stats)
        return record

    def message(self, step: int, stats: Dict[str, Dict[str, Any]]) -> str:
        return f"{type(self).__name__}: {len(stats)} tables at step {step}"


class ReclusterHook(_TimedScheduleHook):
    """Re-clusters every CCE table at the steps of a :class:`ReclusterSchedule`.

    ``log``: ``{"step", "tables": per-table statistics}`` per re-clustering; ``seconds``: their
    wall time. ``changes_remap``: a batch already remapped (a pipeline's prefetched one) must be
    remapped again."""

    def __init__(self, schedule: ReclusterSchedule) -> None:
        super().__init__(schedule)

    def message(self, step: int, stats: Dict[str, Dict[str, Any]]) -> str:
        secs = sum(s["seconds"] for s in stats.values())
        return f"re-clustered {len(stats)} tables at step {step} in {secs:.2f} s"


class MPEHook:
    """MPE's stages on an :class:`MPESchedule`: build the frequency groups after the warm-up,
    select the widths after the search. It also runs at step 1, where the schedule checks
    that tables without per-id counts have a warm-up.

    ``log``: ``{"step", "events": sorted event kinds, "tables": mpe_summary(model)}``."""

    changes_remap = False

    def __init__(self, schedule: MPESchedule) -> None:
        self.schedule = schedule
        self.log: List[Dict[str, Any]] = []
        self.last_message = ""

    def due(self, step: int) -> bool:
        return self.schedule.due(step) or step == 1

    def run(self, model: nn.Module, step: int,
            optimizers: Sequence[torch.optim.Optimizer] = ()) -> Optional[Dict[str, Any]]:
        events = self.schedule.step(model, step, optimizers=optimizers)
        if not events:
            return None
        kinds = sorted({e["event"] for e in events.values()})
        record = {"step": step, "events": kinds, "tables": mpe_summary(model)}
        self.log.append(record)
        self.last_message = f"MPE {', '.join(kinds)} for {len(events)} tables at step {step}"
        return record


class MigrationHook(_TimedScheduleHook):
    """Migrates the online hot tiers (``OnlineTieredConfig``) on a :class:`MigrationSchedule`.

    ``log``: ``{"step", "tables": per-table statistics}`` per migration. ``changes_remap``: the
    hot map changed, so a batch already remapped must be remapped again."""

    skip_empty = True

    def __init__(self, schedule: MigrationSchedule) -> None:
        super().__init__(schedule)

    def message(self, step: int, stats: Dict[str, Dict[str, Any]]) -> str:
        promoted = sum(s["promoted"] for s in stats.values())
        return (f"migrated hot tiers of {len(stats)} tables at step {step} "
                f"({promoted} ids promoted)")


class Hooks:
    """The hooks of one training run, bound to its model.

    ``after_step(step)`` runs every due hook (with ``optimizers``, whose state a re-clustering
    or an MPE selection resets for the changed rows) and returns their console lines. A
    ``TrainPipelineSparseDist`` needs no call after a re-clustering (the sharded collection
    redoes the input dist of a batch remapped before it); given a ``pipeline``, its batch in
    flight is remapped at once instead (optional)."""

    def __init__(self, model: nn.Module, hooks: Sequence[TrainingHook],
                 optimizers: Sequence[torch.optim.Optimizer] = (), pipeline: Any = None) -> None:
        self.model = model
        self.hooks = list(hooks)
        self.optimizers = list(optimizers)
        self.pipeline = pipeline

    def of_type(self, cls: type) -> Optional[Any]:
        """The hook of class ``cls``, or None."""
        return next((h for h in self.hooks if isinstance(h, cls)), None)

    def after_step(self, step: int) -> List[str]:
        lines = []
        for hook in self.hooks:
            if not hook.due(step):
                continue
            record = hook.run(self.model, step, self.optimizers)
            if getattr(hook, "changes_remap", False) and self.pipeline is not None:
                redo_pending_input_dist(self.pipeline)
            if record is not None:
                lines.append(getattr(hook, "last_message", ""))
        return lines


def has_cce_tables(model: nn.Module) -> bool:
    return any(isinstance(m, CCETable) for m in model.modules())


def default_mpe_warmup(model: nn.Module, steps_per_epoch: int) -> int:
    """0 when every MPE table has per-id counts, else a tenth of an epoch (at least 1)."""
    counted = all(int(t.stage) != WARMUP for t in mpe_tables(model))
    return 0 if counted else max(1, steps_per_epoch // 10)


def training_hooks(model: nn.Module, steps_per_epoch: int,
                   recluster_at: Sequence[float] = (0.25, 0.5), recluster_every_epoch: int = 0,
                   kmeans_iters: int = LLOYD_ITERS, mpe_search_steps: Optional[int] = None,
                   mpe_warmup_steps: Optional[int] = None,
                   optimizers: Sequence[torch.optim.Optimizer] = (),
                   pipeline: Any = None) -> Hooks:
    """The hooks ``model`` needs: re-clustering of its CCE tables at ``recluster_at``
    (fractions of epoch 1) and the end of the first ``recluster_every_epoch`` epochs, migration
    of its online hot tiers every ``migrate_every`` steps, and MPE's
    stages for its MPE tables (search for ``mpe_search_steps``, default one epoch, after
    ``mpe_warmup_steps``, default :func:`default_mpe_warmup`)."""
    steps_per_epoch = max(1, steps_per_epoch)
    hooks: List[TrainingHook] = []
    if has_cce_tables(model):
        hooks.append(ReclusterHook(ReclusterSchedule.from_epochs(
            steps_per_epoch, list(recluster_at), every_epoch=recluster_every_epoch,
            iters=kmeans_iters)))
    if any(isinstance(m, OnlineTieredTable) for m in model.modules()):
        hooks.append(MigrationHook(MigrationSchedule.from_model(model)))
    if mpe_tables(model):
        warmup = (default_mpe_warmup(model, steps_per_epoch) if mpe_warmup_steps is None
                  else mpe_warmup_steps)
        hooks.append(MPEHook(MPESchedule(search_steps=mpe_search_steps or steps_per_epoch,
                                         warmup_steps=warmup)))
    return Hooks(model, hooks, optimizers, pipeline)


class MPEDLRMTrain(DLRMTrain):
    """DLRMTrain whose loss adds MPE's memory penalty (0 outside the search stage)."""

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        loss, outputs = super().forward(batch)
        return loss + mpe_penalty(self), outputs
