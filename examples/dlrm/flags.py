"""The command-line flags of ``examples/dlrm/train.py`` (one table: group, names, argparse
options) and their validation. Launchers (``launch/components.py``) and the benchmarks pass
these flags through unchanged."""

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from torchrec_cce.configs import METHOD_NAMES  # noqa: E402
from torchrec_cce.data.common import DEFAULT_SHUFFLE_BUFFER  # noqa: E402
from torchrec_cce.data.sources import DATA_CHOICES  # noqa: E402
from torchrec_cce.train.defaults import (  # noqa: E402
    DEFAULT_CCE_ASSIGNMENT_SHARE, DEFAULT_CCE_INIT, DEFAULT_KMEANS_ITERS, DEFAULT_RECLUSTER_HELP,
    parse_hot_ids, parse_hot_share, parse_id_bias, parse_id_bias_shares)

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
        "first, CCE wherever it fits, CE alone, CCE alone, then the rule's, QR's and CCE's with a "
        "hot tier; same seed and recipe) and keeps the one with the lowest validation log loss "
        "(up to 8x the training time)"))),
    ("model", ("--plan-select-id-bias",), dict(type=parse_id_bias_shares, default=[], help=(
        "with --plan-select validation: after the candidate plans, train the best of them "
        "again with each of these --id-bias shares (comma-separated, e.g. 0.25,0.5; the plan "
        "re-sized in the rest of the budget) and keep the lowest validation loss of all "
        "(default none)"))),
    ("model", ("--hot-ids",), dict(type=parse_hot_ids, help=(
        "a hot tier on every compressed table (torchrec_cce.TieredConfig, docs/tiers.md): its "
        "N most frequent ids (an int, at most) or 'auto' (half of the table's bytes) get "
        "exclusive rows, the method takes the rest in the bytes left; any --method"))),
    ("model", ("--hot-share",), dict(type=parse_hot_share, help=(
        "with --hot-ids auto: the share of each compressed table's bytes for its hot rows "
        "(default torchrec_cce.budget.AUTO_HOT_SHARE), or 'mass': per table, the share of the "
        "table's occurrences its hot ids carry (torchrec_cce.budget.mass_hot_ids)"))),
    ("model", ("--hot-dtype",), dict(choices=["float32", "float16", "bfloat16"], help=(
        "with --hot-ids: the hot rows' precision (default: the cold method's, i.e. "
        "--codebook-dtype; MEmCom's hot rows are always float32)"))),
    ("model", ("--hot-tables",), dict(help=(
        "with --hot-ids: the comma-separated tables (names as in the plan, e.g. t_item) that "
        "get the hot tier; default every compressed table"))),
    ("model", ("--hot-set",), dict(choices=["prefix", "online"], default="prefix", help=(
        "with --hot-ids: 'prefix' takes the first ids of the frequency-ordered vocabulary as "
        "hot; 'online' learns the hot set during training with a heavy-hitter sketch "
        "(torchrec_cce.OnlineTieredConfig, for ids not ordered by frequency; the sketch takes "
        "a quarter of the table's bytes, the method covers every id)"))),
    ("model", ("--migrate-every",), dict(type=int, default=100, help=(
        "--hot-set online: recompute the hot set every N training steps"))),
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
    ("training", ("--id-bias",), dict(type=parse_id_bias, help=(
        "a learned per-id scalar added to the logit (a first-order term, "
        "torchrec_cce.IdBias): 'all' for every id of every table (bytes on top of the tables'), "
        "or a share in (0, 1) of --embedding-budget-mb spent on the most frequent ids over all "
        "tables (the planner sizes the tables in the rest); trained by the dense optimizer"))),
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
    ("CCE", ("--replicate-assignment-below-mb",), dict(type=float, default=None, help=(
        "under DMP, a CCE table's assignment p smaller than this (MiB, packed) is kept whole on "
        "every rank instead of split by id range: no per-step all-to-alls to fetch p(x) from "
        "its owner, at the cost of p's bytes on every rank (default 1 MiB; "
        "torchrec_cce.distributed.DEFAULT_REPLICATE_ASSIGNMENT_BELOW)"))),
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
    ("evaluation", ("--limit-val-batches",), dict(type=int, help=(
        "evaluate on the first N validation batches per rank only (default: all)"))),
    ("evaluation", ("--limit-test-batches",), dict(type=int, help=(
        "evaluate on the first N test batches per rank only (default: all)"))),
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
        "--hot-set online needs --hot-ids (how many ids the hot tier holds, or 'auto')":
            args.hot_set == "online" and args.hot_ids is None,
        "--hot-share sizes --hot-ids auto: pass --hot-ids auto": args.hot_share is not None
            and args.hot_ids != "auto",
        "--id-bias with a share spends part of --embedding-budget-mb: pass one, or --id-bias "
        "all": isinstance(args.id_bias, float) and args.embedding_budget_mb is None,
        "--id-bias all adds a scalar per id on top of the tables, beyond any budget: with "
        "--embedding-budget-mb pass a share instead (e.g. --id-bias 0.25)":
            args.id_bias == "all" and args.embedding_budget_mb is not None,
        "--plan-select-id-bias adds candidates to --plan-select validation: pass it": bool(
            args.plan_select_id_bias) and args.plan_select != "validation",
        "--plan-select-id-bias tries shares of --id-bias itself: drop --id-bias": bool(
            args.plan_select_id_bias) and args.id_bias is not None,
        "--hot-dtype needs --hot-ids": args.hot_dtype is not None and args.hot_ids is None,
        "--hot-tables needs --hot-ids": args.hot_tables is not None and args.hot_ids is None,
        "--migrate-every must be >= 1, got {migrate_every}": args.migrate_every < 1,
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
