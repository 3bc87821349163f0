"""Training-step speed of every method relative to the full (uncompressed) fused TBE table.

    .venv/bin/python benchmarks/speed.py                 # dims 16 and 64, batch 4096, 26 tables
    .venv/bin/python benchmarks/speed.py --quick         # CI-size smoke run (seconds)
    .venv/bin/python benchmarks/speed.py --sections layout --dims 16
    .venv/bin/python benchmarks/speed.py --sections real  # real data: benchmarks/speed_real.py

Setup (the issue's protocol): 26 Criteo-Kaggle-shaped tables (cardinalities capped at
``--cap``, one single-hot feature each, Zipf ids), every table larger than the budget of
``2 * rows * dim`` parameters compressed with the method (CCE ``rows=4096, chunks=4``; hashing,
CE and QR at the same parameter budget; MEmCom ``rows=2*4096``), under
``DistributedModelParallel`` at world size 1 (gloo; table-wise fused TBE codebooks,
``RowWiseAdagrad`` applied in backward). MEmCom cannot be sharded, so it runs unsharded (stock
EBC lookups, dense Adagrad): its ratio is not a like-for-like comparison.

Sections:

* ``embedding``: embedding forward + backward + fused update; the pooled output's gradient is a
  fixed dense random matrix (what a model above the embeddings passes down; the gradient of a
  plain ``sum()`` is a stride-0 expansion that fbgemm copies before its backward);
* ``dlrm``: a whole ``torchrec.models.dlrm.DLRM`` step (dense arch 512-256-dim, over arch
  512-256-1, BCE loss, dense Adagrad) around the same embedding collection;
* ``layout``: stock TorchRec EBCs only, ids precomputed (no remap): CCE's codebooks as
  2c one-id bags into two stacked tables (the old layout), c bags of 2 ids in one table (the
  current layout), and c bags of 2 ids in c per-chunk tables; CE as one stacked table (the
  current layout) vs c tables; and every CCE table's codebook stacked into one table
  (``cce_all_tables``). Also reports fbgemm's CPU time per step (torch.profiler), which
  the machine's load disturbs less than wall time.

Every method is built first; then ``--reps`` rounds each time ``--steps`` steps of every
method in turn (interleaved, so machine load hits all alike), each after one untimed step that
warms the caches the other methods just used. Reported: the median samples/s
over rounds and its ratio to full. ``cce`` uses the fused remap op and torchrec_cce's CPU TBE
kernel for its codebooks (the defaults), ``cce_fbgemm`` fbgemm's own TBE kernel, ``cce_ref``
the torch-ops remap reference (likewise ``ce``/``ce_fbgemm`` ...); ``full_kernel`` is the
uncompressed tables on torchrec_cce's kernel (``full``, the baseline, is a stock TorchRec EBC).
``--profile`` adds, per method, the self CPU
ms per step inside fbgemm's TBE forward/backward, its bounds check, the remap op and all other
ops, and the wall time (key ``profile`` of the JSON); the TBE categories count fbgemm's kernels
and torchrec_cce's alike. Results:
``benchmarks/results/speed.json``.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor  # noqa: E402

from torchrec_cce import (  # noqa: E402
    CCEConfig,
    CCEEmbeddingBagCollection,
    MEmComConfig,
)
from torchrec_cce.configs import compression_for_budget  # noqa: E402
from torchrec_cce.data.criteo import CRITEO_KAGGLE_CARDINALITIES  # noqa: E402

CCE_ROWS, CHUNKS = 4096, 4
DEFAULT_METHODS = ("full", "full_kernel", "hashing", "hashing_fbgemm", "ce", "ce_fbgemm", "qr",
                   "qr_fbgemm", "memcom", "cce", "cce_fbgemm", "cce_ref", "cce_fp16",
                   "cce_fp16_fbgemm")


def method_variant(method: str) -> Tuple[str, bool, bool]:
    """``(base method, fused remap op, torchrec_cce CPU TBE kernel)`` of a method name:
    ``<m>`` = both on (the defaults), ``<m>_ref`` = the torch-ops remap reference,
    ``<m>_fbgemm`` = fbgemm's own CPU TBE kernel for the codebooks (the previous default);
    ``full_kernel`` = the uncompressed tables inside a CCEEmbeddingBagCollection, so they run
    on the torchrec_cce kernel (``full`` is a stock TorchRec EBC on fbgemm's kernel)."""
    for suffix, fused, kernel in (("_ref", False, True), ("_fbgemm", True, False),
                                  ("_kernel", True, True)):
        if method.endswith(suffix):
            return method[: -len(suffix)], fused, kernel
    return method, True, True


def logical_tables(cap: int, dim: int, num_tables: int) -> List[EmbeddingBagConfig]:
    cards = [min(cap, c) for c in CRITEO_KAGGLE_CARDINALITIES[:num_tables]]
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=c,
                               feature_names=[f"f{i}"]) for i, c in enumerate(cards)]


def zipf_batch(tables: List[EmbeddingBagConfig], batch: int, seed: int,
               exponent: float = 1.05) -> KeyedJaggedTensor:
    """One single-hot id per sample and table: Zipf ranks (inverse CDF of a continuous power
    law) mapped to ids by a fixed affine permutation, so hot ids are spread over the table."""
    g = torch.Generator().manual_seed(seed)
    values = []
    for t in tables:
        v = t.num_embeddings
        u = torch.rand(batch, generator=g, dtype=torch.float64)
        # P(rank <= r) ~ r^(1 - s): inverse CDF of a Pareto with exponent s, truncated at v.
        rank = ((1 - u * (1 - v ** (1 - exponent))) ** (1 / (1 - exponent))).long() - 1
        rank = rank.clamp(0, v - 1)
        values.append((rank * 2654435761 + 97) % v)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f for t in tables for f in t.feature_names], values=torch.cat(values),
        lengths=torch.ones(batch * len(tables), dtype=torch.int64))


def compression(method: str, tables: List[EmbeddingBagConfig], dim: int) -> Dict[str, object]:
    base = method_variant(method)[0]
    cap = 2 * CCE_ROWS * dim
    if base == "full":
        return {}
    if base == "memcom":
        return {t.name: MEmComConfig(rows=2 * CCE_ROWS) for t in tables
                if t.num_embeddings * dim > cap}
    if base in ("cce", "cce_fp16"):  # cce_fp16: float16 codebooks (train.py's --method cce)
        dtype = torch.float16 if base == "cce_fp16" else None
        return {t.name: CCEConfig(rows=CCE_ROWS, chunks=CHUNKS, codebook_dtype=dtype)
                for t in tables if t.num_embeddings * dim > cap}
    return compression_for_budget(tables, base, cap, chunks=CHUNKS)


def _init_pg() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)


def sharded(module: torch.nn.Module, ebc_path: str = "", kernel: bool = True) -> torch.nn.Module:
    """``module`` under DMP at world size 1: table-wise fused codebooks, RowWiseAdagrad;
    ``kernel``: the codebook TBEs train with torchrec_cce's CPU kernel (else fbgemm's)."""
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder

    _init_pg()
    ebc = module.get_submodule(ebc_path) if ebc_path else module
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.01, "eps": 1e-8})
    if isinstance(ebc, CCEEmbeddingBagCollection):
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

        sharder = CCEEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder())
        names = [c.name for c in ebc.codebook_table_configs()]
    else:
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

        sharder = EmbeddingBagCollectionSharder()
        names = [c.name for c in ebc.embedding_bag_configs()]
    plan = construct_module_sharding_plan(
        ebc, {n: table_wise(rank=0, compute_kernel="fused") for n in names}, sharder=sharder,
        local_size=1, world_size=1, device_type="cpu")
    previous = os.environ.get("TORCHREC_CCE_TBE_KERNEL")
    os.environ["TORCHREC_CCE_TBE_KERNEL"] = "1" if kernel else "0"
    try:
        return DistributedModelParallel(
            module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
            plan=ShardingPlan({ebc_path: plan}), sharders=[sharder], device=torch.device("cpu"))
    finally:
        if previous is None:
            del os.environ["TORCHREC_CCE_TBE_KERNEL"]
        else:
            os.environ["TORCHREC_CCE_TBE_KERNEL"] = previous


def build_collection(method: str, tables: List[EmbeddingBagConfig], dim: int
                     ) -> Tuple[torch.nn.Module, bool]:
    """The embedding collection of ``method`` and whether its TBEs use torchrec_cce's kernel."""
    base, fused, kernel = method_variant(method)
    if method == "full":
        return EmbeddingBagCollection(tables=tables, device=torch.device("meta")), False
    device = torch.device("cpu") if base == "memcom" else torch.device("meta")
    comp = compression(method, tables, dim)
    if base.endswith("_fp16"):
        # every table at float16, the uncompressed ones too (as train.py's planner stores
        # them): one TBE group; a float32 group beside it costs TorchRec a column permutation
        # of the pooled output and its scatter-add backward (~3 ms per step measured)
        from torchrec.modules.embedding_configs import DataType

        tables = [dataclasses.replace(t, data_type=DataType.FP16) for t in tables]
    return CCEEmbeddingBagCollection(tables, comp, device=device, allow_larger=True,
                                     fused=fused), kernel


def output_gradient(out: torch.Tensor, cache: Dict[Tuple[int, ...], torch.Tensor]) -> torch.Tensor:
    """A fixed dense random gradient of the pooled output's shape (one per shape)."""
    key = tuple(out.shape)
    if key not in cache:
        cache[key] = torch.randn(key, generator=torch.Generator().manual_seed(0))
    return cache[key]


def build_embedding(method: str, tables: List[EmbeddingBagConfig], dim: int):
    """(module, step function) for the embedding-only step."""
    module, kernel = build_collection(method, tables, dim)
    grads: Dict[Tuple[int, ...], torch.Tensor] = {}
    if method.startswith("memcom"):
        # Not shardable: stock (unfused) EBC lookups and a dense Adagrad on every parameter.
        opt = torch.optim.Adagrad(module.parameters(), lr=0.01)

        def step(kjt: KeyedJaggedTensor) -> None:
            opt.zero_grad(set_to_none=True)
            out = module(kjt).values()
            out.backward(output_gradient(out, grads))
            opt.step()

        return module, step
    dmp = sharded(module, kernel=kernel)

    def step(kjt: KeyedJaggedTensor) -> None:
        out = dmp(kjt).values()
        out.backward(output_gradient(out, grads))

    return dmp, step


def build_dlrm(method: str, tables: List[EmbeddingBagConfig], dim: int):
    """(module, step function) for a whole DLRM training step."""
    from torchrec.models.dlrm import DLRM

    ebc, kernel = build_collection(method, tables, dim)
    dlrm = DLRM(embedding_bag_collection=ebc, dense_in_features=13,
                dense_arch_layer_sizes=[512, 256, dim], over_arch_layer_sizes=[512, 256, 1],
                dense_device=torch.device("cpu"))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    if method.startswith("memcom"):
        model = dlrm
        opt = torch.optim.Adagrad(model.parameters(), lr=0.01)
    else:
        model = sharded(dlrm, "sparse_arch.embedding_bag_collection", kernel=kernel)
        opt = torch.optim.Adagrad([p for n, p in model.named_parameters()
                                   if "embedding_bag_collection" not in n], lr=0.01)
    g = torch.Generator().manual_seed(1)
    batch = None

    def step(kjt: KeyedJaggedTensor) -> None:
        nonlocal batch
        n = kjt.stride()
        if batch is None or batch[0].shape[0] != n:
            batch = (torch.randn(n, 13, generator=g), (torch.rand(n, generator=g) < 0.25).float())
        opt.zero_grad(set_to_none=True)
        logits = model(batch[0], kjt).squeeze(-1)
        loss_fn(logits, batch[1]).backward()
        opt.step()

    return model, step


def build_layout(variant: str, tables: List[EmbeddingBagConfig], dim: int,
                 batches: List[KeyedJaggedTensor]):
    """Stock-EBC layout experiment: (module, step) where step consumes precomputed codebook KJTs
    (the remap is done once, outside the timing)."""
    big = [t for t in tables if t.num_embeddings * dim > 2 * CCE_ROWS * dim]
    small = [t for t in tables if t not in big]
    c, cd, rows = CHUNKS, dim // CHUNKS, CCE_ROWS
    cfgs = [EmbeddingBagConfig(name=t.name, embedding_dim=dim, num_embeddings=t.num_embeddings,
                               feature_names=t.feature_names) for t in small]
    streams = {}  # codebook feature -> (ids per logical id, function of ids)
    for t in big:
        f = t.feature_names[0]
        rows_c = 2 * rows if variant.startswith("cce") else rows
        if variant == "cce_stacked":  # old layout: A and B stacked, 2c one-id bags
            for s in ("A", "B"):
                cfgs.append(EmbeddingBagConfig(name=f"{t.name}_{s}", embedding_dim=cd,
                                               num_embeddings=c * rows,
                                               feature_names=[f"{f}_{s}{i}" for i in range(c)]))
                for i in range(c):
                    streams[f"{f}_{s}{i}"] = (f, 1, i * rows)
        elif variant in ("cce_one_table", "ce_one_table"):
            cfgs.append(EmbeddingBagConfig(name=f"{t.name}_cb", embedding_dim=cd,
                                           num_embeddings=c * rows_c,
                                           feature_names=[f"{f}_c{i}" for i in range(c)]))
            for i in range(c):
                streams[f"{f}_c{i}"] = (f, 2 if variant.startswith("cce") else 1, i * rows_c)
        elif variant == "cce_all_tables":  # every CCE table's codebook stacked in one table
            if not any(cfg.name == "cce_all" for cfg in cfgs):
                cfgs.append(EmbeddingBagConfig(name="cce_all", embedding_dim=cd,
                                               num_embeddings=len(big) * c * rows_c,
                                               feature_names=[]))
            cfg = next(cfg for cfg in cfgs if cfg.name == "cce_all")
            first = big.index(t) * c * rows_c
            for i in range(c):
                cfg.feature_names.append(f"{f}_c{i}")
                streams[f"{f}_c{i}"] = (f, 2, first + i * rows_c)
        else:  # cce_per_chunk / ce_per_chunk
            for i in range(c):
                cfgs.append(EmbeddingBagConfig(name=f"{t.name}_c{i}", embedding_dim=cd,
                                               num_embeddings=rows_c,
                                               feature_names=[f"{f}_c{i}"]))
                streams[f"{f}_c{i}"] = (f, 2 if variant.startswith("cce") else 1, 0)
    module = EmbeddingBagCollection(tables=cfgs, device=torch.device("meta"))
    keys = [f for cfg in cfgs for f in cfg.feature_names]
    pre = {}
    for b in batches:
        d = b.to_dict()
        values, lengths = [], []
        for k in keys:
            if k in d:
                values.append(d[k].values())
                lengths.append(d[k].lengths())
                continue
            f, per, shift = streams[k]
            ids = d[f].values()
            rows_per = rows
            ids = torch.stack([(ids * (j + 3) + 7) % rows_per + j * rows_per for j in range(per)],
                              dim=1).reshape(-1) + shift
            values.append(ids)
            lengths.append(d[f].lengths() * per)
        pre[id(b)] = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values),
                                                         lengths=torch.cat(lengths))
    dmp = sharded(module)

    def step(kjt: KeyedJaggedTensor) -> None:
        out = dmp(pre[id(kjt)]).values()
        out.sum().backward()

    return dmp, step


def run_steps(fn: Callable, batches: List[KeyedJaggedTensor], n_steps: int, first: int = 0) -> float:
    """Run ``n_steps`` steps of ``fn`` on batches ``first, first + 1, ...`` (cyclically); the
    wall time in seconds. The one loop every measurement here goes through."""
    start = time.perf_counter()
    for i in range(n_steps):
        fn(batches[(first + i) % len(batches)])
    return time.perf_counter() - start


def time_interleaved(steps: Dict[str, Callable], batches: List[KeyedJaggedTensor], reps: int,
                     n_steps: int, warmup: int) -> Dict[str, List[float]]:
    """samples/s of every entry per round, rounds interleaved across entries; round ``r``
    starts at entry ``r`` (rotated), so no entry always runs first or after the same one.
    Each entry's timed steps follow one untimed step in the same round: the other entries have
    just evicted its tables from the caches, which a training job running one model never
    sees (it would bias against methods whose codebooks live in cache)."""
    batch = batches[0].stride()
    for fn in steps.values():
        run_steps(fn, batches, warmup)
    names = list(steps)
    out: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            run_steps(steps[name], batches, 1, r * n_steps + n_steps)  # warm the caches again
            out[name].append(n_steps * batch / run_steps(steps[name], batches, n_steps,
                                                         r * n_steps))
    return out


# Profile categories: (name, predicate on the op name). First match wins; the rest is "other".
PROFILE_CATEGORIES = (
    ("tbe_backward", lambda k: ("split_embedding" in k and "backward" in k)
     or k == "torchrec_cce::tbe_backward_update"),
    ("tbe_forward", lambda k: ("split_embedding" in k and "forward" in k)
     or k == "torchrec_cce::tbe_forward"),
    ("bounds_check", lambda k: "bounds_check_indices" in k),
    ("remap_op", lambda k: k.startswith("torchrec_cce::remap")),
)


def profile_ms_per_step(fn: Callable, batches: List[KeyedJaggedTensor], n_steps: int
                        ) -> Dict[str, float]:
    """Self CPU ms per step by category (torch.profiler), plus ``ops_total`` (all ops) and
    ``wall`` (the profiled steps' wall time, so ``wall - ops_total`` is Python and framework
    time outside ops). CPU time inside ops is less disturbed by the machine's load than wall
    time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = run_steps(fn, batches, n_steps)
    out = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    out["other_ops"] = 0.0
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / n_steps
        name = next((n for n, pred in PROFILE_CATEGORIES if pred(e.key)), "other_ops")
        out[name] += ms
    out["ops_total"] = sum(out.values())
    out["wall"] = wall * 1e3 / n_steps
    return out


def summarize(samples: Dict[str, List[float]], baseline: str) -> Dict[str, Dict[str, float]]:
    """Median samples/s, and the median over rounds of the ratio to ``baseline`` in the same
    round (robust to load that changes between rounds)."""
    base = samples[baseline]
    return {n: {"samples_per_s": statistics.median(v),
                "ratio": statistics.median([x / b for x, b in zip(v, base)]),
                "rounds": v} for n, v in samples.items()}


# glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh pages from the
# kernel, and returns them on free: every step then page-faults and zero-fills its largest
# tensors again (a [4096, 2816] pooled output at dim 64 is 46 MB; measured: QR's embedding step
# at dim 64 spent more time there than computing). These settings keep freed memory in the
# heap for reuse, as jemalloc/tcmalloc do; every method of a run gets them alike.
GLIBC_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
                    "MALLOC_TOP_PAD_": str(1 << 29)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-size smoke run")
    p.add_argument("--sections", default="embedding,dlrm,layout")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--dims", default="16,64")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--cap", type=int, default=1_000_000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--profile", action="store_true",
                   help="also record where each method's step time goes (torch.profiler)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other sections/dims already in --out")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "speed.json"))
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's default malloc settings (see GLIBC_MALLOC_ENV)")
    args, rest = p.parse_known_args()
    if not args.default_malloc and any(os.environ.get(k) != v for k, v in GLIBC_MALLOC_ENV.items()):
        # glibc reads these at process start: run this script again with them set.
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, **GLIBC_MALLOC_ENV})
    if "real" in args.sections.split(","):  # whole training steps on the shared datasets
        import speed_real

        speed_real.main(rest)
        args.sections = ",".join(x for x in args.sections.split(",") if x != "real")
        if not args.sections:
            return
    elif rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.quick:
        args.batch, args.cap, args.reps, args.steps, args.warmup = 128, 20_000, 1, 1, 1
        args.dims, args.tables = "16", 6
        if args.sections == p.get_default("sections"):
            args.sections = "embedding,dlrm"
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    result = {"setup": {k: getattr(args, k) for k in ("batch", "tables", "cap", "reps", "steps",
                                                      "warmup")},
              "malloc_env": {k: os.environ.get(k) for k in GLIBC_MALLOC_ENV},
              "device": "cpu", "threads": torch.get_num_threads(),
              "cce": {"rows": CCE_ROWS, "chunks": CHUNKS}}
    from torchrec_cce.ops import fused_available

    result["fused_op_available"] = fused_available()
    for dim in [int(d) for d in args.dims.split(",")]:
        tables = logical_tables(args.cap, dim, args.tables)
        batches = [zipf_batch(tables, args.batch, seed) for seed in range(3)]
        for section in args.sections.split(","):
            if section == "layout":
                variants = ["full", "cce_stacked", "cce_one_table", "cce_per_chunk",
                            "cce_all_tables", "ce_one_table", "ce_per_chunk"]
                steps = {}
                for v in variants:
                    steps[v] = (build_embedding("full", tables, dim)[1] if v == "full"
                                else build_layout(v, tables, dim, batches)[1])
            else:
                build = build_embedding if section == "embedding" else build_dlrm
                steps = {m: build(m, tables, dim)[1] for m in methods}
            samples = time_interleaved(steps, batches, args.reps, args.steps, args.warmup)
            if section == "layout" or args.profile:  # where the time goes (ms per step)
                for name, fn in steps.items():
                    prof = profile_ms_per_step(fn, batches, args.steps)
                    result.setdefault("profile", {})[f"{section}_d{dim}_{name}"] = prof
                    if section == "layout":  # the keys of earlier runs
                        result[f"layout_d{dim}_{name}_fbgemm_forward_ms"] = prof["tbe_forward"]
                        result[f"layout_d{dim}_{name}_fbgemm_backward_ms"] = prof["tbe_backward"]
                    print(f"  {name:<16} " + ", ".join(f"{k} {v:.1f}" for k, v in prof.items())
                          + " (ms/step)")
            rows = summarize(samples, "full")
            for name, row in rows.items():
                result[f"{section}_d{dim}_{name}_ratio"] = row["ratio"]
                result[f"{section}_d{dim}_{name}_samples_per_s"] = row["samples_per_s"]
            result.setdefault("rounds", {})[f"{section}_d{dim}"] = {
                n: r["rounds"] for n, r in rows.items()}
            print(f"\n{section}, dim {dim}, batch {args.batch} (median of {args.reps} rounds)")
            for name, row in rows.items():
                print(f"  {name:<16}{row['samples_per_s']:>12,.0f} samples/s  {row['ratio']:.3f}x")
            sys.stdout.flush()
    if not args.quick or args.out != p.get_default("out"):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        if args.merge and os.path.exists(args.out):  # add to an earlier run's sections
            with open(args.out) as fh:
                old = json.load(fh)
            merged = {k: {**old.get(k, {}), **result.get(k, {})} for k in ("rounds", "profile")}
            result = {**old, **result, **{k: v for k, v in merged.items() if v}}
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
