"""Re-clustering of CCE tables ("Clustering the Sketch", Tsang & Ahle 2023).

For each CCE table and chunk ``i``:

1. take the table's sample of training ids (its reservoir: frequent ids weigh more), or, if no
   id was seen yet, a seeded uniform sample of ``[0, V)``;
2. compute the current chunk vectors ``A_i[p_i(x)] + B_i[h_i(x)]`` of its distinct ids from
   the *old* state;
3. run k-means with ``k = rows`` on them, each weighted by its occurrences in the sample (the
   Lloyd updates of k-means on every occurrence, on fewer points; sums/counts all-reduced
   across ranks);
4. for every covered id ``[0, N)`` (``N = CCEConfig.assigned_ids``, default ``V``; in bounded
   batches) compute its old vector again, set ``p_i(x)`` = nearest centroid and accumulate the
   residual ``vector - centroid`` into the bucket ``h'_i(x)`` of a *fresh* hash ``h'`` (next
   generation). Uncovered ids ``[N, V)`` keep their hashed ``p`` and do not enter B's means
   (their residual to a hashed, not nearest, centroid would swamp the frequent ids' buckets);
   they still enter the k-means sample of step 1-3;
5. only then write: ``A_i`` = centroids, ``B_i[j]`` = mean residual of bucket ``j`` (0 if empty),
   ``h`` = ``h'``, and reset the optimizer state of the rewritten codebook rows.

Every "before" value is read before any state is written (the public reference code mutates
the hash inside its batch loop and divides by empty counts; this module does neither).

The same code runs in one process and under ``torch.distributed``: everything crossing ranks
goes through a :class:`~torchrec_cce.clustering.kmeans.Collective`. A rank processes the ids in
``id_range`` (its shard of ``p``, or its slice of a replicated ``p``), residual sums/counts are
all-reduced, and a replicated ``p`` is re-assembled by all-gather.
"""

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from torchrec_cce.clustering.kmeans import (
    CentroidIndex,
    Collective,
    default_collective,
    kmeans,
    parallel_tasks,
    worker_threads,
)
from torchrec_cce.clustering.sampling import expected_distinct
from torchrec_cce.hashing import derive_seed, hash_ids
from torchrec_cce.methods.base import codebook_table_name
from torchrec_cce.methods.cce import CCETable
from torchrec_cce.optim import reset_optimizer_state

DEFAULT_ID_BATCH = 1 << 18
# Lloyd iterations per chunk and re-clustering (every caller's default: train.py --kmeans-iters,
# recluster(), ReclusterSchedule, training_hooks). 3, not 10: half the re-clustering time of
# Criteo Kaggle's vocabulary (207.8 vs 403.9 CPU-s) with test log loss unchanged within the seeds'
# spread on Frappe and MovieLens at 1/16 and 1/64 (benchmarks/README.md, "Lloyd iterations").
LLOYD_ITERS = 3


def recluster_workspace_bytes(method: CCETable, world_size: int = 1,
                              workers: Optional[int] = None,
                              id_batch: int = DEFAULT_ID_BATCH,
                              counts: Optional[Any] = None) -> int:
    """Estimated peak of the temporary memory one rank allocates while re-clustering
    ``method`` (freed afterwards; training's own state not included): the largest of its
    phases, each counted from the tensors it holds at once. ``world_size`` ranks share the
    distinct sampled ids and the covered ids; ``workers`` (default
    ``torch.get_num_threads()``) partial results are held at once. ``counts`` (the table's
    per-id training frequencies) give the expected number of distinct ids in the full sample
    (:func:`~torchrec_cce.clustering.sampling.expected_distinct`); without them every sampled
    id counts as distinct (an upper bound).
    ``benchmarks/recluster.py`` compares it with the measured peak RSS of each table."""
    w = max(1, int(world_size))
    t = max(1, int(workers or torch.get_num_threads()))
    c, cd, k = method.chunks, method.chunk_dim, method.rows
    occ = w * method.sample_share(w)  # every rank's share of the sample, gathered
    distinct = min(occ, method.num_embeddings)
    if counts is not None:
        distinct = min(distinct, math.ceil(expected_distinct(occ, counts)))
    n = -(-distinct // w)  # this rank's distinct sampled ids
    pool = min(distinct, max(4096, 8 * k))  # k-means' replicated init pool
    sums = c * k * (cd + 1) * 8  # residual sums + counts, float64
    gathered = occ * 8 if w > 1 else 0
    # 1. the distinct sample: gathered ids, sort temporaries, unique ids + counts
    sample = gathered + 2 * occ * 8 + 16 * distinct
    # 2-3. unique ids/counts kept, weights, the vectors [n, c, cd]; per chunk: centred copy,
    # finiteness mask, assignment, distances, previous assignment; pool and k-means|| state;
    # per-worker statistics (k x (cd + 1) float64 and one float64 block)
    lloyd = (16 * distinct + 4 * n + n * c * cd * 4 + n * (cd * 4 + cd + 8 + 4 + 8)
             + pool * ((cd + 1) * 4 * 2 + 3 * 8)
             + t * ((k * (cd + 1) + 2) * 8 + (1 << 16) * (cd + 1) * 8))
    # 4. every covered id: new p (int32) of this rank's ids; per batch in flight: ids, old p,
    # old and new buckets (int64 per chunk), a chunk's vectors, residuals, nearest index and
    # distance, partial sums; the totals and their all-reduce
    covered = -(-int(method.assigned_ids) // w)
    per_batch = id_batch * (8 + 3 * c * 8 + cd * 4 + cd * 8 + 8 + 4) + sums
    all_ids = covered * c * 4 + t * per_batch + 3 * sums + c * k * cd * 4
    # 5. a replicated p is re-assembled from every rank's part
    write = int(method.assigned_ids) * c * 4 * 2 if w > 1 else 0
    stacked_ab = 2 * c * k * cd * 4
    return max(sample, lloyd, all_ids, write) + stacked_ab


@dataclass
class ReclusterState:
    """What re-clustering reads and writes for one CCE table, wherever it lives.

    ``A``/``B`` are the full codebooks stacked chunk by chunk (``chunks * rows`` rows, see
    ``CCETable.stack_ab``; small by design, so a sharded table gathers them). ``p`` is read and
    written through ``method`` (``lookup_assignment``/``write_assignment``;
    ``assignment``/``assignment_offset`` describe its stored words and first id); this rank
    re-assigns the covered ids ``id_range``.
    """

    method: CCETable
    A: torch.Tensor
    B: torch.Tensor
    assignment: torch.Tensor
    assignment_offset: int
    id_range: Tuple[int, int]
    gather_assignment: bool = False
    # p(x) for arbitrary ids when this rank stores only a shard of p (fetched from the owners).
    sample_lookup: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # The vectors to cluster, ``ids -> [n, chunks, chunk_dim]``; None: the table's own
    # ``A_i[p_i] + B_i[h_i]``. Warm start (:mod:`torchrec_cce.warm_start`) passes a trained
    # full table's rows, so the same steps 1-5 quantise them.
    vectors: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def _sample_ids(method: CCETable, collective: Collective, generation: int) -> torch.Tensor:
    """This rank's sample; if no rank saw any id, a seeded uniform sample split across ranks."""
    local = method.reservoir.sample()
    total = collective.all_reduce_sum(
        torch.tensor([float(local.numel())], device=local.device))
    if float(total) > 0:
        return local
    n = min(method.reservoir.capacity, method.num_embeddings)
    gen = torch.Generator().manual_seed(
        derive_seed(method.config.seed, method.table_name, generation, "uniform_sample"))
    ids = torch.randperm(method.num_embeddings, generator=gen)[:n] if n < method.num_embeddings \
        else torch.arange(method.num_embeddings)
    return ids[collective.rank::collective.world_size].to(local.device)


def _distinct_sample(sample: torch.Tensor, collective: Collective
                     ) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """This rank's part of the distinct sampled ids of all ranks and their occurrence counts,
    and the totals over all ranks (occurrences, distinct ids; the same on every rank).

    k-means of the distinct ids' vectors weighted by their counts has the same Lloyd updates
    and inertia as k-means of every occurrence (an id's occurrences share one vector), on
    fewer points: Yelp2018's 372,736 sampled occurrences are 31,669 distinct users. The
    distinct ids are sorted and split into contiguous rank slices, so their concatenation in
    rank order is the single-process ``torch.unique``: k-means sees the same points at any
    world size."""
    if collective.world_size > 1:
        sample = collective.all_gather_cat(sample)
    ids, counts = torch.unique(sample, return_counts=True)
    n, r, w = ids.numel(), collective.rank, collective.world_size
    lo, hi = n * r // w, n * (r + 1) // w
    return ids[lo:hi], counts[lo:hi].to(torch.float32), sample.numel(), n


def chunk_vectors(method: CCETable, A: torch.Tensor, B: torch.Tensor,
                  p: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``[n, chunks, chunk_dim]``: ``A_i[p_i] + B_i[h_i]`` for chunk-local rows ``p``, ``h``."""
    shift = torch.arange(method.chunks, device=p.device) * method.rows
    return A[p + shift] + B[h + shift]


def _buckets(method: CCETable, ids: torch.Tensor, generation: torch.Tensor) -> torch.Tensor:
    """``h(x)`` of ``generation`` for all chunks at once (``[n, chunks]``): the same values as
    ``method.bucket`` in one broadcast hash instead of one per chunk."""
    if method.init != "hash":  # CCEConfig(init="qr"): the remainder, not a hash
        return method.bucket(ids, generation)
    keys = torch.stack(method.h_keys(generation)).to(ids.device)
    return hash_ids(ids.unsqueeze(1), keys.unsqueeze(0), method.rows)


def check_finite_codebooks(state: ReclusterState) -> None:
    """Refuse to re-cluster from a codebook holding NaN/inf (it would spread to every id)."""
    m = state.method
    for name, W in (("A", state.A), ("B", state.B)):
        bad = ~torch.isfinite(W.detach().view(m.chunks, m.rows, -1)).all(-1)
        if bool(bad.any()):
            chunk = int(torch.nonzero(bad.any(1)).flatten()[0])
            raise ValueError(
                f"recluster: table {m.table_name!r}, chunk {chunk}: codebook {name} has "
                f"{int(bad[chunk].sum())} row(s) with NaN/inf (training diverged); nothing was "
                "changed. Lower the learning rate or restore the last good checkpoint, then "
                "re-cluster.")


def _assign_all_ids(state: ReclusterState, A: torch.Tensor, B: torch.Tensor,
                    cents: torch.Tensor, next_gen: torch.Tensor, id_batch: int,
                    phases: Optional[Dict[str, float]] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Step 4 on this rank's ids, in batches of ``id_batch``: each id's old chunk vectors
    (``A_i[p_i] + B_i[h_i]``, gathered per chunk), their exact nearest new centroid
    (:class:`~torchrec_cce.clustering.kmeans.CentroidIndex`, built once per chunk) and the
    residual sums/counts per bucket of the fresh hash. Returns ``(new p [n, chunks] int32,
    sums [chunks, rows, chunk_dim] float64, counts [chunks, rows] float64, sum of squared
    residuals)`` for the local ids (sums/counts not yet all-reduced).

    The batches are independent tasks on the k-means worker threads (torch single-threaded
    inside each: see :func:`~torchrec_cce.clustering.kmeans.parallel_tasks`); their partial
    sums are added in batch order, so the result does not depend on the thread count."""
    m, c, rows = state.method, state.method.chunks, state.method.rows
    dev = A.device
    A3, B3 = A.view(c, rows, -1), B.view(c, rows, -1)
    lo, hi = state.id_range
    new_p = torch.empty(max(0, hi - lo), c, dtype=torch.int32, device=dev)
    with worker_threads():
        indexes = [CentroidIndex(cents[i]) for i in range(c)]

    def batch(b_lo: int, b_hi: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              Dict[str, float]]:
        times: Dict[str, float] = {}
        clock = _Clock(times, cpu=False)
        ids = torch.arange(b_lo, b_hi, device=dev)
        if state.vectors is None:
            p_old = _assignment_rows(state, b_lo, b_hi)
            clock("all_ids_read_p")
            h_old = _buckets(m, ids, m.h_generation)
        else:
            given = state.vectors(ids).to(dev, torch.float32)
        h_new = _buckets(m, ids, next_gen)
        clock("all_ids_hash")
        sums = torch.zeros(c, rows, m.chunk_dim, dtype=torch.float64, device=dev)
        counts = torch.zeros(c, rows, dtype=torch.float64, device=dev)
        residual_sq = torch.zeros((), dtype=torch.float64, device=dev)
        for i in range(c):
            if state.vectors is None:
                vec = A3[i].index_select(0, p_old[:, i]).add_(B3[i].index_select(0, h_old[:, i]))
            else:
                vec = given[:, i].clone()
            clock("all_ids_gather")
            idx, dist = indexes[i].brute_force(vec)
            clock("all_ids_search")
            new_p[b_lo - lo: b_hi - lo, i] = idx.to(torch.int32)
            residual_sq += dist.sum(dtype=torch.float64)
            resid = vec.sub_(cents[i].index_select(0, idx)).double()
            sums[i].index_add_(0, h_new[:, i], resid)
            counts[i] += torch.bincount(h_new[:, i], minlength=rows).to(torch.float64)
            clock("all_ids_residual")
        return sums, counts, residual_sq, times

    tasks = [functools.partial(batch, b_lo, min(hi, b_lo + id_batch))
             for b_lo in range(lo, hi, id_batch)]
    sums = torch.zeros(c, rows, m.chunk_dim, dtype=torch.float64, device=dev)
    counts = torch.zeros(c, rows, dtype=torch.float64, device=dev)
    residual_sq = torch.zeros((), dtype=torch.float64, device=dev)
    with worker_threads() as wave:  # at most this many batches' partial sums held at once
        wave = max(1, wave)
    for w_lo in range(0, len(tasks), wave):
        for s_part, c_part, r_part, times in parallel_tasks(tasks[w_lo: w_lo + wave]):
            sums += s_part  # batch order: deterministic sums
            counts += c_part
            residual_sq += r_part
            if phases is not None:
                for k, v in times.items():
                    phases[k] = phases.get(k, 0.0) + v
    return new_p, sums, counts, float(residual_sq)


class _Clock:
    """Accumulates the wall and (if ``cpu``) process-CPU seconds since the previous call into
    ``phases[name]`` and ``phases[name + "_cpu"]`` (no-op if ``phases`` is None)."""

    def __init__(self, phases: Optional[Dict[str, float]], cpu: bool = True) -> None:
        self.phases = phases
        self.cpu = cpu
        self.reset()

    def reset(self) -> None:
        self.last, self.last_cpu = time.perf_counter(), time.process_time()

    def __call__(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if self.phases is not None:
            self.phases[name] = self.phases.get(name, 0.0) + now - self.last
            if self.cpu:
                self.phases[name + "_cpu"] = self.phases.get(name + "_cpu", 0.0) + cpu - self.last_cpu
        self.last, self.last_cpu = now, cpu


# Off by default: measured on Yelp2018 CCE at 1/16 (seed 0), the second re-clustering of a
# trained model warm-started from A_i ended at about twice the k-means inertia of a seeded one
# (user 1695 vs 866, item 917 vs 454; test log loss 0.6142 both), although on synthetic
# codebooks moved by noise it ended 3.8% lower and faster (benchmarks/README.md).
WARM_START = False


def warm_start_from_codebook(state: ReclusterState, generation: int) -> bool:
    """Whether k-means starts from the table's codebook ``A_i`` instead of seeding: only with
    :data:`WARM_START`, after a first re-clustering (``generation >= 1``) and when the vectors
    are the table's own (each row of ``A_i`` was then a centroid of the ids assigned to it,
    trained on since). Before (``p`` from the hash or QR initialisation) and for given
    vectors, the rows are no such centroids."""
    return WARM_START and generation >= 1 and state.vectors is None


@torch.no_grad()
def recluster_table(state: ReclusterState, collective: Optional[Collective] = None,
                    iters: int = LLOYD_ITERS, id_batch: int = DEFAULT_ID_BATCH
                    ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, float]]:
    """Re-cluster one CCE table. Writes ``p`` (``state.assignment``) and bumps the hash
    generation; returns the new ``(A, B)`` for the caller to write into its codebook storage
    (a plain tensor, a sharded TBE, ...) and per-table statistics.

    Raises ``ValueError`` naming the table and chunk, before anything is written, if a codebook
    holds NaN/inf (every rank checks the same gathered codebooks, so all ranks refuse)."""
    start = time.perf_counter()
    phases: Dict[str, float] = {}
    clock = _Clock(phases)
    collective = collective or default_collective()
    m, c, rows = state.method, state.method.chunks, state.method.rows
    check_finite_codebooks(state)
    A, B = state.A.detach().float(), state.B.detach().float()
    generation = int(m.h_generation)

    # 1-3: k-means per chunk on the sample's current vectors (old state).
    sample, weight, occurrences, distinct = _distinct_sample(
        _sample_ids(m, collective, generation), collective)
    if state.vectors is not None:
        x = state.vectors(sample).to(A.device, torch.float32)
    elif state.sample_lookup:  # collective: on this thread
        p_sample = state.sample_lookup(sample)
        with worker_threads():
            x = chunk_vectors(m, A, B, p_sample, m.bucket(sample))
    else:
        def vectors(a: int, b: int) -> torch.Tensor:
            ids = sample[a:b]
            return chunk_vectors(m, A, B, _lookup(state, ids), m.bucket(ids))

        step = 1 << 16
        x = A.new_empty(sample.numel(), c, m.chunk_dim)  # filled in place: no second copy

        def fill(a: int, b: int) -> None:
            x[a:b] = vectors(a, b)

        parallel_tasks([functools.partial(fill, a, min(a + step, sample.numel()))
                        for a in range(0, sample.numel(), step)])
    clock("sample_vectors")
    centroids: List[torch.Tensor] = []
    start_inertia = end_inertia = 0.0
    reseeded = iters_run = 0
    # Optionally, after a first re-clustering, A_i seeds Lloyd (see warm_start_from_codebook).
    warm = warm_start_from_codebook(state, generation)
    for i in range(c):
        init = A.view(c, rows, -1)[i] if warm else "auto"
        res = kmeans(x[:, i], k=rows, iters=iters, collective=collective, weights=weight,
                     final_pass=False,  # only the centroids are used: step 4 assigns every id
                     seed=derive_seed(m.config.seed, m.table_name, i, f"kmeans{generation}"),
                     init=init)
        centroids.append(res.centroids.to(A.dtype))
        start_inertia += float(res.inertia_history[0]) if res.inertia_history else float(res.inertia)
        end_inertia += float(res.inertia)
        reseeded += int(res.reseeded)
        iters_run += int(res.iters_run)
        clock("kmeans_lloyd")
    cents = torch.stack(centroids)  # [c, rows, chunk_dim]
    del x, sample, weight  # the sample's vectors are not needed by the all-ids pass
    kmeans_seconds = time.perf_counter() - start

    # 4: every owned id -> nearest centroid; residuals into buckets of the fresh hash.
    next_gen = torch.full_like(m.h_generation, generation + 1)
    clock("other")
    mine, sums, counts, residual_sq = _assign_all_ids(state, A, B, cents, next_gen, id_batch,
                                                      phases)
    clock("all_ids")
    flat = collective.all_reduce_sum(torch.cat([sums.flatten(), counts.flatten(),
                                                torch.tensor([residual_sq], dtype=torch.float64,
                                                             device=A.device)]))
    sums = flat[: sums.numel()].view_as(sums)
    counts = flat[sums.numel(): sums.numel() + counts.numel()].view_as(counts)
    residual_sq = float(flat[-1])
    clock("all_reduce")

    # 5: write the new state (nothing above read anything written here).
    _write_assignment(state, mine, collective)
    clock("write_p")
    m.h_generation.copy_(next_gen)
    new_B = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1).unsqueeze(-1),
                        torch.zeros_like(sums)).to(A.dtype)
    clock("other")
    stats = {
        "kmeans_inertia_start": start_inertia,
        "kmeans_inertia_end": end_inertia,
        "reseeded": reseeded,
        "warm_start": int(warm),
        "kmeans_iters_run": iters_run,
        "num_samples": occurrences,
        "num_distinct_samples": distinct,
        "num_ids": m.num_embeddings,
        "mean_residual_sq": residual_sq / max(1, m.assigned_ids),
        "empty_buckets": int((counts == 0).sum()),
        "kmeans_seconds": kmeans_seconds,
        "seconds": time.perf_counter() - start,
    }
    # per phase: "<phase>_seconds" (wall) and "<phase>_cpu_seconds" (process CPU)
    stats.update({f"{k}_seconds": v for k, v in phases.items()})
    return cents.reshape(c * rows, -1), new_B.reshape(c * rows, -1), stats


def _assignment_rows(state: ReclusterState, lo: int, hi: int) -> torch.Tensor:
    """Stored ``p`` of the owned (covered) ids ``[lo, hi)``, ``[n, c]`` int64 (unpacked)."""
    return state.method.lookup_assignment(torch.arange(lo, hi, device=state.A.device))


def _lookup(state: ReclusterState, ids: torch.Tensor) -> torch.Tensor:
    return state.method.lookup_assignment(ids)


def _write_assignment(state: ReclusterState, mine: torch.Tensor, collective: Collective) -> None:
    """Write the new ``p`` through ``CCETable.write_assignment``, in blocks of whole packed
    words (they touch disjoint words, so they run as parallel tasks)."""
    lo, hi = state.id_range
    if state.gather_assignment:
        mine = collective.all_gather_cat(mine)
        lo, hi = 0, mine.shape[0]
    m = state.method
    step = max(1, (1 << 18) // m.id_alignment()) * m.id_alignment()
    first = m.stored_lo + ((lo - m.stored_lo) // step + 1) * step  # word-aligned block starts
    bounds = [lo] + list(range(first, hi, step)) + [hi]

    def write(a: int, b: int) -> None:
        m.write_assignment(torch.arange(a, b, device=mine.device), mine[a - lo: b - lo])

    parallel_tasks([functools.partial(write, a, b) for a, b in zip(bounds[:-1], bounds[1:])])


def _unsharded_states(collection: nn.Module, collective: Collective
                      ) -> Iterable[Tuple[str, ReclusterState, Dict[str, nn.Parameter]]]:
    for t in collection.embedding_bag_configs():
        method = collection.tables[t.name]
        method = getattr(method, "cold", method)  # a tiered table's cold CCE (TieredTable)
        if not isinstance(method, CCETable):
            continue
        weights = {cb.suffix: collection.codebooks.embedding_bags[
            codebook_table_name(t.name, cb.suffix)].weight for cb in method.codebooks}
        wa, wb = method.stack_ab(weights.__getitem__)
        # Only covered ids ([0, N)) are re-assigned and enter B's residual means.
        V, w, r = method.assigned_ids, collective.world_size, collective.rank
        # A replicated p: each rank re-assigns a contiguous slice, then all ranks gather.
        per = -(-V // w)
        rng = (min(V, r * per), min(V, (r + 1) * per))
        yield t.name, ReclusterState(method, wa, wb, method.assignment, 0, rng,
                                     gather_assignment=w > 1), weights




def check_collection_codebooks(collection: nn.Module, collective: Collective) -> None:
    """``ValueError`` naming the table and chunk if an unsharded collection's CCE codebooks hold
    NaN/inf (checked before any re-clustering writes state)."""
    for _, state, _ in _unsharded_states(collection, collective):
        check_finite_codebooks(state)


@torch.no_grad()
def recluster_collection(collection: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                         iters: int, id_batch: int, collective: Collective
                         ) -> Dict[str, Dict[str, float]]:
    """Re-cluster every CCE table of one unsharded ``CCEEmbeddingBagCollection`` (its codebooks
    live in ``collection.codebooks``); ``{table: stats}``."""
    out: Dict[str, Dict[str, float]] = {}
    for name, state, weights in _unsharded_states(collection, collective):
        new_a, new_b, stats = recluster_table(state, collective, iters, id_batch)
        for suffix, new in state.method.unstack_ab(new_a, new_b).items():
            weights[suffix].copy_(new.to(weights[suffix].dtype))
        stats["optimizer_states_reset"] = reset_optimizer_state(weights.values(), optimizers)
        out[name] = stats
    return out
