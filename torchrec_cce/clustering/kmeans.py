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

Speed
-----
:func:`nearest_centroid` is a batched ``addmm`` (``||x||^2 - 2 x.c + ||c||^2``, at most
``batch_size x k`` distances at once) followed by a two-stage argmin (a vectorised min over a
``[b, k / W, W]`` view, then an argmin over ``W``). Inside :func:`kmeans` a
:class:`CentroidIndex` first tries an *exact* pruned search: each sample is scored only
against the ``neighbors`` centroids nearest to its previous cluster (one grouped matmul; the
samples are kept sorted by cluster for it), and the answer is accepted only where the triangle
inequality proves that no other centroid is closer; the rest takes a few more steps, longer
neighbour lists, or the brute force. The assignment is that of the brute force (up to float
rounding in near-ties). Where the triangle inequality cannot prune (high intrinsic dimension,
found by a small probe) the brute force is used directly. Ops run single-threaded on
``torch.get_num_threads()`` Python worker threads (see :func:`_worker_threads`).
"""

import bisect
import contextlib
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from torchrec_cce.hashing import derive_seed, hash_ids

# Brute force: rows per batch are chosen so that one batch holds about this many distances
# (4 MiB of float32: stays in cache; the brief's hard bound is ~16M floats).
_TARGET_BATCH_ELEMENTS = 1 << 20
_MAX_BATCH_ELEMENTS = 1 << 24
# Two-stage argmin: min over "rows" of a [b, k / W, W] view (vectorised), then argmin over W.
_ARGMIN_WIDTH = 128
_F32_EPS = 1.2e-7
# Pruned search: points (sorted by guess) scored per chunk, so temporaries stay small.
_SEARCH_CHUNK = 1 << 15
# Neighbour lists are reused (radii recomputed exactly) for this many Lloyd steps.
_LIST_MAX_AGE = 2
# Lloyd keeps its samples sorted by cluster; re-sorted once this fraction sits in a stale block.
_RESORT_FRACTION = 0.1
# A search without guesses gives up on the lists if its first step proves less than this.
_MIN_PROVEN_COLD = 0.02
# Sample size of the probe that decides whether the lists can prune at all.
_PROBE = 4096


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


_GROUPED_MM_OK: Optional[bool] = None


def _grouped_mm_ok(like: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` works here (CPU support is recent)."""
    global _GROUPED_MM_OK
    if like.device.type != "cpu":
        return False
    if _GROUPED_MM_OK is None:
        try:
            out = torch._grouped_mm(torch.ones(3, 4), torch.ones(2, 4, 4),
                                    offs=torch.tensor([1, 3], dtype=torch.int32))
            _GROUPED_MM_OK = bool(torch.all(out == 4))
        except Exception:  # older torch: the bmm path in search() is used instead
            _GROUPED_MM_OK = False
    return _GROUPED_MM_OK


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


def _split(n: int, parts: int, minimum: int = 4096) -> List[Tuple[int, int]]:
    """``[lo, hi)`` ranges covering ``range(n)``: ``parts`` of them, each >= ``minimum``."""
    parts = max(1, min(parts, n // max(1, minimum)))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i + 1] > bounds[i]]


def _workers() -> int:
    return getattr(_LOCAL, "workers", None) or torch.get_num_threads()


def _workspace(ws: Dict[str, torch.Tensor], name: str, numel: int, like: torch.Tensor
               ) -> torch.Tensor:
    """A flat float32 buffer of at least ``numel`` elements, reused across calls."""
    buf = ws.get(name)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, int(1.25 * numel)), dtype=torch.float32, device=like.device)
        ws[name] = buf
    return buf[:numel]


class CentroidIndex:
    """Exact nearest-centroid search over a fixed set of centroids ``[k, d]``.

    :meth:`brute_force` is a batched ``addmm`` (at most ``batch_size x k`` distances at once).

    :meth:`search` first uses k-nearest-neighbour lists of the centroids (``neighbors`` and, for
    what that cannot settle, ``8 * neighbors`` entries): a point with guess ``a`` (e.g. its
    previous cluster) is scored against the list of ``a`` only, all points at once in one
    batched matmul. With ``u = |x - c_a|`` and ``b`` the best distance in the list, the nearest
    centroid lies within ``u + b`` of ``c_a``; when ``u + b`` is below the distance from ``c_a``
    to the nearest centroid *not* in the list, the answer is proven exact (with a float-error
    margin). Unproven points move to their best candidate and try again; what remains goes to
    the brute force. Build once, search many batches: the lists cost about a brute-force pass
    over ``k`` points.
    """

    def __init__(self, centroids: torch.Tensor, batch_size: Optional[int] = None,
                 neighbors: int = 32, previous: Optional["CentroidIndex"] = None) -> None:
        c = centroids.detach().to(torch.float32).contiguous()
        if c.dim() != 2 or c.shape[0] == 0:
            raise ValueError(f"CentroidIndex: centroids must be [k, d] with k >= 1, got {tuple(c.shape)}")
        self.centroids = c
        self.k, self.d = c.shape
        self.sq = (c * c).sum(1)
        self.sq_max = float(self.sq.max())
        k = self.k
        self.batch_size = batch_size
        # two-stage argmin width: a power of two, about k / 4 for small k, at most 128
        self._w = min(_ARGMIN_WIDTH, 1 << max(0, (k // 4).bit_length() - 1))
        self._two_stage = self._w >= 16
        kp = _round_up(k, self._w) if self._two_stage else k
        self._kp = kp
        self._ct = torch.zeros(self.d, kp, device=c.device)
        self._ct[:, :k] = c.t()
        self._bias = torch.full((kp,), float("inf"), device=c.device)
        self._bias[:k] = self.sq
        self.neighbors = max(4, min(int(neighbors), k))
        self._graphs: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._lists: Dict[int, torch.Tensor] = {}
        self._ages: Dict[int, int] = {}
        self._previous = previous
        if previous is not None:  # keep only its lists: no chain of earlier indexes
            previous._previous = None
        self.kdim = _round_up(self.d + 1, 4)  # width of augmented points [x, 1, 0...]
        if self.neighbors < k:
            self.neighbors = _round_up(self.neighbors, 4)

    # ---- brute force ------------------------------------------------------------------------
    def _rows_per_batch(self, n: int) -> int:
        if self.batch_size is not None:
            b = int(self.batch_size)
        else:
            b = _TARGET_BATCH_ELEMENTS // self._kp
        b = min(b, _MAX_BATCH_ELEMENTS // self._kp)
        return max(1, min(b, max(n, 1)))

    @_in_worker_threads
    def brute_force(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(index int64 [n], squared distance [n]) by exhaustive batched matmul."""
        x = x.to(torch.float32)
        n = x.shape[0]
        idx = torch.empty(n, dtype=torch.int64, device=x.device)
        best = torch.empty(n, dtype=torch.float32, device=x.device)
        if n == 0:
            return idx, best
        b = self._rows_per_batch(n)
        _parallel([functools.partial(self._brute_rows, x, lo, hi, b, idx, best)
                   for lo, hi in _split(n, _workers(), minimum=max(b, 256))])
        return idx, best

    def _brute_rows(self, x: torch.Tensor, start: int, stop: int, b: int, idx: torch.Tensor,
                    best: torch.Tensor) -> None:
        kp, W = self._kp, self._w
        buf = torch.empty(b * kp, device=x.device)
        for lo in range(start, stop, b):
            xb = x[lo: min(stop, lo + b)]
            m = xb.shape[0]
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
            idx[lo: lo + m] = arg
            best[lo: lo + m] = val.add_((xb * xb).sum(1)).clamp_(min=0)

    # ---- pruned search ----------------------------------------------------------------------
    def _err(self, sq_norm: torch.Tensor) -> torch.Tensor:
        """Generous bound on the float32 error of an expanded squared distance."""
        return (sq_norm + self.sq_max) * ((self.d + 16) * _F32_EPS)

    def _graph(self, L: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(neighbour lists [k, L] with the centroid itself first, squared distance to the
        nearest centroid outside the list minus an error margin [k], scoring weights
        [k, kdim, L] = ``[-2 c; |c|^2; 0]`` of each list's centroids).

        With ``previous`` (an index of the same k, e.g. the last Lloyd step's) its lists are
        reused and only the radii are recomputed exactly: any list is correct with its exact
        radius, and an exact top-k is retaken every few steps, as lists go stale while the
        centroids move. Either way one pass over the ``k x k`` centroid distances.
        """
        if L not in self._graphs:
            c, k = self.centroids, self.k
            prev = self._previous
            old = prev._lists.get(L) if prev is not None and prev.k == k else None
            reuse = old is not None and prev._ages[L] < _LIST_MAX_AGE
            nbr = old if reuse else torch.empty(k, L, dtype=torch.int64, device=c.device)
            r2 = torch.empty(k, device=c.device)
            rows = max(1, _TARGET_BATCH_ELEMENTS // k)
            ct = c.t()

            def block(start: int, stop: int) -> None:  # writes rows [start, stop) only
                for lo in range(start, stop, rows):
                    cb = c[lo: min(stop, lo + rows)]
                    m = cb.shape[0]
                    d2 = torch.addmm(self.sq, cb, ct, alpha=-2.0).add_(self.sq[lo: lo + m, None])
                    margin = self._err(self.sq[lo: lo + m])
                    if reuse:
                        d2.scatter_(1, nbr[lo: lo + m], float("inf"))
                        r2[lo: lo + m] = torch.amin(d2, dim=1) * (1 - 1e-6) - margin
                    else:
                        ar = torch.arange(m, device=c.device)
                        d2[ar, ar + lo] = -1.0  # the centroid itself comes first
                        vals, ids = torch.topk(d2, L + 1, dim=1, largest=False, sorted=True)
                        nbr[lo: lo + m] = ids[:, :L]
                        # the nearest centroid left out, measured directly and pessimised
                        direct = ((cb - c[ids[:, L]]) ** 2).sum(1)
                        r2[lo: lo + m] = torch.minimum(vals[:, L], direct) - margin

            _parallel([functools.partial(block, lo, hi)
                       for lo, hi in _split(k, _workers(), minimum=rows)])
            aug = torch.zeros(k, self.kdim, device=c.device)  # 16-byte rows for grouped_mm
            aug[:, : self.d] = -2.0 * c
            aug[:, self.d] = self.sq
            self._lists[L] = nbr
            self._ages[L] = prev._ages[L] + 1 if reuse else 0
            self._graphs[L] = (nbr, r2, aug[nbr].transpose(1, 2).contiguous())
        return self._graphs[L]

    def _score_chunk(self, x: torch.Tensor, src: torch.Tensor, gs: torch.Tensor, tile: int,
                     graph: Tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     ws: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Score points ``src`` (sorted by guess ``gs``) against their guess' list.

        Points are packed into tiles of ``tile`` rows sharing one guess, so one ``bmm``
        ``[T, tile, d + 1] @ [T, d + 1, L]`` scores every point; an argmin is only taken for
        the points whose best candidate is not the guess itself (candidate 0).
        Returns (best candidate, its squared distance, proven exact). ``ws`` keeps the large
        temporaries between chunks (fresh multi-MB allocations page-fault on every chunk).
        """
        nbr, r2, wg = graph
        _, kdim, L = wg.shape
        d, m, dev = self.d, src.numel(), x.device
        g0 = int(gs[0])
        span = int(gs[-1]) - g0 + 1
        loc = gs - g0
        cnt = torch.bincount(loc, minlength=span)
        start = torch.cumsum(cnt, 0).sub_(cnt)
        tiles_per = cnt.add(tile - 1).div_(tile, rounding_mode="floor")
        tile_start = torch.cumsum(tiles_per, 0).sub_(tiles_per)
        row = tile_start.index_select(0, loc).mul_(tile).add_(
            torch.arange(m, device=dev).sub_(start.index_select(0, loc)))
        n_tiles = int(tiles_per.sum())
        xs = x.index_select(0, src)
        buf = _workspace(ws, "tiles", n_tiles * tile * kdim, x).view(n_tiles * tile, kdim)
        buf.zero_()
        buf[:, d] = 1.0
        buf[:, :d].index_copy_(0, row, xs)
        tile_c = torch.repeat_interleave(torch.arange(g0, g0 + span, device=dev), tiles_per,
                                         output_size=n_tiles)
        scores = _workspace(ws, "scores", n_tiles * tile * L, x).view(n_tiles, tile, L)
        torch.bmm(buf.view(n_tiles, tile, kdim), wg.index_select(0, tile_c), out=scores)
        scores = scores.view(n_tiles * tile, L)  # ||c||^2 - 2 x.c; candidate 0 is the guess
        vmin = torch.amin(scores, dim=1).index_select(0, row)
        vself = scores[:, 0].index_select(0, row)
        new_g = gs.clone()
        better = torch.nonzero(vmin < vself).squeeze(1)
        if better.numel():
            j = scores.index_select(0, row.index_select(0, better)).argmin(dim=1)
            new_g.index_copy_(0, better, nbr.view(-1).index_select(
                0, gs.index_select(0, better).mul_(L).add_(j)))
        xn = (xs * xs).sum(1)
        e = self._err(xn)
        b2 = vmin.add_(xn).clamp_(min=0)
        # the nearest centroid lies within |x - c_g| + |x - best| of c_g
        reach = vself.add_(xn).clamp_(min=0).add_(e).sqrt_().add_((b2 + e).sqrt_()).square_()
        return new_g, b2, reach < r2.index_select(0, gs)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """``[x, 1, 0, ...]`` rows of width :attr:`kdim` (the input of :meth:`search_sorted`)."""
        xa = x.new_zeros(x.shape[0], self.kdim)
        xa[:, : self.d] = x
        xa[:, self.d] = 1.0
        return xa

    @_in_worker_threads
    def search_sorted(self, xa: torch.Tensor, guess: torch.Tensor, xn: torch.Tensor,
                      min_proven: float = 0.2, probe: bool = True
                      ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """:meth:`search` for points already sorted by ``guess`` (non-decreasing), given as
        augmented rows ``xa`` (:meth:`augment`) with squared norms ``xn``.

        The points need no gather or tile packing: one grouped matmul scores every point against
        its guess' list (Lloyd iterations keep their samples sorted by cluster for this). Falls
        back to :meth:`search` where ``torch._grouped_mm`` is unavailable.
        """
        n, d = xa.shape[0], self.d
        if not self.can_prune(n) or not _grouped_mm_ok(xa):
            return self.search(xa[:, :d], guess, min_proven)
        if probe and self._probe_fails(xa[:, :d], guess, min_proven):
            idx, best = self.brute_force(xa[:, :d])
            return idx, best, n
        nbr, r2, wg = self._graph(self.neighbors)
        L = wg.shape[2]
        offs = torch.bincount(guess, minlength=self.k).cumsum_(0).to(torch.int32)
        best = torch.empty(n, dtype=torch.float32, device=xa.device)
        vself = torch.empty(n, dtype=torch.float32, device=xa.device)
        idx = guess.clone()
        ends = offs.tolist()
        rows = max(1, (1 << 20) // L)  # rows per grouped matmul: bounded temporaries
        ranges = []  # (first group, end group, first row, end row): whole groups only
        g, lo = 0, 0
        while g < self.k:
            ge = min(self.k, bisect.bisect_left(ends, lo + rows, g) + 1)
            if ends[ge - 1] > lo:
                ranges.append((g, ge, lo, ends[ge - 1]))
            g, lo = ge, ends[ge - 1]

        def score(g: int, ge: int, lo: int, hi: int) -> None:  # writes disjoint rows only
            sc = torch._grouped_mm(xa[lo:hi], wg[g:ge], offs=offs[g:ge] - lo)  # [rows, L]
            torch.amin(sc, dim=1, out=best[lo:hi])
            vself[lo:hi] = sc[:, 0]
            better = torch.nonzero(best[lo:hi] < vself[lo:hi]).squeeze(1)
            if better.numel():
                j = sc.index_select(0, better).argmin(dim=1)
                gb = guess[lo:hi].index_select(0, better)
                idx[lo:hi].index_copy_(0, better, nbr.view(-1).index_select(0, gb.mul_(L).add_(j)))

        _parallel([functools.partial(score, *r) for r in ranges])
        e = self._err(xn)
        best.add_(xn).clamp_(min=0)
        reach = vself.add_(xn).clamp_(min=0).add_(e).sqrt_().add_((best + e).sqrt_()).square_()
        unproven = torch.nonzero(reach >= r2.index_select(0, guess)).squeeze(1)
        n_brute = 0
        if unproven.numel() > (1 - min_proven) * n:  # the lists prove too little here
            ui, ub = self.brute_force(xa.index_select(0, unproven)[:, :d])
            n_brute = unproven.numel()
            idx.index_copy_(0, unproven, ui)
            best.index_copy_(0, unproven, ub)
        elif unproven.numel():
            moved = idx.index_select(0, unproven) != guess.index_select(0, unproven)
            long_list = 8 * self.neighbors
            for part, first in ((unproven[moved], None), (unproven[~moved], long_list)):
                if part.numel() == 0:
                    continue
                xp = xa.index_select(0, part)[:, :d]
                if first is not None and (self.k < 4 * long_list or part.numel() <= 16 * self.k):
                    ui, ub = self.brute_force(xp)  # few: cheaper than building longer lists
                    n_brute += part.numel()
                else:  # moved: continue from the best candidate; stuck: try longer lists
                    ui, ub, nb = self.search(xp, idx.index_select(0, part), min_proven=0.0,
                                             first_list=first)
                    n_brute += nb
                idx.index_copy_(0, part, ui)
                best.index_copy_(0, part, ub)
        return idx, best, n_brute

    def _probe_fails(self, x: torch.Tensor, guess: Optional[torch.Tensor], min_proven: float
                     ) -> bool:
        """Search an evenly strided sample of ``_PROBE`` points first: if the lists prove less
        than ``min_proven`` of it (high intrinsic dimension), skip them for the whole input."""
        n = x.shape[0]
        if min_proven <= 0 or n < 8 * _PROBE:
            return False
        pick = torch.arange(0, n, n // _PROBE, device=x.device)[:_PROBE]
        _, _, n_brute = self.search(x.index_select(0, pick),
                                    None if guess is None else guess.index_select(0, pick),
                                    min_proven=0.0)
        return n_brute > (1 - min_proven) * pick.numel()

    def can_prune(self, n: int) -> bool:
        """Whether :meth:`search` will try the neighbour lists (enough centroids and points)."""
        return self.k >= 4 * self.neighbors and n >= 64

    @_in_worker_threads
    def search(self, x: torch.Tensor, guess: Optional[torch.Tensor] = None,
               min_proven: float = 0.2, first_list: Optional[int] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """(index, squared distance, number of points that needed the brute force).

        ``guess`` (int64 [n], optional): a centroid index per point believed to be near it (e.g.
        the previous assignment). Without it the guess is the nearest of ``~sqrt(k)``
        evenly-spaced centroids. If a pass proves fewer than ``min_proven`` of its points (high
        intrinsic dimension: the triangle inequality cannot prune), the rest goes straight to
        the brute force. ``first_list``: list length to start with (default ``neighbors``;
        longer lists are tried for what the first ones cannot prove).
        """
        x = x.to(torch.float32).contiguous()
        n = x.shape[0]
        if not self.can_prune(n) or self._probe_fails(x, guess, min_proven):
            idx, best = self.brute_force(x)
            return idx, best, n
        c, k, L = self.centroids, self.k, self.neighbors
        if guess is None:
            m = min(k, max(16, int(math.sqrt(k))))
            subset = torch.linspace(0, k - 1, m, device=x.device).round().long()
            g = subset[CentroidIndex(c[subset], batch_size=self.batch_size).brute_force(x)[0]]
            plan = [(L, 6)]
        else:
            g = guess.to(device=x.device, dtype=torch.int64).clamp(0, k - 1)
            plan = [(L, 2)]
        long_list = 8 * L if k >= 32 * L else 0  # for what the short lists cannot prove
        if first_list is not None and first_list != L:
            plan, long_list = [(min(first_list, k - 1), 2)], 0
        idx = torch.empty(n, dtype=torch.int64, device=x.device)
        best = torch.empty(n, dtype=torch.float32, device=x.device)
        active: Optional[torch.Tensor] = None  # None = all points
        workspaces: Dict[int, Dict[str, torch.Tensor]] = {}  # per worker thread, this call only
        for level, (length, steps) in enumerate(plan):
            graph = self._graph(length)
            stuck: List[torch.Tensor] = []
            stuck_g: List[torch.Tensor] = []
            for step in range(steps):
                gs, order = torch.sort(g)
                src = order if active is None else active.index_select(0, order)
                m = src.numel()
                tile = 1 << max(3, min(6, int(math.log2(max(1.0, m / k / 4)))))

                def chunk(lo: int, src=src, gs=gs, tile=tile, graph=graph):
                    s, gg = src[lo: lo + _SEARCH_CHUNK], gs[lo: lo + _SEARCH_CHUNK]
                    ws = workspaces.setdefault(threading.get_ident(), {})
                    new_g, b2, proven = self._score_chunk(x, s, gg, tile, graph, ws)
                    done = torch.nonzero(proven).squeeze(1)
                    unproven = ~proven
                    moved = unproven & (new_g != gg)
                    still = unproven & ~moved  # a local optimum of this graph
                    return (s.index_select(0, done), new_g.index_select(0, done),
                            b2.index_select(0, done), s[still], gg[still], s[moved], new_g[moved])

                parts = _parallel([functools.partial(chunk, lo) for lo in range(0, m, _SEARCH_CHUNK)])
                dst = torch.cat([p[0] for p in parts])
                idx.index_copy_(0, dst, torch.cat([p[1] for p in parts]))
                best.index_copy_(0, dst, torch.cat([p[2] for p in parts]))
                stuck += [p[3] for p in parts]
                stuck_g += [p[4] for p in parts]
                active, g = torch.cat([p[5] for p in parts]), torch.cat([p[6] for p in parts])
                if guess is None and step == 0 and dst.numel() < _MIN_PROVEN_COLD * m:
                    break  # high intrinsic dimension: the lists cannot prove anything
                if active.numel() == 0:
                    break
            active = torch.cat([active] + stuck)
            g = torch.cat([g] + stuck_g)
            if active.numel() == 0 or (level == 0 and active.numel() > (1 - min_proven) * n):
                break  # the short lists proved too little: brute-force the rest
            if level == 0 and long_list and active.numel() > 4 * k:
                plan.append((long_list, 2))  # cheaper than the brute force for that many
        if active is not None and active.numel():
            ri, rb = self.brute_force(x.index_select(0, active))
            idx.index_copy_(0, active, ri)
            best.index_copy_(0, active, rb)
            return idx, best, int(active.numel())
        return idx, best, 0


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
@_in_worker_threads
def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, batch_size: Optional[int] = None,
                     *, method: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Index (int64 ``[n]``) and squared L2 distance (``[n]``, >= 0) of each row's nearest centroid.

    Distances are ``||x||^2 - 2 x.c + ||c||^2`` by one ``addmm`` per batch of ``batch_size``
    rows (default: about 1M distances per batch), never an ``n x k`` matrix; ties go to one of
    the tied centroids. ``method``:

    * ``"brute"``: exhaustive batched matmul;
    * ``"pruned"``: the exact graph-pruned :meth:`CentroidIndex.search` (same answers);
    * ``"faiss"``: ``faiss.knn`` (CPU, needs faiss-cpu);
    * ``"auto"`` (default): ``"faiss"`` if the environment sets ``TORCHREC_CCE_KNN=faiss``,
      else ``"pruned"`` when ``n >= 16 k`` (building the graph pays off), else ``"brute"``.

    For many calls with the same centroids build one :class:`CentroidIndex` and call its
    ``search`` (the graph is built once).
    """
    if method not in ("auto", "brute", "pruned", "faiss"):
        raise ValueError("nearest_centroid: method must be 'auto', 'brute', 'pruned' or 'faiss', "
                         f"got {method!r}")
    if x.dim() != 2 or centroids.dim() != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"nearest_centroid: x [n, d] and centroids [k, d] required, got "
                         f"{tuple(x.shape)} and {tuple(centroids.shape)}")
    if method == "auto" and os.environ.get("TORCHREC_CCE_KNN", "torch") == "faiss":
        method = "faiss"
    if method == "faiss":
        if x.shape[0] == 0:
            return (torch.empty(0, dtype=torch.int64, device=x.device),
                    torch.empty(0, device=x.device))
        return _faiss_knn1(x, centroids)
    index = CentroidIndex(centroids, batch_size=batch_size)
    x = x.to(torch.float32)
    if method == "pruned" or (method == "auto" and x.shape[0] >= 16 * index.k):
        idx, best, _ = index.search(x)
        return idx, best
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


def _random_init(pool: torch.Tensor, w: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k pool points drawn with probability proportional to weight (without replacement when
    enough points have positive weight)."""
    positive = int((w > 0).sum())
    pick = torch.multinomial(w.double().cpu(), k, replacement=positive < k, generator=g)
    return pool[pick.to(pool.device)].clone()


def _reseed(centroids: torch.Tensor, empty: torch.Tensor, pool: torch.Tensor,
            pool_w: torch.Tensor) -> int:
    """Move the empty clusters onto the pool points farthest from the non-empty centroids.

    Deterministic (depends only on replicated tensors). With fewer pool points than empty
    clusters the farthest points are reused cyclically. Returns the number re-seeded.
    """
    slots = torch.nonzero(empty).squeeze(1)
    m = int(slots.numel())
    live = centroids[~empty]
    if live.shape[0] == 0:
        far = torch.arange(pool.shape[0], device=pool.device)
    else:
        _, d2 = CentroidIndex(live).brute_force(pool)
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
        a, x64 = assign[lo:hi], xs[lo:hi].double()
        out = torch.zeros(k * d + k + 2, dtype=torch.float64, device=xs.device)
        if w is not None:
            w64 = w[lo:hi].double()
            x64.mul_(w64[:, None])
            out[k * d: k * d + k] = torch.bincount(a, weights=w64, minlength=k)
            out[-2] = (dist2[lo:hi].double() * w64).sum()
        else:
            out[k * d: k * d + k] = torch.bincount(a, minlength=k)
            out[-2] = dist2[lo:hi].sum(dtype=torch.float64)
        out[: k * d].view(k, d).index_add_(0, a, x64)
        out[-1] = (hi - lo) if prev is None else int((a != prev[lo:hi]).sum())
        return out

    parts = _parallel([functools.partial(part, lo, hi) for lo, hi in _split(n, _workers(), 1 << 16)])
    if not parts:
        return torch.zeros(k * d + k + 2, dtype=torch.float64, device=xs.device)
    return torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]


@torch.no_grad()
@_in_worker_threads
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0,
           weights: Optional[torch.Tensor] = None, collective: Optional[Collective] = None,
           init: Union[str, torch.Tensor] = "kmeans++", tol: float = 1e-4, *, pool_size: Optional[int] = None,
           batch_size: Optional[int] = None, method: str = "auto") -> KMeansResult:
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
        init: ``"kmeans++"`` (weighted D^2 sampling) or ``"random"`` (weighted draw), both on
            the replicated init pool, or a ``[k, d]`` tensor of initial centroids (warm start;
            rank 0's is used on every rank).
        pool_size: size of the init pool (default ``min(total, max(4096, 8 k))``); also the
            candidates for re-seeding empty clusters.
        batch_size: rows per brute-force distance batch (default: ~1M distances per batch).
        method: ``"auto"`` (exact graph-pruned search when it pays, see :class:`CentroidIndex`)
            or ``"brute"``; both give the same assignments.

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
    elif init not in ("kmeans++", "random"):
        raise ValueError(f"kmeans: init must be 'kmeans++' or 'random', got {init!r}")
    if method not in ("auto", "brute"):
        raise ValueError(f"kmeans: method must be 'auto' or 'brute', got {method!r}")
    coll = collective if collective is not None else default_collective()
    x = x.detach().to(torch.float32).contiguous()
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
        gen = torch.Generator().manual_seed(derive_seed(seed, "kmeans", 0, init))
        if init == "kmeans++":
            centroids = _kmeans_plus_plus(pool, pool_w, k, gen)
        else:
            centroids = _random_init(pool, pool_w, k, gen)
    if coll.world_size > 1:  # computed identically everywhere; make it bit-identical
        centroids = coll.all_reduce_sum(centroids * float(coll.rank == 0))

    # ---- Lloyd ----
    # The samples are kept sorted by a recent assignment ``blk`` (rows of ``xa``; ``perm`` maps
    # them back), so that the pruned search scores each block's points against that cluster's
    # neighbour list in one grouped matmul (exact whatever the guess; re-sorted when stale).
    weighted = weights is not None
    history: List[float] = []
    reseeded = 0
    iters_run = 0
    index: Optional[CentroidIndex] = None
    xa: Optional[torch.Tensor] = None
    perm = torch.arange(n, device=x.device)
    ws, xn = w, (x * x).sum(1)
    prev: Optional[torch.Tensor] = None  # the last assignment of each row
    blk: Optional[torch.Tensor] = None  # non-decreasing block labels of the rows
    skip, backoff = 0, 1  # passes to brute-force before trying the pruned search again
    while True:
        index = CentroidIndex(centroids, batch_size=batch_size, previous=index)
        if xa is None:
            xa = index.augment(x)
            del x  # xa holds the samples from here on
        xs = xa[:, :d]
        if method == "auto" and skip == 0 and index.can_prune(n):
            if prev is None:
                assign, dist2, n_brute = index.search(xs)
            else:
                assign, dist2, n_brute = index.search_sorted(xa, blk, xn, probe=backoff > 1)
            if n_brute > 0.5 * n:  # pruning does not pay on this data (yet): back off
                skip, backoff = backoff, 2 * backoff
            else:
                backoff = 1
        else:
            skip = max(0, skip - 1)
            assign, dist2 = index.brute_force(xs)
        packed = _local_stats(xs, assign, dist2, ws if weighted else None, prev, k)
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
            reseeded += _reseed(centroids, empty, pool, pool_w)
            if coll.world_size > 1:
                centroids = coll.all_reduce_sum(centroids * float(coll.rank == 0))
        if blk is None or int((assign != blk).sum()) > _RESORT_FRACTION * n:
            # re-sort the rows by their cluster (stable: mostly already in place)
            blk, order = torch.sort(assign, stable=True)
            xa, perm, xn = (xa.index_select(0, order), perm.index_select(0, order),
                            xn.index_select(0, order))
            if weighted:
                ws = ws.index_select(0, order)
            assign = blk
        prev = assign
        iters_run += 1

    assignment = torch.empty_like(assign)
    assignment[perm] = assign
    return KMeansResult(centroids=centroids + shift, assignment=assignment, inertia=history[-1],
                        inertia_history=history, reseeded=reseeded, iters_run=iters_run)
