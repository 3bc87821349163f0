"""Checkpoints of a training run (glue over :class:`torchrec_cce.checkpoint.CheckpointManager`):
which settings a checkpoint must match, what the progress record holds, and the fault-injection
test hook.

``progress`` is ``{"step", "epoch", "step_in_epoch"}`` (global step, completed epochs, steps
done in the current epoch); a checkpoint stores it with the evaluations so far.
"""

import os
import signal
from typing import Any, Callable, Dict, Optional, Tuple

import torch.distributed as dist
from torch import nn

from torchrec_cce.checkpoint import CheckpointManager
from torchrec_cce.train.distributed import restart_attempt
from torchrec_cce.train.evaluation import Protocol

# Test hook: "N[,M,...]" makes rank 1 SIGKILL itself right after step N in the first attempt
# (TORCHELASTIC_RESTART_COUNT=0), after step M in the second, ...; "save:N" instead kills it
# while the checkpoint of step N is being written (its shards on disk, the checkpoint not yet
# complete). tests/test_elastic.py, benchmarks/soak.py.
FAULT_ENV = "TORCHREC_CCE_FAULT_AT_STEP"
# Flags of examples/dlrm/train.py a checkpoint must have been written with (they change the
# model or its state).
MODEL_FLAGS = ("data", "method", "embedding_dim", "chunks", "qr_operation", "embedding_budget_mb",
               "mpe_bits", "mpe_groups", "dense_arch", "over_arch", "dcn", "dcn_layers",
               "dcn_low_rank", "sparse_optimizer", "dense_optimizer", "seed", "cce_init",
               "cce_keep_remainder", "cce_assignment_share", "codebook_dtype",
               "planner_allocation", "id_bias")


def checkpoint_manager(args: Any, max_params_per_table: Optional[int], tables: Dict[str, int],
                       log: Callable[[str], None]) -> Optional[CheckpointManager]:
    """The manager of ``args.checkpoint_dir`` (None without one); its config is the
    :data:`MODEL_FLAGS` of ``args`` plus the cap and the table sizes."""
    if not args.checkpoint_dir:
        return None
    config = {k: getattr(args, k) for k in MODEL_FLAGS}
    if args.serving_dtype:  # only when set, so checkpoints written before the flag still load
        config["serving_dtype"] = args.serving_dtype
    config.update(max_params_per_table=max_params_per_table, tables=tables)
    return CheckpointManager(args.checkpoint_dir, keep=args.keep_checkpoints, config=config,
                             batch_size=args.batch_size, log=log,
                             on_written=lambda step: inject_fault(step, dist.get_rank(),
                                                                  dist.get_world_size(), "save"))


def save_checkpoint(manager: Optional[CheckpointManager], model: nn.Module, optimizer: Any,
                    progress: Dict[str, int], protocol: Protocol) -> Optional[str]:
    """Save at ``progress["step"]`` (collective); returns the checkpoint's path (None without
    a manager)."""
    if manager is None:
        return None
    return manager.save(progress["step"], model, optimizer,
                        {**progress, "protocol": protocol.state()})


def load_checkpoint(manager: CheckpointManager, model: nn.Module, optimizer: Any,
                    protocol: Protocol) -> Optional[Tuple[Dict[str, int], int, str]]:
    """Continue from the newest usable checkpoint (model, optimizers, re-clustering
    reservoirs, RNG states, evaluations so far into ``protocol``). Returns ``(progress,
    checkpoint step, path)``, or None when there is none yet (a fresh start)."""
    resumed = manager.load(model, optimizer)
    if resumed is None:
        return None
    progress = dict(resumed.progress)
    protocol.load(progress.pop("protocol", ""))
    progress = {"step": int(progress["step"]), "epoch": int(progress["epoch"]),
                "step_in_epoch": int(progress.get("step_in_epoch", 0))}
    return progress, resumed.step, resumed.path


def inject_fault(step: int, rank: int, world: int, point: str = "step") -> None:
    """The ``$TORCHREC_CCE_FAULT_AT_STEP`` test hook (see :data:`FAULT_ENV`): rank
    ``min(1, world - 1)`` SIGKILLs itself at ``point`` (``"step"``: after training step
    ``step``; ``"save"``: inside the checkpoint write of step ``step``) when this restart
    attempt's entry names that point and step."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    entries = [x.strip() for x in spec.split(",") if x.strip()]
    attempt = restart_attempt()
    if attempt >= len(entries) or rank != min(1, world - 1):
        return
    at_point, _, at_step = entries[attempt].rpartition(":")
    if (at_point or "step") == point and int(at_step) == step:
        where = f"after step {step}" if point == "step" else f"while saving step {step}"
        print(f"injected fault: SIGKILL of rank {rank} {where} (attempt {attempt})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
