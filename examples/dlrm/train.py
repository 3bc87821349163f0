"""DLRM with compressed embedding tables: the one training script every launcher runs.

    torchx run launch/components.py:dlrm -j 1x2 -- --data synthetic --method cce --epochs 1
    torchrun --nproc_per_node 2 examples/dlrm/train.py --data synthetic --method cce
    python -m torchrec_cce.data.preprocess --format csv --input my.csv ... --out my_data
    python examples/dlrm/train.py --data preprocessed --data-dir my_data --method full --epochs 5

Reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun, TorchX); a plain ``python`` run is a world of
one. Backend: ``$TORCHREC_CCE_BACKEND``, else NCCL with CUDA, else gloo.

Pipeline: data (torchrec_cce.data) -> TorchRec DLRM whose EBC is a CCEEmbeddingBagCollection ->
planner (with the CCE storage reservation) -> DistributedModelParallel with the CCE sharder ->
fused sparse optimizer (apply_optimizer_in_backward) + dense optimizer -> TrainPipelineSparseDist.
Re-clustering runs as a training-loop hook (ReclusterSchedule).

Protocol: the validation split is evaluated at the end of every epoch (and every
``--eval-every`` steps); each evaluation also evaluates the test split on the same model
state, and the reported ``test_logloss``/``test_auc`` are those of the evaluation with the
lowest validation log loss (``best_epoch``/``best_step``). That is exact (the test numbers of
that very state, nothing restored) and cheap (one forward pass over test per evaluation, no
copy of the model). ``--patience N`` stops after N evaluations without a new best. The
learning rate of the dense and of the fused sparse optimizers warms up linearly over
``--warmup-steps``. Metrics: torchmetrics AUROC and mean BCE (log loss), synchronised across
ranks.
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torchmetrics
from torch import nn
from tqdm import tqdm

from torchrec import EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from torchrec_cce import (  # noqa: E402
    CCEEmbeddingBagCollection,
    compression_for_budget,
    memory_report,
    plan_candidates,
    plan_compression,
    summarize,
)
from torchrec_cce.checkpoint import CheckpointManager, guard_loss  # noqa: E402
from torchrec_cce.clustering.schedule import ReclusterSchedule  # noqa: E402
from torchrec_cce.configs import CCEConfig, MPEConfig  # noqa: E402
from torchrec_cce.mpe import MPESchedule, mpe_penalty, mpe_summary  # noqa: E402
from torchrec_cce.configs import METHOD_NAMES  # noqa: E402
from torchrec_cce.data.common import DEFAULT_SHUFFLE_BUFFER  # noqa: E402
from torchrec_cce.data import (  # noqa: E402
    AvazuCsvDataset,
    CriteoNpyDataset,
    CriteoSyntheticDataset,
    CriteoTsvDataset,
)
from torchrec_cce.distributed import (  # noqa: E402
    CCEEmbeddingBagCollectionSharder,
    CCEStorageReservation,
    format_plan_memory,
    plan_memory,
)
from torchrec_cce.hashing import derive_seed  # noqa: E402
from torchrec_cce.budget import config_bytes  # noqa: E402
from torchrec_cce.distributed.sharder import shard_unplanned  # noqa: E402
from torchrec_cce.serving import served_codebooks  # noqa: E402
from torchrec_cce.methods.mpe import MPETable  # noqa: E402
from torchrec_cce.pipeline import redo_pending_input_dist  # noqa: E402

BACKEND_ENV = "TORCHREC_CCE_BACKEND"
DATA_CHOICES = ["synthetic", "preprocessed", "criteo_tsv", "avazu_csv", "criteo_npy"]


# ---------------------------------------------------------------- console
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
    # telling the two apart, and this script never exports.
    logging.getLogger("torch.fx._symbolic_trace").addFilter(
        _DropMessages("is_fx_tracing will return true"))
    # Data-parallel (replicated) tables have no sharding spec by design: the planner's plan
    # validation logs one line per such table.
    logging.getLogger().addFilter(_DropMessages("Sharding spec not found for"))
    # Replicated tables never use a cache, so the (default) caching params are simply unused.
    logging.getLogger("torchrec.distributed.utils").addFilter(
        _DropMessages("Sharding Type is data_parallel, caching params will be ignored"))
    # Emitted on construction even when dense_tensor_estimate is passed, which is the fix the
    # warning asks for (shard_model passes it).
    warnings.filterwarnings("ignore", message="HeuristicalStorageReservation is known to cause",
                            category=FutureWarning)
    # TorchRec (not this script) builds its DDP wrappers with the deprecated keyword; same
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


# ---------------------------------------------------------------- args
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = p.add_argument_group("data")
    d.add_argument(
        "--data", choices=DATA_CHOICES, default="synthetic",
        help="preprocessed: a directory written by `python -m torchrec_cce.data.preprocess` "
             "(tables = the vocabulary sizes, so --method full is collision-free; shuffled per "
             "epoch). criteo_tsv / avazu_csv stream raw files through a bounded shuffle buffer "
             "(--shuffle-buffer) and take ids "
             "modulo table sizes: Criteo Kaggle's cardinalities for criteo_tsv and 24/7/"
             "--max-ids-per-feature for avazu_csv unless --num-embeddings-per-feature, i.e. "
             "hashed tables for any other file (a warning names the colliding features); "
             "preprocess your files for real vocabularies. criteo_npy: TorchRec's npy layout. "
             "synthetic: the Criteo-shaped generator (known Bayes floor).")
    d.add_argument("--data-dir", default=None, help="the preprocessed directory (--data preprocessed)")
    d.add_argument("--train-path", default=None,
                   help="file (tsv/csv) or comma-separated prefix list for npy: "
                        "'<dir>/day_0' -> day_0_{dense,sparse,labels}.npy")
    d.add_argument("--val-path", default=None, help="validation file (criteo_tsv, avazu_csv)")
    d.add_argument("--test-path", default=None)
    d.add_argument("--test-fraction", type=float, default=0.1,
                   help="criteo_tsv/avazu_csv without --test-path (--val-path): batch i of a rank "
                        "goes to test if i %% round(1/f) == 0, to val if it is 1, else to train "
                        "(default 0.1)")
    d.add_argument("--shuffle-buffer", type=int, default=DEFAULT_SHUFFLE_BUFFER,
                   help="criteo_tsv/avazu_csv: rows per rank held by the streaming shuffle buffer, "
                        "seeded by --seed and the epoch (default %(default)s, ~130 MB of Criteo "
                        "rows; 0 = file order). Held-out val/test batches are chosen before it.")
    d.add_argument("--num-embeddings-per-feature", default=None,
                   help="comma-separated table sizes for the raw readers; ids are taken modulo these")
    d.add_argument("--max-ids-per-feature", type=int, default=10_000_000,
                   help="cap on the raw readers' default table sizes")
    d.add_argument("--synthetic-scale", type=float, default=0.001,
                   help="synthetic cardinalities = Criteo Kaggle's x scale")
    d.add_argument("--synthetic-train-batches", type=int, default=None,
                   help="global train batches per epoch (synthetic; default 64 x world)")
    d.add_argument("--synthetic-val-batches", type=int, default=None,
                   help="global val batches (default: --synthetic-test-batches)")
    d.add_argument("--synthetic-test-batches", type=int, default=None,
                   help="global test batches (default 8 x world)")
    m = p.add_argument_group("model")
    m.add_argument("--method", choices=list(METHOD_NAMES), default=None,
                   help="compression method (default cce; with --embedding-budget-mb and no "
                        "--method the budget planner chooses per table)")
    m.add_argument("--embedding-budget-mb", type=float, default=None,
                   help="bytes (MiB, 2**20) for all embedding tables together, everything they "
                        "store: torchrec_cce.plan_compression sizes --method to it, or without "
                        "--method chooses per table; replaces --max-params-per-table")
    m.add_argument("--plan-select", choices=["rule", "validation"], default="rule",
                   help="with --embedding-budget-mb and no --method: 'rule' trains the "
                        "planner's rule plan; 'validation' trains each distinct plan of "
                        "torchrec_cce.plan_candidates (the rule's, QR first, CCE wherever it fits, "
                        "CE alone, CCE alone; same seed and recipe) and keeps the one with the "
                        "lowest validation log loss (up to 5x the training time)")
    m.add_argument("--max-params-per-table", type=int, default=None,
                   help="the paper's cap: tables with num_embeddings*dim above it are compressed "
                        "to this many parameters (default: 1/16 of the largest table)")
    m.add_argument("--chunks", type=int, default=4)
    m.add_argument("--qr-operation", choices=["mult", "add", "concat"], default="mult",
                   help="how QR combines its quotient and remainder rows (--method qr)")
    m.add_argument("--embedding-dim", type=int, default=16)
    m.add_argument("--dense-arch", default="64,16", help="dense MLP sizes (last = embedding dim)")
    m.add_argument("--over-arch", default="64,32,1")
    m.add_argument("--dcn", action="store_true", help="DLRM_DCN instead of DLRM")
    m.add_argument("--dcn-layers", type=int, default=2)
    m.add_argument("--dcn-low-rank", type=int, default=16)
    q = p.add_argument_group("MPE (--method mpe: every table above the cap)")
    q.add_argument("--mpe-bits", default="0,1,2,3,4,5,6", help="candidate bit widths (0 = pruned)")
    q.add_argument("--mpe-groups", type=int, default=128, help="frequency groups per table")
    q.add_argument("--mpe-lambda", type=float, default=3e-4, help="memory penalty weight")
    q.add_argument("--mpe-tau", type=float, default=3e-3, help="softmax temperature")
    q.add_argument("--mpe-search-steps", type=int, default=None,
                   help="search length in steps (default: one epoch); then select and retrain")
    q.add_argument("--mpe-warmup-steps", type=int, default=None,
                   help="steps counting ids before the search, for data without per-id counts "
                        "(default: 0 with counts, else a tenth of an epoch)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=1024, help="per-rank batch size")
    t.add_argument("--lr", type=float, default=0.05, help="sparse (embedding) learning rate (default 0.05)")
    t.add_argument("--sparse-optimizer", choices=["rowwise_adagrad", "adagrad", "sgd"],
                   default="rowwise_adagrad")
    t.add_argument("--dense-optimizer", choices=["adagrad", "adam", "sgd"], default="adagrad",
                   help="optimizer of the MLPs (default adagrad)")
    t.add_argument("--dense-lr", type=float, default=0.05, help="dense (MLP) learning rate (default 0.05)")
    t.add_argument("--warmup-steps", type=int, default=100,
                   help="linear learning-rate warm-up of both optimizers: step s (1-based) "
                        "uses lr * min(1, s / N); 0 = none. Adagrad's first steps move every "
                        "weight by ~lr: without warm-up the loss jumps (x1.75-2.8 at step 2 "
                        "on synthetic data); 100 keeps every step <= 1.02x the first on the "
                        "shared datasets (default 100)")
    t.add_argument("--seed", type=int, default=0,
                   help="model init, hashes and the shuffled training order")
    t.add_argument("--recluster-at", default=None,
                   help="fractions of the first epoch, e.g. 0.25,0.5 (CCE only; default: "
                        f"{DEFAULT_RECLUSTER_HELP})")
    t.add_argument("--recluster-every-epoch", type=int, default=None,
                   help="also re-cluster at the end of each of the first N epochs (default: "
                        "see --recluster-at)")
    t.add_argument("--no-recluster", action="store_true",
                   help="CCE without re-clustering (p and h stay the initial hashes)")
    t.add_argument("--kmeans-iters", type=int, default=None,
                   help=f"Lloyd iterations per re-clustering (default {DEFAULT_KMEANS_ITERS})")
    m2 = p.add_argument_group("CCE (tables compressed with CCE, also under the planner)")
    m2.add_argument("--cce-init", choices=["hash", "qr"], default=None,
                    help="initial p/h: independent hashes (the paper) or the quotient/remainder "
                         "of a per-chunk id permutation (unique pairs when rows**2 >= V); "
                         f"default {DEFAULT_CCE_INIT}")
    m2.add_argument("--cce-keep-remainder", action="store_true", default=None,
                    help="--cce-init qr: h stays the remainder after re-clustering (default "
                         "on with the default init; --cce-fresh-hash gives the paper's rule)")
    m2.add_argument("--cce-fresh-hash", dest="cce_keep_remainder", action="store_false",
                    help="h becomes a fresh hash at each re-clustering (the paper's rule)")
    m.add_argument("--codebook-dtype", "--cce-codebook-dtype", dest="codebook_dtype",
                   choices=["float32", "float16", "bfloat16"], default=None,
                   help="precision every embedding table is stored and trained in: the "
                        "codebooks of every method (MEmCom's and MPE's excepted) and, with "
                        "--embedding-budget-mb, the tables kept full (FullConfig). float16 "
                        "and bfloat16 halve the bytes per row (trained with the fused "
                        "optimizers; bfloat16 on CPU needs torchrec_cce's TBE kernel); the "
                        "budget planner counts it. Default: float32 (without "
                        "--method the planner chooses)")
    m2.add_argument("--planner-allocation", choices=["perplexity", "proportional", "value"],
                    default="perplexity",
                    help="with --embedding-budget-mb, how the bytes are split between tables: in "
                         "proportion to training mass x perplexity of the ids (default), to the "
                         "full tables' bytes, or by marginal frequency mass (see "
                         "torchrec_cce.plan_compression)")
    m2.add_argument("--serving-dtype", choices=["int8", "int4"], default=None,
                    help="serve every codebook (and full table) as fbgemm INT8/INT4 rows "
                         "(torchrec_cce.serving.quantize_codebooks; training stays float): "
                         "--embedding-budget-mb bounds the serving bytes, every evaluation runs "
                         "on the served values, and embedding_bytes is the serving size "
                         "(embedding_training_bytes the float one)")
    m2.add_argument("--cce-assignment-share", type=float, default=None,
                    help="with --embedding-budget-mb: share of a CCE table's bytes for its "
                         "bit-packed p (the most frequent ids'); the rest is codebook rows "
                         f"(default {DEFAULT_CCE_ASSIGNMENT_SHARE})")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-every", type=int, default=None,
                   help="also evaluate every N steps (val and test; always at each epoch's end)")
    e.add_argument("--patience", type=int, default=None,
                   help="stop after N evaluations in a row without a lower val log loss")
    o = p.add_argument_group("output")
    o.add_argument("--checkpoint-dir", default=None,
                   help="DCP checkpoints <dir>/step_<N>, written at each epoch's end (and every "
                        "--checkpoint-every steps) atomically: a crash mid-write never leaves a "
                        "broken newest checkpoint")
    o.add_argument("--checkpoint-every", type=int, default=None,
                   help="also checkpoint every N training steps (mid-epoch resume is exact)")
    o.add_argument("--keep-checkpoints", type=int, default=2,
                   help="complete checkpoints kept (older ones are pruned); 0 = all (default 2)")
    o.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --checkpoint-dir, or "
                        "start fresh (logged) if there is none yet: one command line serves "
                        "the first start and every restart")
    o.add_argument("--metrics-json", default=None)
    o.add_argument("--tensorboard-dir", default=None)
    o.add_argument("--loss-curve-png", default=None)
    o.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    args.planner_methods = None if args.method is None else [args.method]
    args.method = args.method or "cce"
    if args.embedding_budget_mb is not None:
        if args.embedding_budget_mb <= 0:
            p.error(f"--embedding-budget-mb must be positive, got {args.embedding_budget_mb}")
        if args.max_params_per_table is not None:
            p.error("--embedding-budget-mb and --max-params-per-table are two budgets; pass one")
    if args.plan_select == "validation":
        if args.embedding_budget_mb is None or args.planner_methods is not None:
            p.error("--plan-select validation chooses between the budget planner's plans: "
                    "pass --embedding-budget-mb and no --method")
        if args.checkpoint_dir:
            p.error("--plan-select validation trains several models one after the other; "
                    "it does not checkpoint: drop --checkpoint-dir (or pick the plan first "
                    "and checkpoint that run)")
    args.plan_candidate = None  # set by select_plan: which of plan_candidates() to train
    if args.recluster_at and args.method != "cce":
        p.error("--recluster-at only applies to --method cce")
    if args.no_recluster and (args.recluster_at or args.recluster_every_epoch):
        p.error("--no-recluster contradicts --recluster-at/--recluster-every-epoch")
    if args.cce_assignment_share is None:
        args.cce_assignment_share = DEFAULT_CCE_ASSIGNMENT_SHARE
    if not 0 < args.cce_assignment_share < 1:
        p.error(f"--cce-assignment-share must be in (0, 1), got {args.cce_assignment_share}")
    if args.data in ("criteo_tsv", "avazu_csv", "criteo_npy") and not args.train_path:
        p.error(f"--data {args.data} needs --train-path")
    if args.data == "preprocessed":
        if not args.data_dir:
            p.error("--data preprocessed needs --data-dir (a `python -m torchrec_cce.data."
                    "preprocess ... --out DIR` directory)")
        if args.num_embeddings_per_feature:
            p.error("--num-embeddings-per-feature does not apply to --data preprocessed: tables "
                    "have the vocabulary sizes (pick a compression --method instead)")
    if args.resume and not args.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir (where the checkpoints are, or will be)")
    if args.keep_checkpoints < 0:
        p.error(f"--keep-checkpoints must be >= 0 (0 keeps all), got {args.keep_checkpoints}")
    for flag in ("eval_every", "patience", "checkpoint_every"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    return args


# ---------------------------------------------------------------- CCE defaults
# What `--method cce` (or a planner choosing CCE) does when no re-clustering/CCE flag is given:
# the best setting of the ablations run under the fixed protocol (every table trained by the
# fused optimizer at --lr; benchmarks/results/quality_frappe_ablations.csv,
# README "CCE ablations"). Frappe at 1/16 of the bytes, 3 seeds, test log loss: float16
# codebooks 0.2907 vs float32 0.3090 (twice the rows per byte); re-clustering at 0.25 and 0.5
# of epoch 1 only 0.2875, plus the end of epoch 1 0.2913, plus epochs 1-3 0.2907, none 0.3161;
# QR-initialised CCE keeping h as the remainder 0.2907 vs the paper's hashed CCE 0.2938;
# a quarter of a table's bytes for p 0.2907 vs a tenth 0.2912. The byte split between
# tables (train.py --planner-allocation, default perplexity) is the planner's, not CCE's.
DEFAULT_RECLUSTER_AT = "0.25,0.5"
DEFAULT_RECLUSTER_EPOCHS = 0  # epoch ends that also re-cluster (epochs 1..N; before the last)
DEFAULT_KMEANS_ITERS = 10
DEFAULT_CCE_INIT = "qr"
DEFAULT_CCE_KEEP_REMAINDER = True
DEFAULT_CCE_ASSIGNMENT_SHARE = 0.25
DEFAULT_CCE_CODEBOOK_DTYPE = "float16"
DEFAULT_RECLUSTER_HELP = (f"{DEFAULT_RECLUSTER_AT} of epoch 1"
                          + (f" and the end of epochs 1-{DEFAULT_RECLUSTER_EPOCHS}"
                             if DEFAULT_RECLUSTER_EPOCHS else ""))


def default_recluster_epochs(epochs: int) -> int:
    """Epochs whose end re-clusters by default: the first ``DEFAULT_RECLUSTER_EPOCHS``, never
    the last epoch's end (nothing would train after it). Independent of ``--epochs`` otherwise,
    so an epoch cap with early stopping does not change the schedule."""
    return max(0, min(DEFAULT_RECLUSTER_EPOCHS, epochs - 1))


def cce_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """The re-clustering schedule and CCE init in effect (flags given, else the defaults)."""
    explicit = args.recluster_at is not None or args.recluster_every_epoch is not None
    if args.no_recluster:
        at, every = "", 0
    elif explicit:
        at, every = args.recluster_at or "", args.recluster_every_epoch or 0
    else:
        at, every = DEFAULT_RECLUSTER_AT, default_recluster_epochs(args.epochs)
    init = args.cce_init or DEFAULT_CCE_INIT
    keep = (DEFAULT_CCE_KEEP_REMAINDER if args.cce_keep_remainder is None
            else args.cce_keep_remainder) and init == "qr"
    return {"recluster_at": at, "recluster_every_epoch": every,
            "kmeans_iters": args.kmeans_iters or DEFAULT_KMEANS_ITERS,
            "init": init, "keep_remainder": keep,
            "codebook_dtype": str(codebook_dtype(args) or "float32").replace("torch.", "")}


def serving_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    """The torch dtype of ``--serving-dtype`` (INT4 is ``torch.quint4x2``), or None."""
    return {None: None, "int8": torch.int8, "int4": torch.quint4x2}[args.serving_dtype]


def codebook_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    """``--codebook-dtype``; ``--method cce`` without it: ``DEFAULT_CCE_CODEBOOK_DTYPE``."""
    name = args.codebook_dtype
    if name is None and args.planner_methods == ["cce"]:
        name = DEFAULT_CCE_CODEBOOK_DTYPE
    if name is None and args.planner_methods is None and args.embedding_budget_mb is None \
            and args.method == "cce":
        name = DEFAULT_CCE_CODEBOOK_DTYPE
    return None if name is None else getattr(torch, name)


def apply_cce_settings(compression: Dict, args: argparse.Namespace) -> Dict:
    """CCE configs with the init of :func:`cce_settings` (bytes are unchanged), and every
    config that has a ``codebook_dtype`` at ``--codebook-dtype`` when it is given."""
    cs = cce_settings(args)
    dtype = codebook_dtype(args)
    out = {}
    for n, c in compression.items():
        if isinstance(c, CCEConfig):
            c = dataclasses.replace(c, init=cs["init"], keep_remainder=cs["keep_remainder"])
        if dtype is not None and any(f.name == "codebook_dtype" for f in dataclasses.fields(c)):
            c = dataclasses.replace(c, codebook_dtype=dtype)
        out[n] = c
    return out


# ---------------------------------------------------------------- distributed set-up
def init_distributed() -> Tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank, world, device


# ---------------------------------------------------------------- data
@dataclass
class Data:
    """This rank's splits and what the model needs to know about the features.

    ``train(epoch)`` yields the epoch's training batches (in that epoch's shuffled order where
    the source supports it); ``val()``/``test()`` the evaluation batches. ``counts(feature)`` is
    the per-id training frequency (int64 ``[V]``) when the data has it, else None.
    """

    feature_names: List[str]
    sizes: List[int]
    dense_in: int
    train: Callable[[int], Iterable[Batch]]
    val: Callable[[], Iterable[Batch]]
    test: Callable[[], Iterable[Batch]]
    steps_per_epoch: Optional[int] = None
    bayes_logloss: Optional[float] = None
    counts: Callable[[str], Optional[np.ndarray]] = lambda feature: None
    collisions: Optional["ModuloIds"] = None
    notes: List[str] = field(default_factory=list)


def load_data(args: argparse.Namespace, rank: int, world: int) -> Data:
    builders = {"synthetic": synthetic_data, "preprocessed": preprocessed_data,
                "criteo_tsv": raw_file_data, "avazu_csv": raw_file_data, "criteo_npy": npy_data}
    return builders[args.data](args, rank, world)


def synthetic_data(args: argparse.Namespace, rank: int, world: int) -> Data:
    """The Criteo-shaped generator; the training order of its (fixed) batches is a permutation
    drawn per epoch from ``(seed, epoch)``, the same on every rank."""
    sizes = _sizes_flag(args)
    kw = dict(batch_size=args.batch_size, rank=rank, world_size=world, seed=args.seed,
              scale=args.synthetic_scale, num_embeddings_per_feature=sizes)
    n_train = args.synthetic_train_batches or 64 * world
    n_test = args.synthetic_test_batches or 8 * world
    n_val = args.synthetic_val_batches or n_test
    train = CriteoSyntheticDataset("train", num_batches=n_train, **kw)
    val = CriteoSyntheticDataset("val", num_batches=n_val, **kw)
    test = CriteoSyntheticDataset("test", num_batches=n_test, **kw)

    def train_batches(epoch: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(derive_seed(args.seed, "train/order", epoch))
        order = torch.randperm(n_train, generator=g).tolist()
        return (train.batch(i) for i in order[rank::world])

    return Data(feature_names=list(train.keys), sizes=train.num_embeddings_per_feature,
                dense_in=13, train=train_batches, val=lambda: iter(val), test=lambda: iter(test),
                steps_per_epoch=len(train), bayes_logloss=test.bayes_logloss())


def preprocessed_data(args: argparse.Namespace, rank: int, world: int) -> Data:
    """A ``torchrec_cce.data.preprocess`` directory: one table per feature of exactly the
    vocabulary size (ids are already contiguous, nothing is taken modulo anything)."""
    from torchrec_cce.data.preprocessed import PreprocessedDataset, load_meta

    meta = load_meta(args.data_dir)
    kw = dict(batch_size=args.batch_size, rank=rank, world_size=world)
    splits = {}
    for split in ("train", "val", "test"):
        rows = int(meta["splits"].get(split, {}).get("rows", 0))
        if rows == 0:
            raise ValueError(f"{args.data_dir}: the {split} split is empty; re-run "
                             "`python -m torchrec_cce.data.preprocess` with --split (or "
                             "--split-by-order / --test-input) giving it rows")
        splits[split] = PreprocessedDataset(args.data_dir, split=split, shuffle=split == "train",
                                            seed=args.seed, **kw)
    train = splits["train"]
    fix = (lambda b: b) if train.dense_names else constant_dense

    def train_batches(epoch: int) -> Iterator[Batch]:
        train.set_epoch(epoch)
        return map(fix, train)

    notes = [] if train.dense_names else [
        "no dense features: DLRM gets one constant-1 dense column (its dense MLP learns a bias)"]
    return Data(feature_names=list(train.feature_names), sizes=[int(v) for v in train.vocab_sizes],
                dense_in=max(1, len(train.dense_names)), train=train_batches,
                val=lambda: map(fix, splits["val"]), test=lambda: map(fix, splits["test"]),
                steps_per_epoch=len(train), counts=train.counts, notes=notes)


def constant_dense(batch: Batch) -> Batch:
    """The batch with a constant-1 dense column in place of its (empty) dense features.

    TorchRec's DLRM needs ``dense_in_features >= 1``; a constant input makes the dense arch's
    output a learned vector, exactly what a dense-free model has (DLRM's bias terms)."""
    ones = torch.ones(batch.labels.shape[0], 1, dtype=torch.float32)
    return Batch(dense_features=ones, sparse_features=batch.sparse_features, labels=batch.labels)


def raw_file_data(args: argparse.Namespace, rank: int, world: int) -> Data:
    """Stream raw Criteo TSV / Avazu CSV files. Ids are taken modulo the table sizes here
    (:class:`ModuloIds`, which also reports collisions); missing val/test files are replaced by
    batches held out of the training stream."""
    criteo = args.data == "criteo_tsv"
    cls = CriteoTsvDataset if criteo else AvazuCsvDataset
    extra = {} if criteo else {"constant_dense": True}
    bs = args.batch_size

    def reader(path: str, **order: Any) -> Any:
        return cls(path, bs, rank=rank, world_size=world, **extra, **order)  # raw ids, no modulo

    held = []  # residues of the (unshuffled) batch index held out of train: 0 = test, 1 = val
    if not args.test_path:
        held.append(0)
    if not args.val_path:
        held.append(1)
    period = max(len(held) + 1, round(1 / args.test_fraction)) if held else 0
    # Held-out blocks are removed before the shuffle buffer, so they are the same every epoch.
    train = reader(args.train_path, shuffle_buffer=args.shuffle_buffer, seed=args.seed,
                   blocks=(lambda i: i % period not in held) if held else None)
    sizes = _sizes_flag(args) or [min(c or args.max_ids_per_feature, args.max_ids_per_feature)
                                  for c in train.cardinalities]
    names = list(train.keys)
    modulo = ModuloIds(names, sizes)

    def part(path: Optional[str], residue: int) -> Callable[[], Iterator[Batch]]:
        if path:
            return lambda: map(modulo, reader(path))
        return lambda: map(modulo, reader(args.train_path, blocks=lambda i: i % period == residue))

    def train_batches(epoch: int) -> Iterator[Batch]:
        train.set_epoch(epoch)  # the epoch's shuffle order: the same on a resume
        return map(modulo, train)

    rows = _count_lines(args.train_path) - (not criteo)
    steps = max(1, rows // (bs * world))
    steps -= sum(1 for i in range(steps) if held and i % period in held)
    order = (f"through a {args.shuffle_buffer:,}-row shuffle buffer" if args.shuffle_buffer > 1
             else "in file order (not shuffled)")
    notes = [f"{'Criteo TSV' if criteo else 'Avazu CSV'} streamed {order}; "
             f"table sizes {'from the flag' if args.num_embeddings_per_feature else 'Criteo Kaggle cardinalities' if criteo else '24/7/--max-ids-per-feature'}"]
    if held:
        parts = {0: "test (batch index % {p} == 0)", 1: "val (== 1)"}
        notes.append(f"held out of --train-path for " + ", ".join(
            parts[r].format(p=period) for r in held) + ": these batches are never trained on")
    return Data(feature_names=names, sizes=sizes, dense_in=13 if criteo else 1,
                train=train_batches, val=part(args.val_path, 1), test=part(args.test_path, 0),
                steps_per_epoch=max(1, steps), collisions=modulo, notes=notes)


def npy_data(args: argparse.Namespace, rank: int, world: int) -> Data:
    """TorchRec's Criteo npy layout: val/test are the first/second half of the test prefixes'
    files (TorchRec's convention; pass --test-path, e.g. day_23, for data disjoint from train)."""
    sizes = _sizes_flag(args) or [args.max_ids_per_feature] * 26
    kw = dict(batch_size=args.batch_size, rank=rank, world_size=world,
              num_embeddings_per_feature=sizes)

    def paths(prefixes: str) -> List[List[str]]:
        return [[f"{x}_{kind}.npy" for x in prefixes.split(",")]
                for kind in ("dense", "sparse", "labels")]

    train = CriteoNpyDataset(*paths(args.train_path), stage="train", **kw)
    test_prefixes = args.test_path or args.train_path
    val = CriteoNpyDataset(*paths(test_prefixes), stage="val", **kw)
    test = CriteoNpyDataset(*paths(test_prefixes), stage="test", **kw)
    return Data(feature_names=list(train.keys), sizes=sizes, dense_in=13,
                train=lambda epoch: iter(train), val=lambda: iter(val), test=lambda: iter(test),
                steps_per_epoch=len(train))


def _sizes_flag(args: argparse.Namespace) -> Optional[List[int]]:
    if not args.num_embeddings_per_feature:
        return None
    return [int(x) for x in args.num_embeddings_per_feature.split(",")]


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


class ModuloIds:
    """Takes raw ids modulo the table sizes and detects collisions on the way.

    Per feature, it remembers the first raw id seen at every table row (an int64 array of the
    table's size) while ``tracking``; a row reached by a second, different raw id is a
    collision: two of the data's values share an embedding, even with ``--method full``.
    Tracking covers the first epoch (about one table's worth of int64 per feature, freed at the
    first collision or at :meth:`stop`); it sees this rank's rows only, so it can only miss
    collisions, never invent one.
    """

    def __init__(self, names: Sequence[str], sizes: Sequence[int]) -> None:
        self.names = list(names)
        self.sizes = [int(n) for n in sizes]
        self._sizes = torch.tensor(self.sizes, dtype=torch.int64).view(-1, 1)
        self._first: Dict[int, torch.Tensor] = {
            f: torch.full((n,), -1, dtype=torch.int64) for f, n in enumerate(self.sizes)}
        self.collided = [False] * len(self.sizes)
        self.reported = [False] * len(self.sizes)

    def __call__(self, batch: Batch) -> Batch:
        kjt = batch.sparse_features
        stride = kjt.stride()
        values = kjt.values().view(len(self.sizes), stride)  # one id per sample and feature
        if self._first:
            self._observe(values)
        remapped = torch.remainder(values, self._sizes).reshape(-1)
        kjt = KeyedJaggedTensor(keys=kjt.keys(), values=remapped, lengths=kjt.lengths(),
                                stride=stride)
        return Batch(dense_features=batch.dense_features, sparse_features=kjt,
                     labels=batch.labels)

    def _observe(self, values: torch.Tensor) -> None:
        for f in list(self._first):
            first, raw = self._first[f], values[f]
            rows = torch.remainder(raw, self.sizes[f])
            unseen = first[rows] < 0
            first[rows[unseen]] = raw[unseen]
            if bool((first[rows] != raw).any()):
                self.collided[f] = True
                del self._first[f]

    def stop(self) -> None:
        self._first.clear()

    def report(self) -> Optional[str]:
        """Collective: the newly found colliding features over all ranks, as one line (or None)."""
        flags = torch.tensor([int(c) for c in self.collided])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        new = [f for f, c in enumerate(flags.tolist()) if c and not self.reported[f]]
        for f in new:
            self.reported[f] = self.collided[f] = True
        if not new:
            return None
        shown = ", ".join(f"{self.names[f]} ({self.sizes[f]} rows)" for f in new[:6])
        more = f" and {len(new) - 6} more" if len(new) > 6 else ""
        return (f"warning: ids taken modulo the table size collide in {len(new)} feature(s): "
                f"{shown}{more}; distinct values share rows even with --method full. Preprocess "
                "the files (python -m torchrec_cce.data.preprocess) and use --data preprocessed "
                "for tables of the true vocabulary sizes.")


def in_step(batches: Iterable[Batch], stop_after: Optional[int] = None) -> Iterator[Batch]:
    """Yield while *every* rank still has a batch (ranks of a streamed file may differ by one;
    a rank running ahead would hang the collectives)."""
    it = iter(batches)
    n = 0
    while stop_after is None or n < stop_after:
        batch = next(it, None)
        flag = torch.tensor([0 if batch is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag) == 0:
            return
        n += 1
        yield batch


# ---------------------------------------------------------------- model
def table_configs(data: Data, dim: int) -> List[EmbeddingBagConfig]:
    """One table ``t_<feature>`` per feature, ``num_embeddings`` = the data's table size."""
    tables, seen = [], set()
    for feature, n in zip(data.feature_names, data.sizes):
        name = "t_" + re.sub(r"\W", "_", feature)
        if name in seen:
            raise ValueError(f"features {data.feature_names} give the table name {name!r} twice "
                             "(non-alphanumeric characters become '_'): rename a feature")
        seen.add(name)
        tables.append(EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=int(n),
                                         feature_names=[feature]))
    return tables


def table_counts(data: Data, tables: List[EmbeddingBagConfig]) -> Optional[Dict[str, np.ndarray]]:
    """``{table: per-id training frequency}`` when the data has counts, else None."""
    counts = {t.name: data.counts(t.feature_names[0]) for t in tables}
    return None if any(c is None for c in counts.values()) else counts


def make_compression(tables: List[EmbeddingBagConfig], args: argparse.Namespace,
                     counts: Optional[Dict[str, np.ndarray]]) -> Tuple[Dict, int]:
    """The compression configs of ``--method`` at the per-table cap.

    ``counts`` (table -> int64 ``[num_embeddings]`` training frequencies, or None) is the hook
    for frequency-aware methods and planning (MPE's frequency groups); the methods here do not
    use it."""
    cap = args.max_params_per_table or max(16, max(t.num_embeddings for t in tables)
                                           * args.embedding_dim // 16)
    if args.method == "mpe":
        base = MPEConfig(groups=args.mpe_groups, tau=args.mpe_tau, lam=args.mpe_lambda,
                         bits=tuple(int(b) for b in args.mpe_bits.split(",")), seed=args.seed)
        compression = compression_for_budget(tables, "mpe", cap, mpe=base)
        if counts is not None:  # frequency groups from the data's per-id counts
            compression = {n: dataclasses.replace(c, counts=counts[n])
                           for n, c in compression.items()}
        return compression, cap
    return compression_for_budget(tables, args.method, cap, chunks=args.chunks,
                                  seed=args.seed, qr_operation=args.qr_operation), cap


def build_model(args: argparse.Namespace, data: Data) -> Tuple[nn.Module, Dict[str, Any]]:
    dim = args.embedding_dim
    tables = table_configs(data, dim)
    plan = None
    if args.embedding_budget_mb is not None:  # the byte-budget planner (torchrec_cce.budget)
        counts = table_counts(data, tables)
        kwargs = dict(counts=counts, chunks=args.chunks,
                      assignment_share=args.cce_assignment_share,
                      qr_operation=args.qr_operation, codebook_dtype=codebook_dtype(args),
                      serving_dtype=serving_dtype(args), allocation=args.planner_allocation)
        budget_bytes = int(args.embedding_budget_mb * 2**20)
        if args.plan_candidate is None:
            plan = plan_compression(tables, budget_bytes, methods=args.planner_methods,
                                    **kwargs)
            candidates = 1
        else:  # --plan-select validation: one of the planner's candidate plans
            plans = plan_candidates(tables, budget_bytes, **kwargs)
            plan, candidates = plans[args.plan_candidate], len(plans)
        compression, cap = plan.compression, None
        # MPE: the planner fixed the candidate widths (its serving-bytes bound); the search
        # hyper-parameters and seed come from the flags.
        compression = {n: (dataclasses.replace(c, tau=args.mpe_tau, lam=args.mpe_lambda,
                                               seed=args.seed) if isinstance(c, MPEConfig)
                           else c) for n, c in compression.items()}
        used = sorted({p.method for p in plan.tables.values() if p.method != "full"})
        args.method = used[0] if len(used) == 1 else ("full" if not used else "mixed")
    else:
        compression, cap = make_compression(tables, args, table_counts(data, tables))
        candidates = 1
    compression = apply_cce_settings(compression, args)
    # An all-MPE collection has no codebook for the planner (shard_model shards it itself).
    all_mpe = args.method == "mpe" and len(compression) == len(tables)
    ebc = CCEEmbeddingBagCollection(tables, compression, device=torch.device("meta"))
    dense = [int(x) for x in args.dense_arch.split(",")]
    over = [int(x) for x in args.over_arch.split(",")]
    if dense[-1] != dim:
        raise ValueError(f"--dense-arch must end with the embedding dim {dim}, got {dense}")
    if args.dcn:
        dlrm = DLRM_DCN(embedding_bag_collection=ebc, dense_in_features=data.dense_in,
                        dense_arch_layer_sizes=dense, over_arch_layer_sizes=over,
                        dcn_num_layers=args.dcn_layers, dcn_low_rank_dim=args.dcn_low_rank,
                        dense_device=torch.device("cpu"))
    else:
        dlrm = DLRM(embedding_bag_collection=ebc, dense_in_features=data.dense_in,
                    dense_arch_layer_sizes=dense, over_arch_layer_sizes=over,
                    dense_device=torch.device("cpu"))
    train_module = MPEDLRMTrain(dlrm) if args.method == "mpe" else DLRMTrain(dlrm)
    return train_module, {"max_params_per_table": cap, "compressed_tables": len(compression),
                          "has_cce": any(isinstance(c, CCEConfig) for c in compression.values()),
                          "all_mpe": all_mpe,
                          "tables": {t.name: t.num_embeddings for t in tables}, "plan": plan,
                          "plan_candidates": candidates,
                          "table_configs": tables, "compression": compression}


class MPEDLRMTrain(DLRMTrain):
    """DLRMTrain whose loss adds MPE's memory penalty (0 outside the search stage)."""

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        loss, outputs = super().forward(batch)
        return loss + mpe_penalty(self), outputs


def sparse_optimizer(name: str) -> Tuple[type, Dict[str, Any]]:
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.optimizers import SGD

    if name == "rowwise_adagrad":
        return RowWiseAdagrad, {"eps": 1e-8}
    if name == "adagrad":
        return torch.optim.Adagrad, {"eps": 1e-8}
    return SGD, {}


def dense_optimizer(name: str, lr: float) -> Callable[[Any], torch.optim.Optimizer]:
    if name == "adam":
        return lambda params: torch.optim.Adam(params, lr=lr)
    if name == "adagrad":
        return lambda params: torch.optim.Adagrad(params, lr=lr, eps=1e-8)
    return lambda params: torch.optim.SGD(params, lr=lr)


def shard_model(model: nn.Module, args: argparse.Namespace, world: int, device: torch.device
                ) -> Tuple[nn.Module, str]:
    opt_cls, opt_kw = sparse_optimizer(args.sparse_optimizer)
    # Every embedding row gets the sparse optimizer at --lr, stepped in backward: codebooks
    # (2-D TBE tables: fbgemm's fused optimizer) and MPE's fp32 master weights (2-D, split by
    # id range: the sharder gives them torch's form of the same rule, e.g. row-wise Adagrad
    # with sparse gradients); MEmCom's 1-D per-id weights (split by id range) get torch's
    # optimizer of the same rule (Adagrad = row-wise Adagrad on one-element rows). Both are
    # checkpointed in dmp.fused_optimizer. MPE's small replicated logits, LSQ+ steps and
    # offsets (DDP) train with the dense optimizer.
    ebc = model.model.sparse_arch.embedding_bag_collection
    mpe_small = {id(p) for m in ebc.tables.values() if isinstance(m, MPETable)
                 for p in (m.logits, m.alpha, m.beta)}
    sparse = [p for p in model.model.sparse_arch.parameters() if id(p) not in mpe_small]
    apply_optimizer_in_backward(opt_cls, [p for p in sparse if p.dim() == 2],
                                {"lr": args.lr, **opt_kw})
    per_id = [p for p in sparse if p.dim() == 1]
    if per_id:
        per_id_cls = torch.optim.SGD if args.sparse_optimizer == "sgd" else torch.optim.Adagrad
        apply_optimizer_in_backward(per_id_cls, per_id, {"lr": args.lr, **opt_kw})
    sharder = CCEEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder())
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world,
                      local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world))),
        kernel_config=KernelConfig(compute_device=device.type))
    # TorchRec's default reservation, with the dense parts' size given explicitly (its own
    # heuristic: 6 x the dense parameter bytes, for weights, optimizer state and DDP buckets).
    dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if "sparse_arch" not in n)
    base = HeuristicalStorageReservation(percentage=0.15, dense_tensor_estimate=6 * dense_bytes)
    # One recipe for every method: every embedding table (full tables and codebooks alike) is
    # model-parallel, so it trains with the fused sparse optimizer at --lr. TorchRec's planner
    # would place small tables data-parallel, and DMP trains those with the dense optimizer at
    # --dense-lr instead: methods whose codebooks are small would then train with another
    # optimizer than the full table (and float16 ones would NaN: torch Adagrad's float16 state
    # underflows eps to 0 at step 1).
    from torchrec.distributed.planner.types import ParameterConstraints

    # Serving INT-N rows quantises whole rows: evaluating the served values (served_codebooks)
    # needs every codebook row on one rank, so column-wise placements are left out then.
    split_rows = ("data_parallel",) + (("column_wise", "table_column_wise")
                                       if args.serving_dtype else ())
    model_parallel = [s for s in sharder.sharding_types(device.type) if s not in split_rows]
    constraints = {c.name: ParameterConstraints(sharding_types=model_parallel)
                   for c in getattr(ebc, "codebook_table_configs", lambda: [])()}
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=args.batch_size,
                                       storage_reservation=CCEStorageReservation(base=base),
                                       constraints=constraints or None)
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    table = format_plan(plan_memory(plan, model, world))  # before DMP swaps modules
    env = ShardingEnv.from_process_group(dist.GroupMember.WORLD)
    # A collection the plan does not place (all tables MPE: no codebook) is sharded here.
    model = shard_unplanned(model, plan, sharder, env, device)
    dmp = DistributedModelParallel(model, env=env, plan=plan, sharders=[sharder], device=device)
    return dmp, table


def format_plan(rows: Dict[str, Dict[str, Any]], max_rows: int = 8) -> str:
    """The plan's memory table; beyond ``max_rows`` tables, the uncompressed ones are summed
    into one line so the table stays short."""
    if len(rows) <= max_rows:
        return format_plan_memory(rows)
    kept = {k: r for k, r in rows.items() if r["method"] != "full"}
    full = [r for r in rows.values() if r["method"] == "full"]
    mib = 1 << 20
    text = format_plan_memory(kept) if kept else ""
    if full:
        total = sum(r["full_bytes"] for r in full) / mib
        ranks = [sum(r["bytes_per_rank"][i] for r in full) / mib
                 for i in range(len(full[0]["bytes_per_rank"]))]
        line = (f"{f'+{len(full)} full':<16}{'full':<9}{total:>12.3f}{total:>16.3f}"
                + "".join(f"{b:>13.3f}" for b in ranks))
        text = f"{text}\n{line}" if text else line
    return text


# ---------------------------------------------------------------- optimizers
class Optimizers:
    """The dense optimizer (stepped by the pipeline), the fused sparse optimizers (run inside
    backward by fbgemm / DDP) and one learning-rate knob over all of them.

    The fused TBE optimizers read their lr from ``dmp.fused_optimizer``'s param groups only
    when that KeyedOptimizer's ``zero_grad``/``step`` runs (nothing else calls them when the
    update happens in backward), so :meth:`set_lr` writes the groups and then calls
    ``zero_grad``. Replicated (data-parallel) tables keep their torch optimizers on
    ``param._in_backward_optimizers``; their groups are written directly.
    """

    def __init__(self, dmp: nn.Module, args: argparse.Namespace) -> None:
        self.dense = KeyedOptimizerWrapper(
            dict(in_backward_optimizer_filter(dmp.named_parameters())),
            dense_optimizer(args.dense_optimizer, args.dense_lr))
        self.fused = dmp.fused_optimizer if isinstance(dmp, DistributedModelParallel) else None
        self.combined = CombinedOptimizer(([self.fused] if self.fused else []) + [self.dense])
        fused_ids = {id(g) for g in (self.fused.param_groups if self.fused else [])}
        self.in_backward = [opt for p in dmp.parameters()
                            for opt in getattr(p, "_in_backward_optimizers", [])
                            if not any(id(g) in fused_ids for g in opt.param_groups)]
        self.dense_lr, self.sparse_lr = args.dense_lr, args.lr
        self.warmup = args.warmup_steps
        self._factor: Optional[float] = None

    def factor(self, step: int) -> float:
        """Linear warm-up: the multiplier of training step ``step`` (1-based)."""
        return 1.0 if self.warmup <= 0 else min(1.0, step / self.warmup)

    def before_step(self, step: int) -> None:
        """Set the learning rates for training step ``step`` (1-based) if they change."""
        f = self.factor(step)
        if f != self._factor:
            self.set_lr(self.dense_lr * f, self.sparse_lr * f)
            self._factor = f

    def set_lr(self, dense_lr: float, sparse_lr: float) -> None:
        for group in self.dense.param_groups:
            group["lr"] = dense_lr
        if self.fused is not None:
            for group in self.fused.param_groups:
                group["lr"] = sparse_lr
            self.fused.zero_grad()  # pushes the groups' lr into the fbgemm TBE modules
        for opt in self.in_backward:
            for group in opt.param_groups:
                group["lr"] = sparse_lr


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(dmp: nn.Module, batches: Iterable[Batch], device: torch.device) -> Dict[str, float]:
    """Log loss (mean BCE) and AUC of ``dmp`` on ``batches``, over all ranks."""
    dmp.eval()
    auroc = torchmetrics.classification.BinaryAUROC().to(device)
    logloss = torchmetrics.MeanMetric().to(device)
    for batch in in_step(batches):
        batch = batch.to(device)
        _, (_, logits, labels) = dmp(batch)
        probs = torch.sigmoid(logits.float())
        auroc.update(probs, labels.int())
        logloss.update(nn.functional.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), reduction="none"))
    dmp.train()
    return {"logloss": float(logloss.compute()), "auc": float(auroc.compute())}


class Protocol:
    """Every evaluation, the best one (lowest validation log loss; ties: the earlier), and the
    early-stopping rule: stop after ``patience`` evaluations in a row without a new best."""

    def __init__(self, patience: Optional[int] = None) -> None:
        self.patience = patience
        self.evaluations: List[Dict[str, Any]] = []

    def add(self, record: Dict[str, Any]) -> bool:
        """Record an evaluation; True if it is the new best."""
        self.evaluations.append(record)
        return self.best is record

    @property
    def best(self) -> Optional[Dict[str, Any]]:
        if not self.evaluations:
            return None
        return min(self.evaluations, key=lambda r: r["val_logloss"])  # first of equal minima

    @property
    def since_best(self) -> int:
        best = self.best
        return 0 if best is None else len(self.evaluations) - 1 - self.evaluations.index(best)

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    def last_step(self) -> Optional[int]:
        return self.evaluations[-1]["step"] if self.evaluations else None

    def state(self) -> str:
        return json.dumps(self.evaluations)

    def load(self, state: str) -> None:
        self.evaluations = json.loads(state) if state else []


def run_evaluation(ctx: "Training", epoch: int) -> Dict[str, Any]:
    """Evaluate val and test on the current state; record it in the protocol."""
    if isinstance(ctx.pipeline, TrainPipelineSparseDist):
        ctx.pipeline.detach()  # the modules' own forward; progress() re-attaches
    t0 = time.perf_counter()
    # --serving-dtype: evaluate the served model (codebook entries at their INT-N values)
    dtype = serving_dtype(ctx.args)
    with served_codebooks(ctx.dmp, dtype) if dtype is not None else contextlib.nullcontext():
        val = evaluate(ctx.dmp, ctx.data.val(), ctx.device)
        test = evaluate(ctx.dmp, ctx.data.test(), ctx.device)
    record = {"epoch": epoch, "step": ctx.progress["step"],
              "val_logloss": val["logloss"], "val_auc": val["auc"],
              "test_logloss": test["logloss"], "test_auc": test["auc"]}
    best = ctx.protocol.add(record)
    ctx.eval_seconds += time.perf_counter() - t0
    if ctx.writer:
        for k in ("val_logloss", "val_auc", "test_logloss", "test_auc"):
            ctx.writer.add_scalar(k.replace("_", "/", 1), record[k], record["step"])
    ctx.say(f"eval epoch {epoch} step {record['step']}: val log loss {val['logloss']:.4f} "
            f"AUC {val['auc']:.4f}{'  (best)' if best else ''}")
    return record


# ---------------------------------------------------------------- checkpoints
# Test hook: "N[,M,...]" makes rank 1 SIGKILL itself right after step N in the first attempt
# (TORCHELASTIC_RESTART_COUNT=0), after step M in the second, ... (tests/test_elastic.py,
# benchmarks/soak.py).
FAULT_ENV = "TORCHREC_CCE_FAULT_AT_STEP"
# Settings a checkpoint must have been written with (they change the model or its state).
MODEL_FLAGS = ("data", "method", "embedding_dim", "chunks", "qr_operation", "embedding_budget_mb",
               "mpe_bits", "mpe_groups", "dense_arch", "over_arch", "dcn", "dcn_layers",
               "dcn_low_rank", "sparse_optimizer", "dense_optimizer", "seed", "cce_init",
               "cce_keep_remainder", "cce_assignment_share", "codebook_dtype",
               "planner_allocation")


def checkpoint_manager(args: argparse.Namespace, budget: Dict[str, Any],
                       log: Callable[[str], None]) -> Optional[CheckpointManager]:
    if not args.checkpoint_dir:
        return None
    config = {k: getattr(args, k) for k in MODEL_FLAGS}
    if args.serving_dtype:  # only when set, so checkpoints written before the flag still load
        config["serving_dtype"] = args.serving_dtype
    config.update(max_params_per_table=budget["max_params_per_table"], tables=budget["tables"])
    return CheckpointManager(args.checkpoint_dir, keep=args.keep_checkpoints, config=config,
                             batch_size=args.batch_size, log=log)


def save_checkpoint(ctx: "Training") -> None:
    if ctx.checkpoints is None:
        return
    progress = {**ctx.progress, "protocol": ctx.protocol.state()}
    ctx.last_checkpoint = ctx.checkpoints.save(ctx.progress["step"], ctx.dmp, ctx.optim.combined,
                                               progress)


def load_checkpoint(ctx: "Training") -> None:
    """Continue from the newest usable checkpoint (model, optimizers, re-clustering reservoirs,
    RNG states, data position, evaluations so far); nothing yet: a fresh start."""
    resumed = ctx.checkpoints.load(ctx.dmp, ctx.optim.combined)
    if resumed is None:
        return
    progress = dict(resumed.progress)
    ctx.protocol.load(progress.pop("protocol", ""))
    ctx.progress = {"step": int(progress["step"]), "epoch": int(progress["epoch"]),
                    "step_in_epoch": int(progress.get("step_in_epoch", 0))}
    ctx.resumed_from, ctx.last_checkpoint = resumed.step, resumed.path


def inject_fault(ctx: "Training", step: int) -> None:
    """The ``$TORCHREC_CCE_FAULT_AT_STEP`` test hook (see FAULT_ENV)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    steps = [int(x) for x in spec.split(",") if x.strip()]
    if attempt < len(steps) and step == steps[attempt] and ctx.rank == min(1, ctx.world - 1):
        print(f"injected fault: SIGKILL of rank {ctx.rank} after step {step} "
              f"(attempt {attempt})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- training
@dataclass
class Training:
    """Everything the training loop touches (one run, this rank)."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    data: Data
    dmp: nn.Module
    optim: Optimizers
    pipeline: Any
    schedule: ReclusterSchedule
    protocol: Protocol
    budget: Dict[str, Any]
    plan_table: str
    progress: Dict[str, int] = field(
        default_factory=lambda: {"step": 0, "epoch": 0, "step_in_epoch": 0})
    checkpoints: Optional[CheckpointManager] = None
    last_checkpoint: Optional[str] = None
    resumed_from: Optional[int] = None
    writer: Any = None
    bar: Any = None
    losses: List[Tuple[int, float]] = field(default_factory=list)
    recluster_log: List[Dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    recluster_seconds: float = 0.0
    eval_seconds: float = 0.0
    mpe: Optional[MPESchedule] = None
    mpe_log: List[Dict[str, Any]] = field(default_factory=list)

    def say(self, text: str) -> None:
        if self.rank == 0:
            (self.bar.write if self.bar is not None else print)(text)


def setup(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> Training:
    """Data, model, sharding, optimizers, pipeline and (with --resume) the checkpoint."""
    torch.manual_seed(args.seed)
    data = load_data(args, rank, world)
    model, budget = build_model(args, data)
    dmp, plan_table = shard_model(model, args, world, device)
    optim = Optimizers(dmp, args)
    # An all-MPE model has no codebook EBC: the sparse-dist pipeline's fx trace of the model
    # fails on it (and has no input dist to overlap), so it trains with the base pipeline.
    pipeline = (TrainPipelineSparseDist(dmp, optim.dense, device)
                if isinstance(dmp, DistributedModelParallel) and not budget["all_mpe"]
                else TrainPipelineBase(dmp, optim.dense, device))
    cs = cce_settings(args)
    has_cce = budget["has_cce"]
    schedule = ReclusterSchedule.from_epochs(
        data.steps_per_epoch or 1,
        [float(x) for x in cs["recluster_at"].split(",") if x] if has_cce else [],
        every_epoch=cs["recluster_every_epoch"] if has_cce else 0,
        iters=cs["kmeans_iters"])
    ctx = Training(args, rank, world, device, data, dmp, optim, pipeline, schedule,
                   Protocol(args.patience), budget, plan_table)
    if args.method == "mpe":
        counted = table_counts(data, table_configs(data, args.embedding_dim)) is not None
        epoch_steps = data.steps_per_epoch or 1
        warmup = args.mpe_warmup_steps
        warmup = (0 if counted else max(1, epoch_steps // 10)) if warmup is None else warmup
        ctx.mpe = MPESchedule(search_steps=args.mpe_search_steps or epoch_steps,
                              warmup_steps=warmup)
    ctx.checkpoints = checkpoint_manager(args, budget, ctx.say)
    if args.resume:
        load_checkpoint(ctx)
    return ctx


def train_steps(ctx: Training, batches: Iterator[Batch]) -> int:
    """Train on ``batches`` until they run out; the pipeline is drained and reset at the end
    (so an evaluation can follow). Returns the number of steps."""
    n = 0
    while True:
        ctx.optim.before_step(ctx.progress["step"] + 1)
        try:
            loss, _, labels = ctx.pipeline.progress(batches)
        except StopIteration:
            break
        n += 1
        step = ctx.progress["step"] = ctx.progress["step"] + 1
        ctx.progress["step_in_epoch"] += 1
        guard_loss(loss, step, ctx.dmp, ctx.last_checkpoint)  # NaN/inf: stop, nothing saved
        inject_fault(ctx, step)
        ctx.samples += labels.numel() * ctx.world
        value = float(loss)
        ctx.losses.append((step, value))
        if ctx.writer:
            ctx.writer.add_scalar("train/loss", value, step)
        if ctx.bar is not None:
            ctx.bar.set_postfix(loss=f"{value:.4f}")
            ctx.bar.update(1)
        if ctx.data.collisions is not None and step == 100 and ctx.progress["epoch"] == 0:
            report_collisions(ctx)
        if ctx.schedule.due(step):
            t_rc = time.perf_counter()
            stats = ctx.schedule.step(ctx.dmp, step, optimizers=[ctx.optim.dense])
            redo_pending_input_dist(ctx.pipeline)
            ctx.recluster_seconds += time.perf_counter() - t_rc
            ctx.recluster_log.append({"step": step, "tables": stats})
            secs = sum(s["seconds"] for s in stats.values())
            ctx.say(f"re-clustered {len(stats)} tables at step {step} in {secs:.2f} s")
        if ctx.mpe is not None and (ctx.mpe.due(step) or step == 1):
            events = ctx.mpe.step(ctx.dmp, step, optimizers=[ctx.optim.dense])
            if events:
                kinds = sorted({e["event"] for e in events.values()})
                ctx.mpe_log.append({"step": step, "events": kinds,
                                    "tables": mpe_summary(ctx.dmp)})
                ctx.say(f"MPE {', '.join(kinds)} for {len(events)} tables at step {step}")
    ctx.pipeline.reset()
    return n


def report_collisions(ctx: Training) -> None:
    line = ctx.data.collisions.report()
    if line:
        ctx.say(line)


def train_epoch(ctx: Training, epoch: int) -> bool:
    """One epoch with its evaluations; False when training should stop (patience, max steps)."""
    args = ctx.args
    steps_left = None if args.max_steps is None else args.max_steps - ctx.progress["step"]
    done = ctx.progress["step_in_epoch"]  # > 0: resumed mid-epoch, these batches are trained
    source = ctx.data.train(epoch)
    batches = in_step(itertools.islice(source, done, None) if done else source, steps_left)
    ctx.bar = tqdm(total=ctx.data.steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}",
                   leave=False, disable=ctx.rank != 0 or args.no_progress, dynamic_ncols=True)
    if ctx.bar.disable:
        ctx.bar = None
    every = [n for n in (args.eval_every, args.checkpoint_every) if n]
    while True:  # segments end at evaluation and checkpoint steps (the pipeline is drained)
        segment = min((n - ctx.progress["step"] % n for n in every), default=None)
        ran = train_steps(ctx, itertools.islice(batches, segment) if segment else batches)
        if segment is None or ran < segment:
            break  # this epoch's data (or --max-steps) ran out
        step = ctx.progress["step"]
        if args.eval_every and step % args.eval_every == 0:
            run_evaluation(ctx, epoch + 1)
            if ctx.protocol.should_stop:
                break
        if (args.checkpoint_every and step % args.checkpoint_every == 0
                and ctx.progress["step_in_epoch"] != ctx.data.steps_per_epoch):  # (epoch end follows)
            save_checkpoint(ctx)
    if ctx.bar is not None:
        ctx.bar.close()
        ctx.bar = None
    if ctx.data.collisions is not None:  # the first epoch's check (or a resumed run's first)
        report_collisions(ctx)
        ctx.data.collisions.stop()
    hit_max = args.max_steps is not None and ctx.progress["step"] >= args.max_steps
    if not (hit_max and ctx.progress["step_in_epoch"] != ctx.data.steps_per_epoch):
        # the epoch's data ran out (--max-steps mid-epoch keeps the position for a resume)
        ctx.progress["epoch"] = epoch + 1
        ctx.progress["step_in_epoch"] = 0
    if ctx.protocol.last_step() != ctx.progress["step"]:
        run_evaluation(ctx, epoch + 1)
    save_checkpoint(ctx)
    return not (ctx.protocol.should_stop or hit_max)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    quiet_known_warnings()
    rank, world, device = init_distributed()
    try:
        return train(args, rank, world, device)
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> Dict[str, Any]:
    """One training run (or, with --plan-select validation, one per candidate plan); rank 0
    prints the summary and writes --metrics-json / --loss-curve-png."""
    if args.plan_select == "validation":
        metrics, ctx_losses = select_plan(args, rank, world, device)
    else:
        metrics, ctx_losses = train_run(args, rank, world, device)
    if rank == 0:
        print_summary(metrics)
        if args.metrics_json:
            os.makedirs(os.path.dirname(os.path.abspath(args.metrics_json)), exist_ok=True)
            with open(args.metrics_json, "w") as f:
                json.dump(metrics, f, indent=1)
        if args.loss_curve_png:
            plot_loss(*ctx_losses, metrics, args.loss_curve_png)
    return metrics


def select_plan(args: argparse.Namespace, rank: int, world: int, device: torch.device
                ) -> Tuple[Dict[str, Any], Tuple[Any, Any]]:
    """``--plan-select validation``: train every distinct plan of
    :func:`torchrec_cce.plan_candidates` with the same seed and recipe, keep the run with the
    lowest best validation log loss (its test metrics are the result; the test set plays no
    part in the choice). ``metrics["plan_selection"]`` lists every candidate."""
    start = time.perf_counter()
    runs: List[Tuple[Dict[str, Any], Tuple[Any, Any]]] = []
    i, count = 0, 1
    while i < count:
        run_args = argparse.Namespace(**{**vars(args), "plan_candidate": i})
        if args.tensorboard_dir:
            run_args.tensorboard_dir = os.path.join(args.tensorboard_dir, f"candidate{i}")
        if rank == 0:
            print(f"-- candidate plan {i + 1}{'' if i == 0 else f' of {count}'} "
                  "(--plan-select validation)", flush=True)
        metrics, curves = train_run(run_args, rank, world, device)
        count = metrics.pop("plan_candidates")
        runs.append((metrics, curves))
        i += 1
    best = min(range(len(runs)), key=lambda j: (runs[j][0]["val_logloss"], j))
    metrics, curves = runs[best]
    metrics = dict(metrics)
    metrics["plan_selection"] = {
        "chosen": best,
        "candidates": [{"plan": m["embedding_plan"], "method": m["method"],
                        "val_logloss": m["val_logloss"], "val_auc": m["val_auc"],
                        "test_logloss": m["test_logloss"], "test_auc": m["test_auc"],
                        "best_epoch": m["best_epoch"], "wall_seconds": m["wall_seconds"]}
                       for m, _ in runs]}
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["args"] = dict(metrics["args"], plan_candidate=None)
    if rank == 0:
        print("plan selection (lowest val log loss): " + ", ".join(
            f"{j}: {m['method']} {m['val_logloss']:.4f}" + (" *" if j == best else "")
            for j, (m, _) in enumerate(runs)), flush=True)
    return metrics, curves


def train_run(args: argparse.Namespace, rank: int, world: int, device: torch.device
              ) -> Tuple[Dict[str, Any], Tuple[Any, Any]]:
    """Train one model; returns its metrics and (loss curve, re-clusterings) for the plot."""
    start = time.perf_counter()
    ctx = setup(args, rank, world, device)
    if args.tensorboard_dir and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        ctx.writer = SummaryWriter(args.tensorboard_dir)
    limit = (f"<= {ctx.budget['max_params_per_table']} params" if ctx.budget["plan"] is None
             else f"fit {args.embedding_budget_mb} MiB:\n{ctx.budget['plan'].format()}")
    ctx.say(f"world {world} on {device}; method {args.method}; {len(ctx.budget['tables'])} "
            f"tables, {ctx.budget['compressed_tables']} compressed to {limit}\n{ctx.plan_table}")
    for note in ctx.data.notes:
        ctx.say(note)

    t0 = time.perf_counter()
    keep_going = not ctx.protocol.should_stop
    for epoch in range(ctx.progress["epoch"], args.epochs):
        if not keep_going or (args.max_steps is not None and ctx.progress["step"] >= args.max_steps):
            break
        keep_going = train_epoch(ctx, epoch)
    train_seconds = time.perf_counter() - t0
    if ctx.protocol.last_step() != ctx.progress["step"] or not ctx.protocol.evaluations:
        run_evaluation(ctx, ctx.progress["epoch"])  # e.g. resumed past the last epoch
    if isinstance(ctx.pipeline, TrainPipelineSparseDist):
        ctx.pipeline.detach()  # leave the modules' own forward for the caller
    metrics = collect_metrics(ctx, train_seconds, start)
    if ctx.writer:
        ctx.writer.close()
    return metrics, (ctx.losses, ctx.recluster_log)


def collect_metrics(ctx: Training, train_seconds: float, start: float) -> Dict[str, Any]:
    best = ctx.protocol.best
    report = memory_report(ctx.dmp)
    dtype = serving_dtype(ctx.args)
    if dtype is not None:  # served with INT-N codebooks: the serving size is what is stored
        for t in ctx.budget["table_configs"]:
            row = report[t.name]
            served = config_bytes(t, ctx.budget["compression"].get(t.name), dtype)
            row.update(serving_bytes=served, compressed_bytes=served,
                       ratio=row["full_bytes"] / served)
    totals = summarize(report)
    step_seconds = train_seconds - ctx.recluster_seconds - ctx.eval_seconds
    return {
        # the state with the lowest validation log loss
        "test_logloss": best["test_logloss"],
        "test_auc": best["test_auc"],
        "val_logloss": best["val_logloss"],
        "val_auc": best["val_auc"],
        "best_epoch": best["epoch"],
        "best_step": best["step"],
        "evaluations": ctx.protocol.evaluations,
        "stopped_early": ctx.protocol.should_stop,
        # Throughput of training steps; re-clustering and evaluation time are reported apart.
        "train_samples_per_s": ctx.samples / max(1e-9, step_seconds),
        "recluster_seconds": ctx.recluster_seconds,
        "eval_seconds": ctx.eval_seconds,
        "embedding_params": totals["params"],
        "embedding_bytes": totals["compressed_bytes"],
        "embedding_training_bytes": totals["training_bytes"],
        "embedding_serving_bytes": totals["serving_bytes"],
        "mpe": ctx.mpe_log,
        "full_embedding_bytes": totals["full_bytes"],
        "full_embedding_params": totals["full_params"],
        "assignment_bytes": totals["assignment_bytes"],
        "compression_ratio_params": totals["param_ratio"],
        "compression_ratio_bytes": totals["byte_ratio"],
        "table_rows": ctx.budget["tables"],
        # per table: method and bytes as stored; with --embedding-budget-mb the planner's choice
        "embedding_tables": report,
        "embedding_plan": (ctx.budget["plan"].to_dict() if ctx.budget["plan"] is not None
                           else None),
        "plan_candidates": ctx.budget["plan_candidates"],
        "colliding_features": ([n for n, c in zip(ctx.data.collisions.names,
                                                  ctx.data.collisions.reported) if c]
                               if ctx.data.collisions is not None else []),
        "bayes_logloss": ctx.data.bayes_logloss,
        "world_size": ctx.world,
        "method": ctx.args.method,
        "steps": ctx.progress["step"],
        "epochs": ctx.progress["epoch"],
        # this attempt: torchrun's restart count, the checkpoint step it resumed from (or None)
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "resumed_from_step": ctx.resumed_from,
        "last_checkpoint": ctx.last_checkpoint,
        "train_loss_curve": ctx.losses,
        "reclusterings": ctx.recluster_log,
        # the CCE schedule/init in effect (flags given, else train.py's defaults)
        "cce_settings": (dict(cce_settings(ctx.args), recluster_steps=ctx.schedule.at_steps)
                         if ctx.budget.get("has_cce") else None),
        "wall_seconds": time.perf_counter() - start,
        "args": vars(ctx.args),
    }


def print_summary(m: Dict[str, Any]) -> None:
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


if __name__ == "__main__":
    main()
