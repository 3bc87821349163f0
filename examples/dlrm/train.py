"""DLRM with compressed embedding tables: the one training script every launcher runs.

    torchx run launch/components.py:dlrm -j 1x2 -- --data synthetic --method cce --epochs 1
    torchrun --nproc_per_node 2 examples/dlrm/train.py --data synthetic --method cce
    python -m torchrec_cce.data.preprocess --format csv --input my.csv ... --out my_data
    python examples/dlrm/train.py --data preprocessed --data-dir my_data --method full --epochs 5

Reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun, TorchX); a plain ``python`` run is a world of
one. Backend: ``$TORCHREC_CCE_BACKEND``, else NCCL with CUDA, else gloo.

Pipeline: data (torchrec_cce.data.sources) -> TorchRec DLRM over a CCEEmbeddingBagCollection
-> planner with the CCE storage reservation + DMP with the CCE sharder (torchrec_cce.train) ->
sparse optimizer in backward + dense optimizer with warm-up -> TrainPipelineSparseDist;
re-clustering and MPE's stages run as hooks after the steps.

Protocol (train.evaluation): the validation split is evaluated at the end of every epoch (and
every ``--eval-every`` steps); each evaluation also evaluates the test split on the same model
state, and the reported ``test_logloss``/``test_auc`` are those of the evaluation with the
lowest validation log loss (``best_epoch``/``best_step``). ``--patience N`` stops after N
evaluations without a new best. The learning rates warm up linearly over ``--warmup-steps``.
"""

import argparse
import itertools
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from torchrec_cce import CCEEmbeddingBagCollection  # noqa: E402
from torchrec_cce.checkpoint import guard_loss  # noqa: E402
from torchrec_cce.configs import METHOD_NAMES  # noqa: E402
from torchrec_cce.data.common import DEFAULT_SHUFFLE_BUFFER  # noqa: E402
from torchrec_cce.data.sources import (  # noqa: E402
    DATA_CHOICES, load_data, table_configs, table_counts)
from torchrec_cce.train import (  # noqa: E402
    MPEDLRMTrain, MPEHook, Optimizers, Protocol, ReclusterHook, apply_sparse_optimizer,
    default_warmup_steps, dense_optimizer, evaluate_val_test, in_step, init_distributed,
    make_pipeline, regularize_pooled, shard, training_hooks)
from torchrec_cce.train.checkpoint import (  # noqa: E402
    checkpoint_manager, inject_fault, load_checkpoint, save_checkpoint)
from torchrec_cce.train.defaults import (  # noqa: E402
    DEFAULT_CCE_ASSIGNMENT_SHARE, DEFAULT_CCE_INIT, DEFAULT_KMEANS_ITERS, DEFAULT_RECLUSTER_HELP,
    apply_cce_settings, cce_settings, has_cce, make_compression, parse_hot_ids,
    planned_compression, recluster_fractions, serving_dtype)
from torchrec_cce.train.plan_select import select_plan  # noqa: E402
from torchrec_cce.train.report import (  # noqa: E402
    plot_loss, print_summary, quiet_known_warnings, run_metrics, write_metrics)

# ---------------------------------------------------------------- config: the flags
FLAGS: List[Tuple[str, Tuple[str, ...], Dict[str, Any]]] = [
    ("data", ("--data",), dict(choices=DATA_CHOICES, default="synthetic", help=(
        "preprocessed: a directory written by `python -m torchrec_cce.data.preprocess` (tables = "
        "the vocabulary sizes, so --method full is collision-free; shuffled per epoch). "
        "criteo_tsv / avazu_csv stream raw files through a bounded shuffle buffer "
        "(--shuffle-buffer) and take ids modulo table sizes: Criteo Kaggle's cardinalities for "
        "criteo_tsv and 24/7/--max-ids-per-feature for avazu_csv unless "
        "--num-embeddings-per-feature, i.e. hashed tables for any other file (a warning names "
        "the colliding features); preprocess your files for real vocabularies. criteo_npy: "
        "TorchRec's npy layout. synthetic: the Criteo-shaped generator (known Bayes floor)."))),
    ("data", ("--data-dir",), dict(help="the preprocessed directory (--data preprocessed)")),
    ("data", ("--train-path",), dict(help="file (tsv/csv) or comma-separated prefix list for "
                                     "npy: '<dir>/day_0' -> day_0_{dense,sparse,labels}.npy")),
    ("data", ("--val-path",), dict(help="validation file (criteo_tsv, avazu_csv)")),
    ("data", ("--test-path",), dict()),
    ("data", ("--test-fraction",), dict(type=float, default=0.1, help=(
        "criteo_tsv/avazu_csv without --test-path (--val-path): batch i of a rank goes to test "
        "if i %% round(1/f) == 0, to val if it is 1, else to train (default 0.1)"))),
    ("data", ("--shuffle-buffer",), dict(type=int, default=DEFAULT_SHUFFLE_BUFFER, help=(
        "criteo_tsv/avazu_csv: rows per rank held by the streaming shuffle buffer, seeded by "
        "--seed and the epoch (default %(default)s, ~130 MB of Criteo rows; 0 = file order). "
        "Held-out val/test batches are chosen before it."))),
    ("data", ("--num-embeddings-per-feature",), dict(
        help="comma-separated table sizes for the raw readers; ids are taken modulo these")),
    ("data", ("--max-ids-per-feature",), dict(type=int, default=10_000_000,
                                              help="cap on the raw readers' default table sizes")),
    ("data", ("--synthetic-scale",), dict(
        type=float, default=0.001, help="synthetic cardinalities = Criteo Kaggle's x scale")),
    ("data", ("--synthetic-train-batches",), dict(
        type=int, help="global train batches per epoch (synthetic; default 64 x world)")),
    ("data", ("--synthetic-val-batches",), dict(
        type=int, help="global val batches (default: --synthetic-test-batches)")),
    ("data", ("--synthetic-test-batches",), dict(
        type=int, help="global test batches (default 8 x world)")),
    ("model", ("--method",), dict(choices=list(METHOD_NAMES), help=(
        "compression method (default cce; with --embedding-budget-mb and no --method the budget "
        "planner chooses per table)"))),
    ("model", ("--embedding-budget-mb",), dict(type=float, help=(
        "bytes (MiB, 2**20) for all embedding tables together, everything they store: "
        "torchrec_cce.plan_compression sizes --method to it, or without --method chooses per "
        "table; replaces --max-params-per-table"))),
    ("model", ("--plan-select",), dict(choices=["rule", "validation"], default="rule", help=(
        "with --embedding-budget-mb and no --method: 'rule' trains the planner's rule plan; "
        "'validation' trains each distinct plan of torchrec_cce.plan_candidates (the rule's, QR "
        "first, CCE wherever it fits, CE alone, CCE alone; same seed and recipe) and keeps the "
        "one with the lowest validation log loss (up to 5x the training time)"))),
    ("model", ("--hot-ids",), dict(type=parse_hot_ids, help=(
        "a hot tier on every compressed table (torchrec_cce.TieredConfig, docs/tiers.md): its "
        "N most frequent ids (an int, at most) or 'auto' (half of the table's bytes) get "
        "exclusive rows, the method takes the rest in the bytes left; any --method"))),
    ("model", ("--max-params-per-table",), dict(type=int, help=(
        "the paper's cap: tables with num_embeddings*dim above it are compressed to this many "
        "parameters (default: 1/16 of the largest table)"))),
    ("model", ("--chunks",), dict(type=int, default=4)),
    ("model", ("--qr-operation",), dict(choices=["mult", "add", "concat"], default="mult", help=(
        "how QR combines its quotient and remainder rows (--method qr)"))),
    ("model", ("--embedding-dim",), dict(type=int, default=16)),
    ("model", ("--dense-arch",), dict(default="64,16",
                                      help="dense MLP sizes (last = embedding dim)")),
    ("model", ("--over-arch",), dict(default="64,32,1")),
    ("model", ("--dcn",), dict(action="store_true", help="DLRM_DCN instead of DLRM")),
    ("model", ("--dcn-layers",), dict(type=int, default=2)),
    ("model", ("--dcn-low-rank",), dict(type=int, default=16)),
    ("model", ("--codebook-dtype", "--cce-codebook-dtype"), dict(
        dest="codebook_dtype", choices=["float32", "float16", "bfloat16"], help=(
            "precision every embedding table is stored and trained in: the codebooks of every "
            "method (MEmCom's and MPE's excepted) and, with --embedding-budget-mb, the tables "
            "kept full (FullConfig). float16 and bfloat16 halve the bytes per row (trained with "
            "the fused optimizers; bfloat16 on CPU needs torchrec_cce's TBE kernel); the budget "
            "planner counts it. Default: float32 (without --method the planner chooses)"))),
    ("MPE (--method mpe: every table above the cap)", ("--mpe-bits",), dict(
        default="0,1,2,3,4,5,6", help="candidate bit widths (0 = pruned)")),
    ("MPE", ("--mpe-groups",), dict(type=int, default=128, help="frequency groups per table")),
    ("MPE", ("--mpe-lambda",), dict(type=float, default=3e-4, help="memory penalty weight")),
    ("MPE", ("--mpe-tau",), dict(type=float, default=3e-3, help="softmax temperature")),
    ("MPE", ("--mpe-search-steps",), dict(type=int, help=(
        "search length in steps (default: one epoch); then select and retrain"))),
    ("MPE", ("--mpe-warmup-steps",), dict(type=int, help=(
        "steps counting ids before the search, for data without per-id counts (default: 0 "
        "with counts, else a tenth of an epoch)"))),
    ("training", ("--epochs",), dict(type=int, default=1)),
    ("training", ("--batch-size",), dict(type=int, default=1024, help="per-rank batch size")),
    ("training", ("--lr",), dict(type=float, default=0.05,
                                 help="sparse (embedding) learning rate (default 0.05)")),
    ("training", ("--sparse-optimizer",), dict(choices=["rowwise_adagrad", "adagrad", "sgd"],
                                               default="rowwise_adagrad")),
    ("training", ("--dense-optimizer",), dict(choices=["adagrad", "adam", "sgd"],
                                              default="adagrad",
                                              help="optimizer of the MLPs (default adagrad)")),
    ("training", ("--dense-lr",), dict(type=float, default=0.05,
                                       help="dense (MLP) learning rate (default 0.05)")),
    ("training", ("--embedding-gain",), dict(action="store_true", help=(
        "a learned [features, dim] gain (initialised to 1) on the pooled embeddings before the "
        "interaction, trained by the dense optimizer; any --method "
        "(torchrec_cce.train.regularize_pooled)"))),
    ("training", ("--embedding-l2",), dict(type=float, default=0.0, help=(
        "L2 penalty on the pooled embeddings: the gradient of l2/2 * batch mean of their sum "
        "of squares, added in backward (the reported loss is unchanged); reaches every row a "
        "method composes them from (default 0)"))),
    ("training", ("--embedding-dropout",), dict(type=float, default=0.0, help=(
        "dropout on the pooled embeddings while training (default 0)"))),
    ("training", ("--warmup-steps",), dict(type=int, help=(
        "linear learning-rate warm-up of both optimizers: step s (1-based) uses "
        "lr * min(1, s / N); 0 = none. Default: a quarter of the run's steps, at most 100 "
        "(torchrec_cce.train.optimizers.default_warmup_steps; Adagrad's first steps move every "
        "weight by ~lr: without warm-up the loss jumps, x1.75-2.8 at step 2 on synthetic data; "
        "100 keeps every step <= 1.02x the first on the shared datasets)"))),
    ("training", ("--seed",), dict(type=int, default=0,
                                   help="model init, hashes and the shuffled training order")),
    ("training", ("--recluster-at",), dict(help=(
        f"fractions of the first epoch, e.g. 0.25,0.5 (CCE only; default: "
        f"{DEFAULT_RECLUSTER_HELP})"))),
    ("training", ("--recluster-every-epoch",), dict(type=int, help=(
        "also re-cluster at the end of each of the first N epochs (default: see --recluster-at)"))),
    ("training", ("--no-recluster",), dict(action="store_true", help=(
        "CCE without re-clustering (p and h stay the initial hashes)"))),
    ("training", ("--kmeans-iters",), dict(type=int, help=(
        f"Lloyd iterations per re-clustering (default {DEFAULT_KMEANS_ITERS})"))),
    ("training", ("--max-steps",), dict(type=int, help="stop after this many steps")),
    ("CCE (tables compressed with CCE, also under the planner)", ("--cce-init",), dict(
        choices=["hash", "qr"], help=(
            "initial p/h: independent hashes (the paper) or the quotient/remainder of a "
            "per-chunk id permutation (unique pairs when rows**2 >= V); default "
            f"{DEFAULT_CCE_INIT}"))),
    ("CCE", ("--cce-keep-remainder",), dict(action="store_true", default=None, help=(
        "--cce-init qr: h stays the remainder after re-clustering (default on with the default "
        "init; --cce-fresh-hash gives the paper's rule)"))),
    ("CCE", ("--cce-fresh-hash",), dict(dest="cce_keep_remainder", action="store_false", help=(
        "h becomes a fresh hash at each re-clustering (the paper's rule)"))),
    ("CCE", ("--planner-allocation",), dict(
        choices=["perplexity", "proportional", "value"], default="perplexity", help=(
            "with --embedding-budget-mb, how the bytes are split between tables: in proportion "
            "to training mass x perplexity of the ids (default), to the full tables' bytes, or "
            "by marginal frequency mass (see torchrec_cce.plan_compression)"))),
    ("CCE", ("--serving-dtype",), dict(choices=["int8", "int4"], help=(
        "serve every codebook (and full table) as fbgemm INT8/INT4 rows "
        "(torchrec_cce.serving.quantize_codebooks; training stays float): --embedding-budget-mb "
        "bounds the serving bytes, every evaluation runs on the served values, and "
        "embedding_bytes is the serving size (embedding_training_bytes the float one)"))),
    ("CCE", ("--cce-assignment-share",), dict(type=float, help=(
        "with --embedding-budget-mb: share of a CCE table's bytes for its bit-packed p (the most "
        f"frequent ids'); the rest is codebook rows (default {DEFAULT_CCE_ASSIGNMENT_SHARE})"))),
    ("evaluation", ("--eval-every",), dict(type=int, help=(
        "also evaluate every N steps (val and test; always at each epoch's end)"))),
    ("evaluation", ("--patience",), dict(type=int, help=(
        "stop after N evaluations in a row without a lower val log loss"))),
    ("output", ("--checkpoint-dir",), dict(help=(
        "DCP checkpoints <dir>/step_<N>, written at each epoch's end (and every "
        "--checkpoint-every steps) atomically: a crash mid-write never leaves a broken newest "
        "checkpoint"))),
    ("output", ("--checkpoint-every",), dict(type=int, help=(
        "also checkpoint every N training steps (mid-epoch resume is exact)"))),
    ("output", ("--keep-checkpoints",), dict(type=int, default=2, help=(
        "complete checkpoints kept (older ones are pruned); 0 = all (default 2)"))),
    ("output", ("--resume",), dict(action="store_true", help=(
        "continue from the newest complete checkpoint in --checkpoint-dir, or start fresh "
        "(logged) if there is none yet: one command line serves the first start and every "
        "restart"))),
    ("output", ("--metrics-json",), dict()),
    ("output", ("--tensorboard-dir",), dict()),
    ("output", ("--loss-curve-png",), dict()),
    ("output", ("--no-progress",), dict(action="store_true", help="no tqdm bar")),
]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    groups: Dict[str, Any] = {}
    for group, names, kwargs in FLAGS:
        key = group.split(" ")[0]
        if key not in groups:
            groups[key] = p.add_argument_group(group)
        groups[key].add_argument(*names, **kwargs)
    args = p.parse_args(argv)
    args.planner_methods = None if args.method is None else [args.method]
    args.method = args.method or "cce"
    args.plan_candidate = None  # --plan-select validation: which of plan_candidates() to train
    if args.cce_assignment_share is None:
        args.cce_assignment_share = DEFAULT_CCE_ASSIGNMENT_SHARE
    errors = {
        "--embedding-budget-mb must be positive, got {embedding_budget_mb}":
            args.embedding_budget_mb is not None and args.embedding_budget_mb <= 0,
        "--embedding-budget-mb and --max-params-per-table are two budgets; pass one":
            args.embedding_budget_mb is not None and args.max_params_per_table is not None,
        "--plan-select validation chooses between the budget planner's plans: pass "
        "--embedding-budget-mb and no --method": args.plan_select == "validation" and (
            args.embedding_budget_mb is None or args.planner_methods is not None),
        "--plan-select validation trains several models one after the other; it does not "
        "checkpoint: drop --checkpoint-dir (or pick the plan first and checkpoint that run)":
            args.plan_select == "validation" and bool(args.checkpoint_dir),
        "--hot-ids with --plan-select validation: the candidate plans already include tiered "
        "ones; drop --hot-ids": args.hot_ids is not None and args.plan_select == "validation",
        "--recluster-at only applies to --method cce": bool(args.recluster_at)
            and args.method != "cce",
        "--no-recluster contradicts --recluster-at/--recluster-every-epoch": args.no_recluster
            and bool(args.recluster_at or args.recluster_every_epoch),
        "--cce-assignment-share must be in (0, 1), got {cce_assignment_share}":
            not 0 < args.cce_assignment_share < 1,
        "--data {data} needs --train-path": args.data in ("criteo_tsv", "avazu_csv", "criteo_npy")
            and not args.train_path,
        "--data preprocessed needs --data-dir (a `python -m torchrec_cce.data.preprocess ... "
        "--out DIR` directory)": args.data == "preprocessed" and not args.data_dir,
        "--num-embeddings-per-feature does not apply to --data preprocessed: tables have the "
        "vocabulary sizes (pick a compression --method instead)": args.data == "preprocessed"
            and bool(args.num_embeddings_per_feature),
        "--resume needs --checkpoint-dir (where the checkpoints are, or will be)":
            args.resume and not args.checkpoint_dir,
        "--keep-checkpoints must be >= 0 (0 keeps all), got {keep_checkpoints}":
            args.keep_checkpoints < 0,
        "--warmup-steps must be >= 0, got {warmup_steps}": (args.warmup_steps or 0) < 0,
        "--embedding-l2 must be >= 0, got {embedding_l2}": args.embedding_l2 < 0,
        "--embedding-dropout must be in [0, 1), got {embedding_dropout}":
            not 0 <= args.embedding_dropout < 1,
        **{f"--{f.replace('_', '-')} must be positive, got {{{f}}}":
           getattr(args, f) is not None and getattr(args, f) <= 0
           for f in ("eval_every", "patience", "checkpoint_every")},
    }
    for message, bad in errors.items():
        if bad:
            p.error(message.format(**vars(args)))
    return args


# ---------------------------------------------------------------- model
def build_model(args: argparse.Namespace, data: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """TorchRec's DLRM (or DLRM_DCN) over a CCEEmbeddingBagCollection built on the meta device
    (DMP materialises it), with the compression of --method or of the budget planner."""
    dim = args.embedding_dim
    tables = table_configs(data, dim)
    counts = table_counts(data, tables)
    plan, candidates, cap = None, 1, None
    if args.embedding_budget_mb is not None:  # the byte-budget planner (torchrec_cce.budget)
        compression, plan, candidates, args.method = planned_compression(
            tables, args, counts, args.plan_candidate)
    else:
        compression, cap = make_compression(tables, args, counts)
    compression = apply_cce_settings(compression, args)
    ebc = CCEEmbeddingBagCollection(tables, compression, device=torch.device("meta"))
    dense = [int(x) for x in args.dense_arch.split(",")]
    over = [int(x) for x in args.over_arch.split(",")]
    if dense[-1] != dim:
        raise ValueError(f"--dense-arch must end with the embedding dim {dim}, got {dense}")
    common = dict(embedding_bag_collection=ebc, dense_in_features=data.dense_in,
                  dense_arch_layer_sizes=dense, over_arch_layer_sizes=over,
                  dense_device=torch.device("cpu"))
    dlrm = (DLRM_DCN(**common, dcn_num_layers=args.dcn_layers, dcn_low_rank_dim=args.dcn_low_rank)
            if args.dcn else DLRM(**common))
    regularize_pooled(dlrm, gain=args.embedding_gain, l2=args.embedding_l2,
                      dropout=args.embedding_dropout)
    model = MPEDLRMTrain(dlrm) if args.method == "mpe" else DLRMTrain(dlrm)
    return model, {"max_params_per_table": cap, "compressed_tables": len(compression),
                   "has_cce": has_cce(compression),
                   # an all-MPE collection has no codebook EBC: no sparse-dist pipeline
                   "all_mpe": args.method == "mpe" and len(compression) == len(tables),
                   "tables": {t.name: t.num_embeddings for t in tables}, "plan": plan,
                   "plan_candidates": candidates, "table_configs": tables,
                   "compression": compression}


# ---------------------------------------------------------------- one training run
def train_run(args: argparse.Namespace, rank: int, world: int, device: torch.device
              ) -> Tuple[Dict[str, Any], Tuple[Any, Any]]:
    """Train one model; returns its metrics and (loss curve, re-clusterings) for the plot."""
    start = time.perf_counter()

    def say(text: str) -> None:
        if rank == 0:
            tqdm.write(text)

    # -- setup: data, model, sharding, optimizers, pipeline, hooks, checkpoint
    torch.manual_seed(args.seed)
    data = load_data(args, rank, world)
    model, budget = build_model(args, data)
    if args.warmup_steps is None:  # scaled to the run's length
        steps = args.epochs * (data.steps_per_epoch or 1)
        args.warmup_steps = default_warmup_steps(min(steps, args.max_steps or steps))
    apply_sparse_optimizer(model.model.sparse_arch, args.sparse_optimizer, args.lr)
    dmp, plan_table = shard(model, world, device, args.batch_size,
                            whole_rows=args.serving_dtype is not None)
    optim = Optimizers(dmp, dense_optimizer(args.dense_optimizer, args.dense_lr),
                       dense_lr=args.dense_lr, sparse_lr=args.lr, warmup_steps=args.warmup_steps)
    pipeline = make_pipeline(dmp, optim.dense, device, sparse_dist=not budget["all_mpe"])
    cs = cce_settings(args)
    hooks = training_hooks(dmp, data.steps_per_epoch or 1, recluster_at=recluster_fractions(cs),
                           recluster_every_epoch=cs["recluster_every_epoch"],
                           kmeans_iters=cs["kmeans_iters"], mpe_search_steps=args.mpe_search_steps,
                           mpe_warmup_steps=args.mpe_warmup_steps,
                           optimizers=[optim.dense])  # re-clustering (CCE tables), MPE's stages
    recluster, mpe = hooks.of_type(ReclusterHook), hooks.of_type(MPEHook)
    protocol = Protocol(args.patience)
    checkpoints = checkpoint_manager(args, budget["max_params_per_table"], budget["tables"], say)
    progress = {"step": 0, "epoch": 0, "step_in_epoch": 0}
    resumed_from = last_checkpoint = None
    if args.resume:  # the newest usable checkpoint, if there is one
        resumed = load_checkpoint(checkpoints, dmp, optim.combined, protocol)
        if resumed is not None:
            progress, resumed_from, last_checkpoint = resumed
    writer = bar = None
    if args.tensorboard_dir and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(args.tensorboard_dir)
    limit = (f"<= {budget['max_params_per_table']} params" if budget["plan"] is None
             else f"fit {args.embedding_budget_mb} MiB:\n{budget['plan'].format()}")
    say(f"world {world} on {device}; method {args.method}; {len(budget['tables'])} tables, "
        f"{budget['compressed_tables']} compressed to {limit}\n{plan_table}")
    for note in data.notes:
        say(note)
    losses: List[Tuple[int, float]] = []
    samples, eval_seconds = 0, 0.0

    def evaluation(epoch: int) -> None:
        nonlocal eval_seconds
        if hasattr(pipeline, "detach"):
            pipeline.detach()  # the modules' own forward; progress() re-attaches
        t0 = time.perf_counter()
        record = {"epoch": epoch, "step": progress["step"], **evaluate_val_test(
            dmp, data.val, data.test, device, serving_dtype(args))}
        best = protocol.add(record)
        eval_seconds += time.perf_counter() - t0
        for k in ("val_logloss", "val_auc", "test_logloss", "test_auc") if writer else ():
            writer.add_scalar(k.replace("_", "/", 1), record[k], record["step"])
        say(f"eval epoch {epoch} step {record['step']}: val log loss {record['val_logloss']:.4f} "
            f"AUC {record['val_auc']:.4f}{'  (best)' if best else ''}")

    def checkpoint() -> None:
        nonlocal last_checkpoint
        last_checkpoint = save_checkpoint(checkpoints, dmp, optim.combined, progress,
                                          protocol) or last_checkpoint

    def report_collisions() -> None:
        line = data.collisions.report()  # collective
        if line:
            say(line)

    def train_steps(batches: Any) -> int:
        """Train until ``batches`` run out; the pipeline is drained and reset at the end."""
        nonlocal samples
        n = 0
        while True:
            optim.before_step(progress["step"] + 1)  # warm-up
            try:
                loss, _, labels = pipeline.progress(batches)
            except StopIteration:
                break
            n += 1
            step = progress["step"] = progress["step"] + 1
            progress["step_in_epoch"] += 1
            guard_loss(loss, step, dmp, last_checkpoint)  # NaN/inf: stop, nothing saved
            inject_fault(step, rank, world)
            samples += labels.numel() * world
            losses.append((step, float(loss)))
            if writer:
                writer.add_scalar("train/loss", losses[-1][1], step)
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
                bar.update(1)
            if data.collisions is not None and step == 100 and progress["epoch"] == 0:
                report_collisions()
            for line in hooks.after_step(step):  # re-clustering, MPE stages
                say(line)
        pipeline.reset()
        return n

    # -- the loop: epochs of segments that end at evaluation and checkpoint steps
    t0 = time.perf_counter()
    every = [n for n in (args.eval_every, args.checkpoint_every) if n]
    keep_going = not protocol.should_stop
    for epoch in range(progress["epoch"], args.epochs):
        if not keep_going or (args.max_steps is not None and progress["step"] >= args.max_steps):
            break
        steps_left = None if args.max_steps is None else args.max_steps - progress["step"]
        done = progress["step_in_epoch"]  # > 0: resumed mid-epoch, these batches are trained
        source = data.train(epoch)
        batches = in_step(itertools.islice(source, done, None) if done else source, steps_left)
        bar = tqdm(total=data.steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}",
                   leave=False, disable=rank != 0 or args.no_progress, dynamic_ncols=True)
        bar = None if bar.disable else bar
        while True:
            segment = min((n - progress["step"] % n for n in every), default=None)
            ran = train_steps(itertools.islice(batches, segment) if segment else batches)
            if segment is None or ran < segment:
                break  # this epoch's data (or --max-steps) ran out
            step = progress["step"]
            if args.eval_every and step % args.eval_every == 0:
                evaluation(epoch + 1)
                if protocol.should_stop:
                    break
            if (args.checkpoint_every and step % args.checkpoint_every == 0
                    and progress["step_in_epoch"] != data.steps_per_epoch):  # (epoch end follows)
                checkpoint()
        if bar is not None:
            bar.close()
            bar = None
        if data.collisions is not None:  # the first epoch's check (or a resumed run's first)
            report_collisions()
            data.collisions.stop()
        hit_max = args.max_steps is not None and progress["step"] >= args.max_steps
        if not (hit_max and progress["step_in_epoch"] != data.steps_per_epoch):
            # the epoch's data ran out (--max-steps mid-epoch keeps the position for a resume)
            progress.update(epoch=epoch + 1, step_in_epoch=0)
        if protocol.last_step() != progress["step"]:
            evaluation(epoch + 1)
        checkpoint()
        keep_going = not (protocol.should_stop or hit_max)
    train_seconds = time.perf_counter() - t0
    if protocol.last_step() != progress["step"] or not protocol.evaluations:
        evaluation(progress["epoch"])  # e.g. resumed past the last epoch
    if hasattr(pipeline, "detach"):
        pipeline.detach()  # leave the modules' own forward for the caller

    # -- report
    collisions = data.collisions
    metrics = run_metrics(
        model=dmp, protocol=protocol, method=args.method, world=world, progress=progress,
        samples=samples, train_seconds=train_seconds, recluster_seconds=recluster.seconds
        if recluster else 0.0, eval_seconds=eval_seconds, start=start,
        table_configs=budget["table_configs"], compression=budget["compression"],
        plan=budget["plan"], plan_candidates=budget["plan_candidates"],
        serving_dtype=serving_dtype(args), losses=losses,
        reclusterings=recluster.log if recluster else [],
        mpe=mpe.log if mpe else [],
        colliding_features=[n for n, c in zip(collisions.names, collisions.reported) if c]
        if collisions is not None else [],
        bayes_logloss=data.bayes_logloss, resumed_from=resumed_from,
        last_checkpoint=last_checkpoint, args=vars(args),
        cce_settings=dict(cs, recluster_steps=recluster.schedule.at_steps)
        if budget["has_cce"] else None)
    if writer:
        writer.close()
    return metrics, (losses, metrics["reclusterings"])


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    quiet_known_warnings()
    rank, world, device = init_distributed()
    try:
        if args.plan_select == "validation":  # one run per candidate plan, lowest val loss kept
            def candidate(i: int) -> Tuple[Dict[str, Any], Tuple[Any, Any]]:
                run_args = argparse.Namespace(**{**vars(args), "plan_candidate": i})
                if args.tensorboard_dir:
                    run_args.tensorboard_dir = os.path.join(args.tensorboard_dir, f"candidate{i}")
                return train_run(run_args, rank, world, device)

            log = (lambda text: print(text, flush=True)) if rank == 0 else (lambda text: None)
            metrics, curves = select_plan(candidate, log)
        else:
            metrics, curves = train_run(args, rank, world, device)
        if rank == 0:
            print_summary(metrics)
            if args.metrics_json:
                write_metrics(metrics, args.metrics_json)
            if args.loss_curve_png:
                plot_loss(*curves, metrics, args.loss_curve_png)
        return metrics
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
