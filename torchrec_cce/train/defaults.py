"""The CCE defaults and the compression a run's flags ask for.

What ``--method cce`` (or a planner choosing CCE) does when no re-clustering/CCE flag is given:
the best setting of the ablations run under the fixed protocol (every table trained by the
fused optimizer at --lr; benchmarks/results/quality_frappe_ablations.csv, README "CCE
ablations"). Frappe at 1/16 of the bytes, 3 seeds, test log loss: float16 codebooks 0.2907 vs
float32 0.3090 (twice the rows per byte); re-clustering at 0.25 and 0.5 of epoch 1 only 0.2875,
plus the end of epoch 1 0.2913, plus epochs 1-3 0.2907, none 0.3161; QR-initialised CCE keeping
h as the remainder 0.2907 vs the paper's hashed CCE 0.2938; a quarter of a table's bytes for p
0.2907 vs a tenth 0.2912. The byte split between tables (--planner-allocation, default
perplexity) is the planner's, not CCE's.

The functions taking ``args`` read the flags of ``examples/dlrm/train.py`` (an
``argparse.Namespace`` or any object with those attributes).
"""

import argparse
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce.budget import plan_candidates, plan_compression, tier_compression, tier_plan
from torchrec_cce.clustering.recluster import LLOYD_ITERS
from torchrec_cce.distributed.assignment import DEFAULT_REPLICATE_ASSIGNMENT_BELOW
from torchrec_cce.id_bias import hot_ids_for_bytes
from torchrec_cce.configs import (CCEConfig, MEmComConfig, MPEConfig, OnlineTieredConfig,
                                  TieredConfig,
                                  compression_for_budget)

DEFAULT_RECLUSTER_AT = "0.25,0.5"
DEFAULT_RECLUSTER_EPOCHS = 0  # epoch ends that also re-cluster (epochs 1..N; before the last)
DEFAULT_KMEANS_ITERS = LLOYD_ITERS
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


def cce_settings(args: Any) -> Dict[str, Any]:
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


def recluster_fractions(settings: Dict[str, Any]) -> List[float]:
    """The fractions of epoch 1 of :func:`cce_settings`' ``recluster_at``."""
    return [float(x) for x in settings["recluster_at"].split(",") if x]


def replicate_below(args: Any) -> int:
    """``--replicate-assignment-below-mb`` in bytes (default: the sharder's,
    :data:`~torchrec_cce.distributed.assignment.DEFAULT_REPLICATE_ASSIGNMENT_BELOW`)."""
    mb = getattr(args, "replicate_assignment_below_mb", None)
    if mb is None:
        return DEFAULT_REPLICATE_ASSIGNMENT_BELOW
    if mb < 0:
        raise ValueError(f"--replicate-assignment-below-mb must be >= 0 MiB, got {mb}")
    return int(mb * 2 ** 20)


def serving_dtype(args: Any) -> Optional[torch.dtype]:
    """The torch dtype of ``--serving-dtype`` (INT4 is ``torch.quint4x2``), or None."""
    return {None: None, "int8": torch.int8, "int4": torch.quint4x2}[args.serving_dtype]


def codebook_dtype(args: Any) -> Optional[torch.dtype]:
    """``--codebook-dtype``; ``--method cce`` without it: ``DEFAULT_CCE_CODEBOOK_DTYPE``."""
    name = args.codebook_dtype
    if name is None and args.planner_methods == ["cce"]:
        name = DEFAULT_CCE_CODEBOOK_DTYPE
    if name is None and args.planner_methods is None and args.embedding_budget_mb is None \
            and args.method == "cce":
        name = DEFAULT_CCE_CODEBOOK_DTYPE
    return None if name is None else getattr(torch, name)


def apply_cce_settings(compression: Dict, args: Any) -> Dict:
    """CCE configs with the init of :func:`cce_settings` (bytes are unchanged), and every
    config that has a ``codebook_dtype`` at ``--codebook-dtype`` when it is given (a tiered
    table's cold config, and its hot rows unless the cold part is MEmCom or MPE)."""
    cs = cce_settings(args)
    dtype = codebook_dtype(args)

    def apply(c: Any) -> Any:
        if isinstance(c, (TieredConfig, OnlineTieredConfig)):
            hot = c.hot_dtype
            if dtype is not None and not isinstance(c.cold, (MEmComConfig, MPEConfig)) and \
                    getattr(args, "hot_dtype", None) is None:  # --hot-dtype: as planned
                hot = dtype
            return dataclasses.replace(c, cold=apply(c.cold), hot_dtype=hot)
        if isinstance(c, CCEConfig):
            c = dataclasses.replace(c, init=cs["init"], keep_remainder=cs["keep_remainder"])
        if dtype is not None and any(f.name == "codebook_dtype" for f in dataclasses.fields(c)):
            c = dataclasses.replace(c, codebook_dtype=dtype)
        return c

    return {n: apply(c) for n, c in compression.items()}


def _word_or_number(text: str, word: str, cast: Any, ok: Any, flag: str, expect: str) -> Any:
    """``word`` itself, or ``cast(text)`` when ``ok`` accepts it; else a flag error."""
    if text == word:
        return text
    try:
        value = cast(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"{flag} takes {expect}, got {text!r}")
    return value


def parse_hot_ids(text: str) -> Any:
    """``--hot-ids``: ``"auto"`` or a positive int."""
    return _word_or_number(text, "auto", int, lambda v: v >= 1, "--hot-ids",
                           "'auto' or an int >= 1")


def parse_hot_share(text: str) -> Any:
    """``--hot-share``: ``"mass"`` or a float in (0, 1)."""
    return _word_or_number(text, "mass", float, lambda v: 0 < v < 1, "--hot-share",
                           "'mass' or a float in (0, 1)")


def parse_id_bias(text: str) -> Any:
    """``--id-bias``: ``"all"`` or a float in (0, 1)."""
    return _word_or_number(text, "all", float, lambda v: 0 < v < 1, "--id-bias",
                           "'all' or a float in (0, 1) (the share of --embedding-budget-mb)")


def parse_id_bias_shares(text: str) -> List[float]:
    """``--plan-select-id-bias``: comma-separated floats in (0, 1), or ``none``."""
    if text == "none":
        return []
    try:
        shares = [float(x) for x in text.split(",")]
    except ValueError:
        shares = []
    if not shares or not all(0 < s < 1 for s in shares):
        raise argparse.ArgumentTypeError(
            f"--plan-select-id-bias takes comma-separated floats in (0, 1) or 'none', got "
            f"{text!r}")
    return shares


def id_bias_budget_bytes(args: Any) -> int:
    """The bytes of ``--embedding-budget-mb`` that ``--id-bias SHARE`` spends on scalars (0
    without a share)."""
    share = getattr(args, "id_bias", None)
    return int(int(args.embedding_budget_mb * 2**20) * share) if isinstance(share, float) else 0


def table_budget_bytes(args: Any) -> int:
    """``--embedding-budget-mb`` in bytes, less the ``--id-bias`` share: what the planner
    gives the tables."""
    return int(args.embedding_budget_mb * 2**20) - id_bias_budget_bytes(args)


def id_bias_ids(tables: List[EmbeddingBagConfig], args: Any,
                counts: Optional[Dict[str, np.ndarray]]) -> Optional[Dict[str, Any]]:
    """``--id-bias``'s biased ids per table (:class:`torchrec_cce.id_bias.IdBias`): ``all``
    biases every id of every table; a share ``s`` spends ``s`` of ``--embedding-budget-mb``
    on the most frequent ids over all tables (:func:`torchrec_cce.hot_ids_for_bytes`). None
    without the flag."""
    spec = getattr(args, "id_bias", None)
    if spec is None:
        return None
    if spec == "all":
        return {t.name: "all" for t in tables}
    if counts is None:
        raise ValueError("--id-bias with a share picks the most frequent ids from the data's "
                         "training counts, and this data has none: use --data preprocessed "
                         "(torchrec_cce.data.preprocess writes them) or --id-bias all")
    return hot_ids_for_bytes(tables, counts, id_bias_budget_bytes(args))


def hot_set_kwargs(args: Any) -> Dict[str, Any]:
    """``--hot-set`` / ``--migrate-every`` / ``--hot-share`` / ``--hot-dtype`` /
    ``--hot-tables`` as
    :func:`torchrec_cce.budget.tier_plan` arguments."""
    out: Dict[str, Any] = {}
    if getattr(args, "hot_share", None) is not None:
        out["hot_share"] = args.hot_share
    if getattr(args, "hot_dtype", None) is not None:
        out["hot_dtype"] = getattr(torch, args.hot_dtype)
    if getattr(args, "hot_tables", None):
        out["hot_tables"] = args.hot_tables.split(",")
    hot_set = getattr(args, "hot_set", None) or "prefix"
    if hot_set == "prefix":
        return out
    return {**out, "hot_set": hot_set,
            "migrate_every": getattr(args, "migrate_every", None) or 1000}


def has_cce(compression: Dict) -> bool:
    """Whether some table (or a tiered table's cold part) is CCE (re-clustering applies)."""
    return any(isinstance(getattr(c, "cold", c), CCEConfig) for c in compression.values())


def make_compression(tables: List[EmbeddingBagConfig], args: Any,
                     counts: Optional[Dict[str, np.ndarray]]) -> Tuple[Dict, int]:
    """The compression configs of ``--method`` at the per-table cap
    (``--max-params-per-table``, default 1/16 of the largest table); returns ``(configs, cap)``.

    ``counts`` (table -> int64 ``[num_embeddings]`` training frequencies, or None) gives MPE
    its frequency groups; the other methods do not use it."""
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
    compression = compression_for_budget(tables, args.method, cap, chunks=args.chunks,
                                         seed=args.seed, qr_operation=args.qr_operation)
    if getattr(args, "hot_ids", None) is not None:  # --hot-ids: a hot tier, same bytes
        compression = tier_compression(tables, compression, counts=counts, hot_ids=args.hot_ids,
                                       chunks=args.chunks,
                                       assignment_share=args.cce_assignment_share,
                                       **hot_set_kwargs(args))
    return compression, cap


def planned_compression(tables: List[EmbeddingBagConfig], args: Any,
                        counts: Optional[Dict[str, np.ndarray]],
                        candidate: Optional[int] = None) -> Tuple[Dict, Any, int, str]:
    """``--embedding-budget-mb``: the byte-budget planner's plan (or, with ``candidate``, that
    one of :func:`torchrec_cce.plan_candidates`). Returns ``(configs, plan, number of
    candidates, method)``; method is the one compressed method used, ``"mixed"`` or
    ``"full"``."""
    kwargs = dict(counts=counts, chunks=args.chunks, assignment_share=args.cce_assignment_share,
                  qr_operation=args.qr_operation, codebook_dtype=codebook_dtype(args),
                  serving_dtype=serving_dtype(args), allocation=args.planner_allocation)
    budget_bytes = table_budget_bytes(args)  # less the --id-bias share
    if candidate is None:
        plan, candidates = plan_compression(tables, budget_bytes, methods=args.planner_methods,
                                            **kwargs), 1
        if getattr(args, "hot_ids", None) is not None:  # --hot-ids: a hot tier per table
            plan = tier_plan(plan, tables, counts=counts, hot_ids=args.hot_ids,
                             chunks=args.chunks, assignment_share=args.cce_assignment_share,
                             serving_dtype=serving_dtype(args), **hot_set_kwargs(args))
    else:
        plans = plan_candidates(tables, budget_bytes, **kwargs)
        plan, candidates = plans[candidate], len(plans)
    # MPE: the planner fixed the candidate widths (its serving-bytes bound); the search
    # hyper-parameters and seed come from the flags.
    compression = {n: (dataclasses.replace(c, tau=args.mpe_tau, lam=args.mpe_lambda,
                                           seed=args.seed) if isinstance(c, MPEConfig) else c)
                   for n, c in plan.compression.items()}
    # (a tiered table's method is its cold part's, "<method>+hot")
    used = sorted({p.method.split("+")[0] for p in plan.tables.values() if p.method != "full"})
    method = used[0] if len(used) == 1 else ("full" if not used else "mixed")
    return compression, plan, candidates, method
