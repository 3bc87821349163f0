"""What a training run reports: the metrics dict (the ``--metrics-json`` file), the console
summary, the loss plot, and the silencing of known-harmless library messages."""

import json
import logging
import os
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagConfig

from torchrec_cce.api import memory_report
from torchrec_cce.budget import config_bytes
from torchrec_cce.clustering.recluster import recluster_workspace_bytes
from torchrec_cce.memory import summarize
from torchrec_cce.methods.cce import CCETable
from torchrec_cce.train.evaluation import Protocol


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_known_warnings() -> None:
    """Silence the TorchRec/fbgemm/torch messages every run prints that are known to be harmless
    here (each matched by its exact text, so any other warning still shows)."""
    # TorchRec's modules call torch.fx's is_fx_tracing(); the message is about torch.export
    # telling the two apart, and training never exports.
    logging.getLogger("torch.fx._symbolic_trace").addFilter(
        _DropMessages("is_fx_tracing will return true"))
    # Data-parallel (replicated) tables have no sharding spec by design: the planner's plan
    # validation logs one line per such table.
    logging.getLogger().addFilter(_DropMessages("Sharding spec not found for"))
    # Replicated tables never use a cache, so the (default) caching params are simply unused.
    logging.getLogger("torchrec.distributed.utils").addFilter(
        _DropMessages("Sharding Type is data_parallel, caching params will be ignored"))
    # Emitted on construction even when dense_tensor_estimate is passed, which is the fix the
    # warning asks for (train.sharding.shard passes it).
    warnings.filterwarnings("ignore", message="HeuristicalStorageReservation is known to cause",
                            category=FutureWarning)
    # TorchRec (not this package) builds its DDP wrappers with the deprecated keyword; same
    # behaviour as the new one for our use (buffers broadcast once at init).
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated",
                            category=FutureWarning)
    # fbgemm's dense (data-parallel) TBE op has its backward inside the CPU kernel but no
    # Autograd-key registration; gradients are right (pytorch/FBGEMM#5886 adds the key; see
    # also meta-pytorch/torchrec#2657), only torch.compile could be affected.
    # torchmetrics' gather of unequal-length tensors (a rank's smaller last batch) indexes with a
    # list of slices: deprecated spelling of the same tuple index; exact at world 2 (tested).
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional",
                            category=UserWarning, module=r"torchmetrics\.utilities\.distributed")
    warnings.filterwarnings("ignore", message="fbgemm::dense_embedding_codegen_lookup_function: "
                            "an autograd kernel was not registered", category=UserWarning)
    # The id-range lookups (MEmCom's per-id weights, MPE's master rows) return rows through
    # torch.distributed.nn's differentiable all_to_all_single; the suggested replacement is a
    # private module (torch.distributed._functional_collectives). Same results.
    warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_to_all_single "
                            "is deprecated", category=FutureWarning)


def _own_counts(method: CCETable, counts: Optional[Dict[str, Any]]) -> Optional[Any]:
    """``method``'s per-id counts when they cover exactly its ids (not a tier's cold part,
    whose ids are shifted): then the workspace estimate uses them, else its upper bound."""
    c = (counts or {}).get(method.table_name)
    return c if c is not None and len(c) == method.num_embeddings else None


def run_metrics(*, model: nn.Module, protocol: Protocol, method: str, world: int,
                progress: Dict[str, int], samples: int, train_seconds: float,
                recluster_seconds: float, eval_seconds: float, start: float,
                table_configs: Sequence[EmbeddingBagConfig], compression: Dict[str, Any],
                plan: Any = None, plan_candidates: int = 1,
                max_params_per_table: Optional[int] = None,
                serving_dtype: Optional[torch.dtype] = None,
                losses: Sequence[Tuple[int, float]] = (),
                reclusterings: Sequence[Dict[str, Any]] = (),
                mpe: Sequence[Dict[str, Any]] = (), colliding_features: Sequence[str] = (),
                migrations: Sequence[Dict[str, Any]] = (),
                bayes_logloss: Optional[float] = None, resumed_from: Optional[int] = None,
                last_checkpoint: Optional[str] = None,
                cce_settings: Optional[Dict[str, Any]] = None,
                args: Optional[Dict[str, Any]] = None,
                counts: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The metrics of one run (JSON-able): the best evaluation's numbers (lowest validation
    log loss), every evaluation, throughput of the training steps (re-clustering and
    evaluation time apart), bytes of every table as stored (served, with ``serving_dtype``),
    the loss curve and what the hooks did. ``start`` is the run's ``time.perf_counter()``;
    ``counts`` (per-id training frequencies per table) refine the re-clustering workspace
    estimate."""
    best = protocol.best
    report = memory_report(model)
    if serving_dtype is not None:  # served with INT-N codebooks: the serving size is stored
        for t in table_configs:
            row = report[t.name]
            served = (config_bytes(t, compression.get(t.name), serving_dtype)
                      + row["id_bias_bytes"])
            row.update(serving_bytes=served, compressed_bytes=served,
                       ratio=row["full_bytes"] / served)
    totals = summarize(report)
    step_seconds = train_seconds - recluster_seconds - eval_seconds
    return {
        # the state with the lowest validation log loss
        "test_logloss": best["test_logloss"],
        "test_auc": best["test_auc"],
        "val_logloss": best["val_logloss"],
        "val_auc": best["val_auc"],
        "best_epoch": best["epoch"],
        "best_step": best["step"],
        "evaluations": protocol.evaluations,
        "stopped_early": protocol.should_stop,
        # Throughput of training steps; re-clustering and evaluation time are reported apart.
        "train_samples_per_s": samples / max(1e-9, step_seconds),
        "recluster_seconds": recluster_seconds,
        "eval_seconds": eval_seconds,
        "embedding_params": totals["params"],
        "embedding_bytes": totals["compressed_bytes"],
        "embedding_training_bytes": totals["training_bytes"],
        "embedding_serving_bytes": totals["serving_bytes"],
        # held by every rank besides its share of the training bytes: CCE's id reservoirs, and
        # while a table is re-clustered the largest table's estimated temporary memory
        "embedding_sample_bytes_per_rank": totals["sample_bytes_per_rank"],
        "recluster_workspace_bytes": max(
            (recluster_workspace_bytes(m, world, counts=_own_counts(m, counts))
             for m in model.modules() if isinstance(m, CCETable)), default=0),
        "mpe": list(mpe),
        "full_embedding_bytes": totals["full_bytes"],
        "full_embedding_params": totals["full_params"],
        "assignment_bytes": totals["assignment_bytes"],
        "compression_ratio_params": totals["param_ratio"],
        "compression_ratio_bytes": totals["byte_ratio"],
        "table_rows": {t.name: t.num_embeddings for t in table_configs},
        # per table: method and bytes as stored; with --embedding-budget-mb the planner's choice
        "embedding_tables": report,
        "embedding_plan": plan.to_dict() if plan is not None else None,
        "plan_candidates": plan_candidates,
        "colliding_features": list(colliding_features),
        "bayes_logloss": bayes_logloss,
        "world_size": world,
        "method": method,
        "steps": progress["step"],
        "epochs": progress["epoch"],
        # this attempt: torchrun's restart count, the checkpoint step it resumed from (or None)
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "resumed_from_step": resumed_from,
        "last_checkpoint": last_checkpoint,
        "train_loss_curve": list(losses),
        "reclusterings": list(reclusterings),
        "migrations": list(migrations),  # online hot tiers: {"step", "tables": stats}
        # the CCE schedule/init in effect (flags given, else the defaults)
        "cce_settings": cce_settings,
        "wall_seconds": time.perf_counter() - start,
        "args": args or {},
    }


def write_metrics(metrics: Dict[str, Any], path: str) -> None:
    """``metrics`` as indented JSON at ``path`` (directories created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(metrics, f, indent=1)


def print_summary(m: Dict[str, Any]) -> None:
    """The console summary of a run's metrics (scripts and checks parse its lines)."""
    mib = 1 << 20
    floor = "n/a" if m["bayes_logloss"] is None else f"{m['bayes_logloss']:.4f}"
    stopped = ", stopped early" if m["stopped_early"] else ""
    print(
        f"\n== {m['method']} on {m['world_size']} ranks, {m['steps']} steps, "
        f"{len(m['evaluations'])} evaluations{stopped} ==\n"
        f"best (min val log loss): epoch {m['best_epoch']}, step {m['best_step']}\n"
        f"val  log loss      {m['val_logloss']:.4f}   AUC {m['val_auc']:.4f}\n"
        f"test log loss      {m['test_logloss']:.4f}   AUC {m['test_auc']:.4f}   "
        f"(Bayes floor {floor})\n"
        f"train throughput   {m['train_samples_per_s']:.0f} samples/s\n"
        f"embedding memory   {m['full_embedding_bytes'] / mib:.2f} MiB full -> "
        f"{m['embedding_bytes'] / mib:.2f} MiB compressed "
        f"(incl. {m['assignment_bytes'] / mib:.2f} MiB CCE assignment)\n"
        f"compression        {m['compression_ratio_params']:.1f}x parameters, "
        f"{m['compression_ratio_bytes']:.1f}x bytes\n"
        f"re-clusterings     {len(m['reclusterings'])} ({m['recluster_seconds']:.1f} s)\n"
        f"wall time          {m['wall_seconds']:.1f} s (evaluation {m['eval_seconds']:.1f} s)",
        flush=True)


def plot_loss(losses: List[Tuple[int, float]], reclusters: List[Dict[str, Any]],
              metrics: Dict[str, Any], path: str) -> None:
    """PNG of the loss curve, the validation losses, the test loss at the best evaluation and
    the re-clusterings (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    window = max(1, len(values) // 20)
    smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
              for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, alpha=0.3, label="train loss (per step)")
    ax.plot(steps, smooth, label=f"train loss (mean of {window})")
    evals = metrics["evaluations"]
    ax.plot([e["step"] for e in evals], [e["val_logloss"] for e in evals], "o-", color="C4",
            label="val log loss")
    if metrics.get("bayes_logloss") is not None:
        ax.axhline(metrics["bayes_logloss"], color="k", ls="--", label="Bayes floor (test)")
    ax.axhline(metrics["test_logloss"], color="C3", ls=":",
               label=f"test log loss at best val (step {metrics['best_step']})")
    for r in reclusters:
        ax.axvline(r["step"], color="C2", alpha=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("BCE")
    ax.set_title(f"DLRM + {metrics['method']} ({metrics['compression_ratio_params']:.0f}x fewer "
                 f"embedding params); green: re-clustering")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
