"""Lloyd's k-means in which every cross-rank exchange goes through one small hook.

The all-reduce contract
-----------------------
Each rank calls :func:`kmeans` with *its own* samples; all communication goes through a
:class:`Collective` (``all_reduce_sum``, ``all_gather_cat``):

* initialisation: ``all_gather_cat`` of the sample counts and of a bounded, seeded *init pool*
  (which samples join it depends only on their global index, i.e. on the concatenation of all
  ranks' samples in rank order, never on the world size); with more than one rank, two
  ``all_reduce_sum`` calls then make rank 0's centring shift and initial centroids everybody's
  (they are computed identically everywhere; this guards against reductions or BLAS results
  that differ between hosts or thread counts);
* each Lloyd iteration: exactly one ``all_reduce_sum`` of one float64 vector ``[per-centroid
  sums (k*d), per-centroid counts or weights (k), inertia, changed assignments]``;
* an iteration that re-seeds empty clusters: one more ``all_reduce_sum`` (rank 0's choice).

So every rank holds the same centroids after every step, and a run over ranks equals a
single-process run on the concatenated samples (same seed) up to float summation order. With
:class:`LocalCollective` (a world of one) the very same code runs locally.

Nearest centroid, exactly
-------------------------
:class:`CentroidIndex` finds every row's nearest centroid with the op library's kernels
(:mod:`torchrec_cce.clustering.native`, CPU, ``d <= 16``) where it is built, else by batched
``addmm`` + argmin in torch. The kernels never write an ``n x k`` matrix (at CCE's chunk dims
that memory traffic, not the arithmetic, is what BLAS + argmin pays): per row they keep the
best and second-best score ``||c||^2 - 2 x.c`` in registers. For ``k >= 2048`` the *grouped*
kernel first splits the centroids into bounding boxes of ``k / 32`` (32 to 128; a balanced
k-d tree; runs of 32 boxes form superboxes, bounded first) and scans
only the boxes that can hold a centroid within the near-tie margin of the best one found
(3-4x fewer operations at d = 4, far more at large k); if a batch shows the boxes do not prune (most are scanned,
as for isotropic data at d = 16), that index switches to the plain brute-force kernel.
Whatever path, the float32 answer is then made *exact*: a row whose best and second-best
float32 scores lie within the float32 error bound of each other is re-scored in float64
against every centroid that could lie within that bound (with boxes: the centroids of the boxes
within reach, else all). The assignment is therefore the argmin of the float64 distance from the
float32 point to the float32 centroids (ties: lowest index), whichever path, thread count or
batch size computed it. Rows are split over ``torch.get_num_threads()`` Python worker threads
(see :func:`_worker_threads`).
"""

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from torchrec_cce.clustering import native
from torchrec_cce.hashing import derive_seed, hash_ids

# torch path: rows per batch so that one batch holds about this many distances (4 MiB of
# float32: stays in cache), never more than the hard bound.
_TARGET_BATCH_ELEMENTS = 1 << 20
_MAX_BATCH_ELEMENTS = 1 << 24
# compiled path: rows per kernel call (bounds the per-call temporaries of a worker)
_NATIVE_ROWS = 1 << 16
# Two-stage argmin of the torch path: min over "rows" of a [b, k / W, W] view, then over W.
_ARGMIN_WIDTH = 128
_F32_EPS = 1.2e-7
# float64 re-scoring of near-ties: distances per batch
_EXACT_BATCH_ELEMENTS = 1 << 20
# Box-pruned float64 re-scoring: at most this many (row, centroid) candidate pairs at once, per
# worker thread (each costs ~100 bytes of float64 gathers and differences).
_EXACT_PAIRS = 1 << 18
# Lloyd statistics: rows converted to float64 at once per worker (bounds that copy's memory).
_STATS_BLOCK = 1 << 16
# Grouped (pruned) search: centroids per bounding box, the smallest k and largest d it is
# tried at, and the fraction of boxes scanned above which a query batch falls back to the
# brute force for the rest of the index's life.
_GROUP_LEAF = int(os.environ.get("TORCHREC_CCE_GROUP_LEAF", "0"))  # 0: k / 32 in [32, 128]
_GROUP_MIN_K = 2048  # measured: slower than the brute force below (build + per-row overhead)
_GROUP_MAX_D = int(os.environ.get("TORCHREC_CCE_GROUP_MAX_D", "16"))
_GROUP_MAX_VISIT = 0.6
_GROUP_PROBE = 4096  # rows of the probe batch that decides
# Seedings of :func:`kmeans` (besides a tensor of initial centroids). "auto": exact k-means++
# up to AUTO_KMEANSPP_MAX_K centroids (its k sequential pool passes cost ~0.3 s at k = 2048),
# k-means|| above (O(log k) passes; exact k-means++ at k = 131,072 did not finish in 12 min).
INITS = ("auto", "kmeans||", "kmeans++", "random")
AUTO_KMEANSPP_MAX_K = 2048
# k-means|| round sizes grow by this factor (1, 1, 1, 1, 1, 2, 2, 3, ...). Measured (tests and
# benchmarks/kmeans.py "seeding"): 2.0 (rounds of 1, 1, 2, 4, ...) left 10% more inertia than
# k-means++ after 10 Lloyd steps on 1024 planted clusters with k = 4096, 1.25 about 1%.
KMEANS_PARALLEL_GROWTH = 1.25


# --------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------
class Collective:
    """Cross-rank hook used by k-means and re-clustering.

    ``all_reduce_sum(t)`` returns the element-wise sum of ``t`` over ranks (identical on every
    rank, input untouched); ``all_gather_cat(t)`` returns every rank's ``t`` concatenated along
    dim 0 in rank order (first dims may differ, trailing dims and dtype must match). The base
    class is a world of one.
    """

    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        return t


class LocalCollective(Collective):
    """A world of one: both operations are identities."""


class ProcessGroupCollective(Collective):
    """``torch.distributed`` over ``group`` (default: the world). Works on gloo (CPU) and NCCL."""

    def __init__(self, group: Optional["dist.ProcessGroup"] = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().contiguous()
        size = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        counts = [int(s) for s in sizes]
        longest = max(counts)
        if longest == 0:
            return t.new_empty((0,) + tuple(t.shape[1:]))
        padded = t.new_zeros((longest,) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])


def default_collective() -> Collective:
    """The default process group if ``torch.distributed`` is initialised, else a world of one."""
    if dist.is_available() and dist.is_initialized():
        return ProcessGroupCollective()
    return LocalCollective()


# --------------------------------------------------------------------------------------------
# Nearest centroid
# --------------------------------------------------------------------------------------------
def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


_POOL: Optional[ThreadPoolExecutor] = None
_LOCAL = threading.local()


@contextlib.contextmanager
def _worker_threads() -> Iterator[int]:
    """Inside: torch ops run single-threaded and :func:`_parallel` supplies the parallelism
    with ``torch.get_num_threads()`` Python threads (torch releases the GIL in its kernels).

    k-means is many medium-sized ops. Intra-op (OpenMP) threading parallelises them poorly,
    and on a machine with other busy processes every OpenMP barrier waits for a descheduled
    thread: 2 threads ran 4x slower than 1 here. Whole chunks on blocking Python threads scale
    instead, and degrade gracefully under load. Re-entrant; restores the thread count."""
    outer = getattr(_LOCAL, "workers", None)
    if outer is not None:
        yield outer
        return
    n = torch.get_num_threads()
    _LOCAL.workers = n
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield n
    finally:
        if n > 1:
            torch.set_num_threads(n)
        _LOCAL.workers = None


def _parallel(tasks: Sequence[Callable[[], Any]]) -> List[Any]:
    """Run independent tasks (that write disjoint outputs) on the worker threads."""
    global _POOL
    with _worker_threads() as n:
        if n <= 1 or len(tasks) <= 1:
            return [t() for t in tasks]
        if _POOL is None or _POOL._max_workers < n:
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="kmeans")
        futures = [_POOL.submit(t) for t in tasks]
        return [f.result() for f in futures]


def _in_worker_threads(fn: Callable) -> Callable:
    """Run ``fn`` inside :func:`_worker_threads` (and without autograd)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _worker_threads(), torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


worker_threads = _worker_threads
parallel_tasks = _parallel


def _split(n: int, parts: int, minimum: int = 4096) -> List[Tuple[int, int]]:
    """``[lo, hi)`` ranges covering ``range(n)``: ``parts`` of them, each >= ``minimum``."""
    parts = max(1, min(parts, n // max(1, minimum)))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def _workers() -> int:
    return getattr(_LOCAL, "workers", None) or torch.get_num_threads()



class CentroidIndex:
    """Exact nearest-centroid search over a fixed set of centroids ``[k, d]``.

    Build once, query many batches. ``method``: ``"auto"`` (the compiled kernel when it is
    available and ``d <= 16`` on CPU, else torch), ``"native"`` (the kernel, or an error) or
    ``"torch"`` (batched ``addmm``, at most ``batch_size x k`` distances at once). All give the
    same assignments (see the module docstring: float32 scoring, float64 re-scoring of
    near-ties)."""

    def __init__(self, centroids: torch.Tensor, batch_size: Optional[int] = None,
                 method: str = "auto") -> None:
        c = centroids.detach().to(torch.float32).contiguous()
        if c.dim() != 2 or c.shape[0] == 0:
            raise ValueError(f"CentroidIndex: centroids must be [k, d] with k >= 1, got {tuple(c.shape)}")
        if method not in ("auto", "grouped", "native", "torch"):
            raise ValueError("CentroidIndex: method must be 'auto', 'grouped', 'native' or "
                             f"'torch', got {method!r}")
        self.centroids = c
        self.k, self.d = c.shape
        self.sq = (c * c).sum(1)
        self.sq_max = float(self.sq.max())
        self.batch_size = batch_size
        fits = c.device.type == "cpu" and self.d <= 16
        if method in ("native", "grouped") and not (fits and native.available()):
            raise RuntimeError(f"CentroidIndex(method={method!r}): the compiled kernel needs "
                               "CPU tensors with d <= 16 and the op library (python -m "
                               "torchrec_cce.ops; see torchrec_cce.clustering.native)")
        if method == "grouped" and not native.grouped_supported():
            raise RuntimeError("CentroidIndex(method='grouped'): this CPU has no AVX2 + FMA")
        self.native = method != "torch" and fits and native.available()
        k = self.k
        if self.native:
            kp = _round_up(k, 32)
        else:  # two-stage argmin width: a power of two, about k / 4 for small k, at most 128
            self._w = min(_ARGMIN_WIDTH, 1 << max(0, (k // 4).bit_length() - 1))
            self._two_stage = self._w >= 16
            kp = _round_up(k, self._w) if self._two_stage else k
        self._kp = kp
        self._ct = torch.zeros(self.d, kp, device=c.device)
        self._ct[:, :k] = c.t()
        self._bias = torch.full((kp,), float("inf"), device=c.device)
        self._bias[:k] = self.sq
        self.groups: Optional[native.CentroidGroups] = None
        self._forced = method == "grouped"
        self._pruning = False  # set once a probe batch showed that the boxes prune
        if self._forced or (method == "auto" and self.native and native.grouped_supported()
                            and k >= _GROUP_MIN_K and self.d <= _GROUP_MAX_D):
            leaf = _GROUP_LEAF or min(128, max(32, k // 32))
            self.groups = native.CentroidGroups(c, self.sq, leaf)

    def _err(self, sq_norm: torch.Tensor) -> torch.Tensor:
        """Generous bound on the float32 error of a score ``||c||^2 - 2 x.c``."""
        return (sq_norm + self.sq_max) * ((self.d + 16) * _F32_EPS)

    def _exact(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """float64 argmin (lowest index on ties) and distance of each row, for the few rows
        whose float32 scores cannot decide: only the centroids within the float32 error
        margin of the best score are re-scored, as ``sum((x - c)^2)`` in float64."""
        n = x.shape[0]
        idx = torch.empty(n, dtype=torch.int64, device=x.device)
        best = torch.empty(n, dtype=torch.float32, device=x.device)
        c64 = self.centroids.double()
        rows = max(1, _EXACT_BATCH_ELEMENTS // self._kp)
        for lo in range(0, n, rows):
            xb = x[lo: lo + rows]
            m = xb.shape[0]
            s = torch.addmm(self._bias, xb, self._ct, alpha=-2.0)
            margin = self._err((xb * xb).sum(1)).mul_(2.0)
            r, col = torch.nonzero(s <= (s.amin(1) + margin)[:, None], as_tuple=True)
            win, dmin = self._float64_argmin(xb, r, col, c64)
            idx[lo: lo + m] = win
            best[lo: lo + m] = dmin.float()
        return idx, best

    def _float64_argmin(self, xb: torch.Tensor, r: torch.Tensor, col: torch.Tensor,
                        c64: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """For candidate pairs (row ``r`` of ``xb``, centroid ``col`` of float64 ``c64``): each
        row's nearest candidate in float64 (lowest index on ties) and its squared distance."""
        m = xb.shape[0]
        d64 = (xb.double().index_select(0, r) - c64.index_select(0, col)).square_().sum(1)
        dmin = torch.full((m,), float("inf"), dtype=torch.float64, device=xb.device)
        dmin.scatter_reduce_(0, r, d64, reduce="amin")
        cand = torch.where(d64 == dmin.index_select(0, r), col, torch.full_like(col, self.k))
        win = torch.full((m,), self.k, dtype=torch.int64, device=xb.device)
        win.scatter_reduce_(0, r, cand, reduce="amin")
        return win, dmin

    def _exact_grouped(self, x: torch.Tensor, near: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_exact` through the bounding boxes: ``near`` is each row's float32 distance to
        its best centroid found by the kernel; only the groups whose box lies within
        ``near`` plus twice the near-tie margin (a superset of the centroids :meth:`_exact`
        re-scores, so the same float64 argmin, lowest index on ties) are re-scored, so a row
        costs ``O(G + leaf)`` instead of ``O(k)`` (at k = 131,072, ~1.7% of the rows are
        near-ties: 0.6 ms each through :meth:`_exact`)."""
        gr = self.groups
        n = x.shape[0]
        idx = torch.empty(n, dtype=torch.int64, device=x.device)
        best = torch.empty(n, dtype=torch.float32, device=x.device)
        lo, hi = gr.lo[:, : gr.num_groups], gr.hi[:, : gr.num_groups]
        sizes = gr.offsets[1:] - gr.offsets[:-1]
        c64 = self.centroids.double()
        rows = max(1, _EXACT_BATCH_ELEMENTS // max(1, gr.num_groups * self.d))
        todo = [(a, min(n, a + rows)) for a in range(n - 1 - (n - 1) % rows, -1, -rows)]
        while todo:  # row ranges, first ones last in the list
            a, b = todo.pop()
            xb = x[a:b]
            m = xb.shape[0]
            margin = self._err((xb * xb).sum(1)).mul_(2.0)
            thr = (near[a:b] + 2.0 * margin).mul_(1.0001).add_(1e-30)
            gap = torch.zeros(m, gr.num_groups, device=x.device)
            for t in range(self.d):
                v = torch.maximum(lo[t][None] - xb[:, t: t + 1], xb[:, t: t + 1] - hi[t][None])
                gap.add_(v.clamp_(min=0).square_())
            r, g = torch.nonzero(gap <= thr[:, None], as_tuple=True)
            per = sizes[g]
            if m > 1 and int(per.sum()) > _EXACT_PAIRS:
                # too many candidate pairs at once (large k: many boxes within reach): halve
                # the rows, so the float64 candidates stay within the bound
                half = a + m // 2
                todo += [(half, b), (a, half)]
                continue
            r = torch.repeat_interleave(r, per)
            first = torch.repeat_interleave(gr.offsets[g], per)
            within = torch.arange(r.numel(), device=x.device) - torch.repeat_interleave(
                per.cumsum(0) - per, per)
            cols = first + within
            real = torch.isfinite(gr.bias[cols])  # drop the groups' padding columns
            r, col = r[real], gr.perm[cols[real]]
            win, dmin = self._float64_argmin(xb, r, col, c64)
            idx[a: a + m] = win
            best[a: a + m] = dmin.float()
        return idx, best

    def _rows_per_batch(self, n: int) -> int:
        if self.batch_size is not None:
            b = int(self.batch_size)
        else:
            b = _NATIVE_ROWS if self.native else _TARGET_BATCH_ELEMENTS // self._kp
        if not self.native:
            b = min(b, _MAX_BATCH_ELEMENTS // self._kp)
        return max(1, min(b, max(n, 1)))

    @torch.no_grad()
    def brute_force(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(index int64 [n], squared distance [n] >= 0) of each row's nearest centroid."""
        with _worker_threads():
            x = x.detach().to(torch.float32).contiguous()
            n = x.shape[0]
            idx = torch.empty(n, dtype=torch.int64, device=x.device)
            best = torch.empty(n, dtype=torch.float32, device=x.device)
            if n == 0:
                return idx, best
            b = self._rows_per_batch(n)
            tie_parts = _parallel([functools.partial(self._rows, x, lo, hi, b, idx, best)
                                   for lo, hi in _split(n, _workers(), minimum=min(b, 4096))])
            ties = torch.cat(tie_parts)
            if ties.numel():  # near-ties of the float32 scores: decide them in float64
                xt, near = x.index_select(0, ties), best.index_select(0, ties)

                def decide(lo: int, hi: int) -> Tuple[torch.Tensor, torch.Tensor]:
                    if self.groups is not None:
                        return self._exact_grouped(xt[lo:hi], near[lo:hi])
                    return self._exact(xt[lo:hi])

                # each row is decided on its own: split over the worker threads
                parts = _parallel([functools.partial(decide, lo, hi) for lo, hi in
                                   _split(ties.numel(), _workers(), minimum=1024)])
                idx.index_copy_(0, ties, torch.cat([p[0] for p in parts]))
                best.index_copy_(0, ties, torch.cat([p[1] for p in parts]))
            return idx, best

    def _rows(self, x: torch.Tensor, start: int, stop: int, b: int, idx: torch.Tensor,
              best: torch.Tensor) -> torch.Tensor:
        """Score rows ``[start, stop)``; returns the rows whose answer float32 cannot settle."""
        ties: List[torch.Tensor] = []
        buf = None if self.native else torch.empty(b * self._kp, device=x.device)
        lo = start
        while lo < stop:
            # until the boxes have proved they prune, query them with a small probe batch
            probing = self.groups is not None and not self._forced and not self._pruning
            xb = x[lo: min(stop, lo + (min(b, _GROUP_PROBE) if probing else b))]
            m = xb.shape[0]
            xn = (xb * xb).sum(1)
            margin = self._err(xn).mul_(2.0)
            groups = self.groups
            if groups is not None:
                arg, val, close, visited = native.nearest2_grouped(xb, groups, xn, margin)
                close = close.sub_(val)
                if not self._forced and not self._pruning:
                    if visited > _GROUP_MAX_VISIT * m * groups.num_groups:
                        self.groups = None  # the boxes do not prune: brute force from now on
                    else:
                        self._pruning = True
            elif self.native:
                arg, val, close = native.nearest2(xb, self._ct, self._bias)
                close = close.sub_(val)  # gap to the second-best score
            else:
                val, arg, close = self._torch_rows(xb, buf)
            idx[lo: lo + m] = arg
            tie = torch.nonzero(close <= margin).squeeze(1)
            if tie.numel():
                ties.append(tie + lo)
            best[lo: lo + m] = val.add_(xn).clamp_(min=0)
            lo += m
        return torch.cat(ties) if ties else torch.empty(0, dtype=torch.int64, device=x.device)

    def _torch_rows(self, xb: torch.Tensor, buf: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(best score, index, 0 where another score lies within the margin else inf)."""
        kp, W, m = self._kp, getattr(self, "_w", 1), xb.shape[0]
        dist_b = buf[: m * kp].view(m, kp)
        torch.addmm(self._bias, xb, self._ct, alpha=-2.0, out=dist_b)
        if self._two_stage:
            # min over each residue class j (mod W): a vectorised vertical reduction, then
            # argmin over W classes and over the k / W entries of the winning class.
            v3 = dist_b.view(m, kp // W, W)
            val, j = torch.amin(v3, dim=1).min(dim=1)
            col = torch.gather(v3, 2, j.view(m, 1, 1).expand(m, kp // W, 1)).view(m, kp // W)
            arg = col.argmin(dim=1).mul_(W).add_(j)
        else:
            val, arg = dist_b.min(dim=1)
        margin = self._err((xb * xb).sum(1)).mul_(2.0)
        near = (dist_b <= (val + margin)[:, None]).sum(1) > 1
        gap = torch.where(near, torch.zeros_like(val), torch.full_like(val, float("inf")))
        return val, arg, gap


def _faiss_knn1(x: torch.Tensor, centroids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        import faiss  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("nearest_centroid(method='faiss') needs faiss (pip install faiss-cpu)") from e
    xs = x.detach().float().contiguous().cpu().numpy()
    cs = centroids.detach().float().contiguous().cpu().numpy()
    dist2, idx = faiss.knn(xs, cs, 1)
    return (torch.from_numpy(idx[:, 0]).to(device=x.device, dtype=torch.int64),
            torch.from_numpy(dist2[:, 0]).to(x.device).clamp_(min=0))


@torch.no_grad()
def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, batch_size: Optional[int] = None,
                     *, method: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Index (int64 ``[n]``) and squared L2 distance (``[n]``, >= 0) of each row's nearest centroid.

    Exact (float64 decides near-ties; ties go to the lowest index) and never an ``n x k``
    matrix. ``method``: ``"auto"`` (compiled kernel if available, else torch), ``"native"``,
    ``"torch"`` (``"brute"`` is an alias), all with the same answers, or ``"faiss"``
    (``faiss.knn``, needs faiss-cpu; float32, not re-checked). ``batch_size``: rows per batch.
    For many calls with the same centroids build one :class:`CentroidIndex`.
    """
    if method not in ("auto", "grouped", "native", "torch", "brute", "faiss"):
        raise ValueError("nearest_centroid: method must be 'auto', 'grouped', 'native', "
                         f"'torch', 'brute' or 'faiss', got {method!r}")
    if x.dim() != 2 or centroids.dim() != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"nearest_centroid: x [n, d] and centroids [k, d] required, got "
                         f"{tuple(x.shape)} and {tuple(centroids.shape)}")
    if method == "faiss":
        if x.shape[0] == 0:
            return (torch.empty(0, dtype=torch.int64, device=x.device),
                    torch.empty(0, device=x.device))
        return _faiss_knn1(x, centroids)
    index = CentroidIndex(centroids, batch_size=batch_size,
                          method="torch" if method == "brute" else method)
    return index.brute_force(x)


@dataclass
class KMeansResult:
    """Output of :func:`kmeans` (identical on every rank except ``assignment``)."""

    centroids: torch.Tensor  # [k, d] float32
    assignment: torch.Tensor  # [n_local] int64: nearest final centroid of each local sample
    inertia: float  # global weighted sum of squared distances to the final centroids
    # inertia_history[i]: global inertia of the centroids after i Lloyd updates (i = 0: the
    # initial centroids); inertia == inertia_history[-1], len == iters_run + 1.
    inertia_history: List[float] = field(default_factory=list)
    reseeded: int = 0  # empty clusters re-seeded (summed over iterations)
    iters_run: int = 0  # Lloyd updates performed


def _init_pool(x: torch.Tensor, w: torch.Tensor, key: int, pool_size: int,
               collective: Collective) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The replicated init pool: the ``pool_size`` samples of smallest seeded hash of their
    global index (all samples if there are fewer), in global order. Independent of world size."""
    n = x.shape[0]
    sizes = collective.all_gather_cat(torch.tensor([n], dtype=torch.int64, device=x.device))
    total = int(sizes.sum())
    if total == 0:
        raise ValueError("kmeans: no samples on any rank")
    if total <= pool_size:
        pool = collective.all_gather_cat(torch.cat([x, w[:, None]], 1))
        return pool[:, :-1].contiguous(), pool[:, -1].contiguous(), total
    offset = int(sizes[: collective.rank].sum())
    gidx = torch.arange(offset, offset + n, device=x.device)
    h = hash_ids(gidx, key, (1 << 63) - 1)
    if n > pool_size:
        h, keep = torch.topk(h, pool_size, largest=False, sorted=False)
    else:
        keep = torch.arange(n, device=x.device)
    payload = torch.cat([x[keep], w[keep, None]], 1)
    h_all = collective.all_gather_cat(h)
    payload_all = collective.all_gather_cat(payload)
    gidx_all = collective.all_gather_cat(gidx[keep])
    sel = torch.topk(h_all, pool_size, largest=False, sorted=False).indices
    sel = sel[torch.argsort(gidx_all[sel])]  # global (rank-concatenation) order
    pool = payload_all[sel]
    return pool[:, :-1].contiguous(), pool[:, -1].contiguous(), total


def _kmeans_plus_plus(pool: torch.Tensor, w: torch.Tensor, k: int,
                      g: torch.Generator) -> torch.Tensor:
    """Seeded weighted D^2 sampling on the replicated pool.

    Sampling is by inverse CDF (cumsum + searchsorted), so it never divides by zero: once
    every pool point coincides with a chosen centre the total mass is 0 and the last pool point
    is taken again (duplicate centroids, as k > distinct points requires).
    """
    p = pool.shape[0]
    sq = (pool * pool).sum(1)
    pool_cm = pool.t().contiguous().t()  # column-major: a much faster gemv here
    u = torch.rand(k, generator=g, dtype=torch.float64).to(torch.float32)
    weighted = bool((w != 1).any())
    chosen = torch.empty(k, dtype=torch.int64)
    mass = w.clone()
    d2 = torch.empty(p)
    new = torch.empty(p)
    cdf = torch.empty(p)
    for t in range(k):
        torch.cumsum(mass, 0, out=cdf)
        i = torch.searchsorted(cdf, cdf[-1:] * u[t], right=True).clamp_(max=p - 1)
        chosen[t] = i[0]
        torch.addmv(sq, pool_cm, pool[i[0]], alpha=-2.0, out=new)
        new.add_(sq[i]).clamp_(min=0)
        if t == 0:
            d2.copy_(new)
        else:
            torch.minimum(d2, new, out=d2)
        if weighted:
            torch.mul(d2, w, out=mass)
        else:
            mass = d2
    return pool[chosen.to(pool.device)].clone()


def _pool_nearest_d2(centres: torch.Tensor, pool: torch.Tensor,
                     coll: Optional[Collective] = None) -> torch.Tensor:
    """Squared distance ``[p]`` (float32) of every point of the replicated ``pool`` to its
    nearest of ``centres``. With several ranks each computes a contiguous slice of the pool
    and one all-gather assembles it: the same values as one rank computing every point (a
    point's answer does not depend on the others), in ``1 / world`` of the time."""
    if coll is None or coll.world_size == 1:
        return CentroidIndex(centres).brute_force(pool)[1]
    p = pool.shape[0]
    per = -(-p // coll.world_size)
    lo, hi = min(p, coll.rank * per), min(p, (coll.rank + 1) * per)
    mine = (CentroidIndex(centres).brute_force(pool[lo:hi])[1] if hi > lo
            else torch.empty(0, dtype=torch.float32, device=pool.device))
    return coll.all_gather_cat(mine)


def _kmeans_parallel(pool: torch.Tensor, w: torch.Tensor, k: int, g: torch.Generator,
                     growth: float = KMEANS_PARALLEL_GROWTH,
                     coll: Optional[Collective] = None) -> torch.Tensor:
    """k-means|| seeding (Bahmani et al. 2012) in ``O(log k)`` rounds on the replicated pool.

    Round ``r`` draws ``m_r`` new centres *at once*, without replacement, with probability
    proportional to ``weight * D^2`` (distance to the centres of the earlier rounds; the first
    round: weight alone), then updates ``D^2`` with one exact nearest-centroid pass of the pool
    over the ``m_r`` new centres (:class:`CentroidIndex`). Round sizes grow geometrically
    (each round draws ``max(1, floor(drawn * (growth - 1)))``: ``1, 1, 2, 4, ...`` for
    ``growth = 2``) until exactly ``k`` are drawn, so there is no reduction step and the total distance work is one
    pool-sized pass over ``k`` centres, against ``k`` passes for :func:`_kmeans_plus_plus`.
    ``growth -> 1`` approaches k-means++ (one centre per round).

    Sampling without replacement uses exponential keys (the ``m`` smallest ``E / mass``,
    ``E ~ Exp(1)`` from ``g``). When fewer than ``m`` pool points have positive mass (every
    point coincides with a centre: ``k`` exceeds the distinct points), the rest of the ``k``
    centres repeat the drawn ones cyclically (duplicate centroids, never NaN). ``coll``
    splits each round's distance pass over the ranks (:func:`_pool_nearest_d2`); the draws
    stay replicated, so every rank picks the same centres.
    """
    p = pool.shape[0]
    chosen: List[torch.Tensor] = []
    drawn = 0
    d2 = torch.full((p,), float("inf"), dtype=torch.float64)
    mass = w.double().cpu().clone()
    while drawn < k:
        m = min(k - drawn, max(1, int(drawn * (growth - 1.0))))
        keys = torch.empty(p, dtype=torch.float64).exponential_(generator=g).div_(mass)
        positive = int((mass > 0).sum())
        if positive == 0:
            break
        m = min(m, positive)
        pick = torch.topk(keys, m, largest=False, sorted=True).indices
        chosen.append(pick)
        drawn += m
        if drawn >= k:
            break
        new = _pool_nearest_d2(pool[pick.to(pool.device)], pool, coll)
        torch.minimum(d2, new.double().cpu(), out=d2)
        d2[pick] = 0.0  # a centre's own distance, exactly
        torch.mul(d2, w.double().cpu(), out=mass)
    idx = torch.cat(chosen)
    if idx.numel() < k:  # k exceeds the points of positive mass: repeat the drawn centres
        idx = idx.repeat(-(-k // idx.numel()))[:k]
    return pool[idx.to(pool.device)].clone()


def _random_init(pool: torch.Tensor, w: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k pool points drawn with probability proportional to weight (without replacement when
    enough points have positive weight)."""
    positive = int((w > 0).sum())
    pick = torch.multinomial(w.double().cpu(), k, replacement=positive < k, generator=g)
    return pool[pick.to(pool.device)].clone()


def _reseed(centroids: torch.Tensor, empty: torch.Tensor, pool: torch.Tensor,
            pool_w: torch.Tensor, coll: Optional[Collective] = None) -> int:
    """Move the empty clusters onto the pool points farthest from the non-empty centroids.

    Deterministic (depends only on replicated tensors; ``coll`` splits the distance pass over
    the ranks, :func:`_pool_nearest_d2`). With fewer pool points than empty clusters the
    farthest points are reused cyclically. Returns the number re-seeded.
    """
    slots = torch.nonzero(empty).squeeze(1)
    m = int(slots.numel())
    live = centroids[~empty]
    if live.shape[0] == 0:
        far = torch.arange(pool.shape[0], device=pool.device)
    else:
        d2 = _pool_nearest_d2(live, pool, coll)
        d2 = torch.where(pool_w > 0, d2, torch.full_like(d2, -1.0))
        far = torch.topk(d2, min(m, pool.shape[0]), largest=True, sorted=True).indices
    reps = (m + far.numel() - 1) // far.numel()
    centroids[slots] = pool[far.repeat(reps)[:m]]
    return m


def _local_stats(xs: torch.Tensor, assign: torch.Tensor, dist2: torch.Tensor,
                 w: Optional[torch.Tensor], prev: Optional[torch.Tensor], k: int) -> torch.Tensor:
    """This rank's contribution to the one all-reduce of a Lloyd step, float64:
    ``[sums (k*d), counts (k), inertia, changed assignments]`` (weighted if ``w``)."""
    n, d = xs.shape

    def part(lo: int, hi: int) -> torch.Tensor:
        out = torch.zeros(k * d + k + 2, dtype=torch.float64, device=xs.device)
        sums, counts = out[: k * d].view(k, d), out[k * d: k * d + k]
        changed = 0
        for a0 in range(lo, hi, _STATS_BLOCK):  # float64 copies of one block at a time
            a1 = min(hi, a0 + _STATS_BLOCK)
            a, x64 = assign[a0:a1], xs[a0:a1].double()
            if w is not None:
                w64 = w[a0:a1].double()
                x64.mul_(w64[:, None])
                counts.add_(torch.bincount(a, weights=w64, minlength=k))
                out[-2] += (dist2[a0:a1].double() * w64).sum()
            else:
                counts.add_(torch.bincount(a, minlength=k))
                out[-2] += dist2[a0:a1].sum(dtype=torch.float64)
            sums.index_add_(0, a, x64)
            changed += (a1 - a0) if prev is None else int((a != prev[a0:a1]).sum())
        out[-1] = changed
        return out

    parts = _parallel([functools.partial(part, lo, hi) for lo, hi in _split(n, _workers(), 1 << 16)])
    if not parts:
        return torch.zeros(k * d + k + 2, dtype=torch.float64, device=xs.device)
    return torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]


@torch.no_grad()
@_in_worker_threads
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0,
           weights: Optional[torch.Tensor] = None, collective: Optional[Collective] = None,
           init: Union[str, torch.Tensor] = "auto", tol: float = 1e-4, *, pool_size: Optional[int] = None,
           batch_size: Optional[int] = None, method: str = "auto",
           final_pass: bool = True) -> KMeansResult:
    """Lloyd's k-means of this rank's samples ``x [n, d]`` together with every other rank's.

    Every rank must call it (with the same ``k``, ``iters``, ``seed``, ``init``, ``tol``,
    ``pool_size``); see the module docstring for the all-reduce contract. The result equals a
    single-process run on the concatenation of all ranks' ``x`` in rank order (float tolerance).

    Args:
        k: number of centroids; may exceed the number of (distinct) points: duplicate
            centroids, never NaN.
        iters: maximum Lloyd updates. Stops earlier when no assignment changed or when the
            relative inertia gain of an update is ``<= tol`` (``tol <= 0``: only the former).
        seed: any int; initialisation is a deterministic function of (seed, concatenated data).
        weights: optional per-sample frequency weights ``[n]`` (>= 0); integer weights equal
            repeating the samples.
        collective: the cross-rank hook (default: :func:`default_collective`).
        init: ``"kmeans++"`` (weighted D^2 sampling, one centre per pool pass: O(k) passes),
            ``"kmeans||"`` (D^2 sampling of growing batches of centres: O(log k) passes, see
            :func:`_kmeans_parallel`), ``"auto"`` (k-means++ for ``k <=``
            :data:`AUTO_KMEANSPP_MAX_K`, else k-means||) or ``"random"`` (weighted draw), all on
            the replicated init pool, or a ``[k, d]`` tensor of initial centroids (warm start;
            rank 0's is used on every rank).
        pool_size: size of the init pool (default ``min(total, max(4096, 8 k))``); also the
            candidates for re-seeding empty clusters.
        batch_size: rows per brute-force distance batch (default: ~1M distances per batch).
        method: nearest-centroid search, ``"auto"`` (compiled kernel when available),
            ``"native"`` or ``"torch"`` (``"brute"``: alias); all give the same assignments.
        final_pass: after the last update, assign the samples to the final centroids once more
            (``assignment`` and ``inertia`` then describe them). ``False`` skips that pass when
            only the centroids are wanted (re-clustering): the same centroids, one pass fewer;
            ``assignment``/``inertia`` are then those of the centroids before the last update
            (an upper bound of the final inertia), and ``iters_run`` counts the updates.

    Threads: torch ops run single-threaded on ``torch.get_num_threads()`` Python worker
    threads; the global torch thread count is 1 during the call and restored after it.
    """
    if k <= 0:
        raise ValueError(f"kmeans: k must be positive, got {k}")
    if x.dim() != 2:
        raise ValueError(f"kmeans: x must be [n, d], got shape {tuple(x.shape)}")
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (k, x.shape[1]):
            raise ValueError(f"kmeans: initial centroids must be [{k}, {x.shape[1]}], got "
                             f"{tuple(init.shape)}")
    elif init not in INITS:
        raise ValueError(f"kmeans: init must be one of {INITS} or a [k, d] tensor, got {init!r}")
    if method not in ("auto", "grouped", "native", "torch", "brute"):
        raise ValueError("kmeans: method must be 'auto', 'grouped', 'native', 'torch' or "
                         f"'brute', got {method!r}")
    coll = collective if collective is not None else default_collective()
    x = x.detach().to(torch.float32)  # may be a strided view: centring below makes the copy
    n, d = x.shape
    if weights is None:
        w = torch.ones(n, device=x.device)
    else:
        w = weights.detach().to(device=x.device, dtype=torch.float32).reshape(-1)
        if w.shape[0] != n:
            raise ValueError(f"kmeans: weights must have {n} entries, got {w.shape[0]}")
        if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError("kmeans: weights must be finite and >= 0")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("kmeans: x contains NaN or inf")

    # ---- initialisation (replicated) ----
    pool_cap = int(pool_size) if pool_size is not None else max(4096, 8 * k)
    pool, pool_w, _ = _init_pool(x, w, derive_seed(seed, "kmeans", 0, "pool"), max(1, pool_cap), coll)
    if float(pool_w.sum()) <= 0:
        if float(coll.all_reduce_sum(w.sum(dtype=torch.float64).reshape(1))) <= 0:
            raise ValueError("kmeans: all weights are zero")
        pool_w = torch.ones_like(pool_w)  # positive mass exists outside the pool only
    # Centre the data on the pool mean (replicated): better conditioned expanded distances.
    shift = (pool * pool_w[:, None]).sum(0) / pool_w.sum()
    if coll.world_size > 1:  # reductions may differ with thread counts: use rank 0's bits
        shift = coll.all_reduce_sum(shift * float(coll.rank == 0))
    x = x - shift
    pool = pool - shift
    if isinstance(init, torch.Tensor):
        centroids = init.detach().to(device=x.device, dtype=torch.float32) - shift
    else:
        if init == "auto":
            init = "kmeans++" if k <= AUTO_KMEANSPP_MAX_K else "kmeans||"
        gen = torch.Generator().manual_seed(derive_seed(seed, "kmeans", 0, init))
        if init == "kmeans++":
            centroids = _kmeans_plus_plus(pool, pool_w, k, gen)
        elif init == "kmeans||":
            centroids = _kmeans_parallel(pool, pool_w, k, gen, coll=coll)
        else:
            centroids = _random_init(pool, pool_w, k, gen)
    if coll.world_size > 1:  # computed identically everywhere; make it bit-identical
        centroids = coll.all_reduce_sum(centroids * float(coll.rank == 0))

    # ---- Lloyd ----
    weighted = weights is not None
    history: List[float] = []
    reseeded = 0
    iters_run = 0
    prev: Optional[torch.Tensor] = None  # the last assignment
    search = "torch" if method == "brute" else method
    while True:
        assign, dist2 = CentroidIndex(centroids, batch_size=batch_size,
                                      method=search).brute_force(x)
        packed = _local_stats(x, assign, dist2, w if weighted else None, prev, k)
        packed = coll.all_reduce_sum(packed)
        history.append(float(packed[k * d + k]))
        if iters_run >= iters or (prev is not None and float(packed[-1]) == 0):
            break
        if tol > 0 and len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:
            break
        sums = packed[: k * d].view(k, d)
        counts = packed[k * d: k * d + k]
        empty = counts <= 0
        new = (sums / counts.clamp(min=1e-300)[:, None]).to(torch.float32)
        centroids = torch.where(empty[:, None], centroids, new)
        if bool(empty.any()):
            reseeded += _reseed(centroids, empty, pool, pool_w, coll)
            if coll.world_size > 1:
                centroids = coll.all_reduce_sum(centroids * float(coll.rank == 0))
        prev = assign
        iters_run += 1
        if not final_pass and iters_run >= iters:
            break  # the centroids are final; their assignment pass is skipped

    return KMeansResult(centroids=centroids + shift, assignment=assign, inertia=history[-1],
                        inertia_history=history, reseeded=reseeded, iters_run=iters_run)
