"""Lloyd's k-means in which every cross-rank exchange goes through one small hook.

The all-reduce contract
-----------------------
Each rank calls :func:`kmeans` with *its own* samples. All communication goes through a
:class:`Collective`:

* once, at initialisation: ``all_gather_cat`` of the sample counts and of a bounded,
  seeded *init pool* (which samples join it depends only on their global index, i.e. on the
  concatenation of all ranks' samples in rank order, never on the world size), plus one
  ``all_reduce_sum`` that makes rank 0's initial centroids everybody's;
* per Lloyd iteration exactly one ``all_reduce_sum`` of one float64 vector holding the
  per-centroid sums, the per-centroid counts (weights), the inertia and the number of changed
  assignments;
* one more ``all_reduce_sum`` only in an iteration that re-seeds empty clusters, again making
  rank 0's choice everybody's (it is computed identically everywhere; this only guards against
  BLAS results that differ between hosts).

So every rank holds the same centroids after every step, and a run over ranks equals a
single-process run on the concatenated samples (same seed) up to float summation order. With
:class:`LocalCollective` (a world of one) the very same code runs locally.

Speed
-----
:func:`nearest_centroid` is a batched ``addmm`` (``||x||^2 - 2 x.c + ||c||^2``) with bounded
memory. Inside :func:`kmeans` (and for large inputs in :func:`nearest_centroid`) a
:class:`CentroidIndex` first tries an *exact* pruned search: each point is compared only with
the ``neighbors`` centroids nearest to a guess (its previous cluster), in one grouped matmul,
and the answer is accepted only when the triangle inequality proves that no other centroid can
be closer; everything else falls back to the brute-force matmul. The result is the same as the
brute force (up to float rounding in near-ties).
"""

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

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
_LIST_MAX_AGE = 3


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
        self._two_stage = k >= 4 * _ARGMIN_WIDTH
        kp = _round_up(k, _ARGMIN_WIDTH) if self._two_stage else k
        self._kp = kp
        self._ct = torch.zeros(self.d, kp, device=c.device)
        self._ct[:, :k] = c.t()
        self._bias = torch.full((kp,), float("inf"), device=c.device)
        self._bias[:k] = self.sq
        self.neighbors = max(4, min(int(neighbors), k))
        self._graphs: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._lists: Optional[torch.Tensor] = None
        self._age = 0
        self._previous = previous

    # ---- brute force ------------------------------------------------------------------------
    def _rows_per_batch(self, n: int) -> int:
        if self.batch_size is not None:
            b = int(self.batch_size)
        else:
            b = _TARGET_BATCH_ELEMENTS // self._kp
        b = min(b, _MAX_BATCH_ELEMENTS // self._kp)
        return max(1, min(b, max(n, 1)))

    def brute_force(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(index int64 [n], squared distance [n]) by exhaustive batched matmul."""
        x = x.to(torch.float32)
        n = x.shape[0]
        idx = torch.empty(n, dtype=torch.int64, device=x.device)
        best = torch.empty(n, dtype=torch.float32, device=x.device)
        if n == 0:
            return idx, best
        b = self._rows_per_batch(n)
        kp, W = self._kp, _ARGMIN_WIDTH
        buf = torch.empty(b * kp, device=x.device)
        for lo in range(0, n, b):
            xb = x[lo: lo + b]
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
        return idx, best

    # ---- pruned search ----------------------------------------------------------------------
    def _err(self, sq_norm: torch.Tensor) -> torch.Tensor:
        """Generous bound on the float32 error of an expanded squared distance."""
        return (sq_norm + self.sq_max) * ((self.d + 16) * _F32_EPS)

    def _levels(self) -> List[int]:
        L = self.neighbors
        return [L, 8 * L] if self.k >= 4 * 8 * L else [L]

    def _graph(self, L: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(neighbour lists [k, L] with the centroid itself first, squared distance to the
        nearest centroid outside the list minus an error margin [k], scoring weights
        [k, d + 1, L] = ``[-2 c; |c|^2]`` of each list's centroids).

        All levels are built in one pass over the ``k x k`` centroid distances. With
        ``previous`` (an index of the same k, e.g. the last Lloyd step's) its lists are reused
        and only the radii are recomputed exactly (any list is correct with its exact radius;
        a fresh top-k is taken every few steps because the lists go stale as centroids move).
        """
        if L not in self._graphs:
            c, k = self.centroids, self.k
            levels = self._levels()
            prev = self._previous
            reuse = (prev is not None and prev.k == k and prev._lists is not None
                     and prev._lists.shape[1] >= levels[-1] and prev._age < _LIST_MAX_AGE)
            Lmax = levels[-1]
            lists = prev._lists if reuse else torch.empty(k, Lmax, dtype=torch.int64, device=c.device)
            r2s = {lv: torch.empty(k, device=c.device) for lv in levels}
            rows = max(1, _TARGET_BATCH_ELEMENTS // k)
            ct = c.t()
            for lo in range(0, k, rows):
                cb = c[lo: lo + rows]
                m = cb.shape[0]
                d2 = torch.addmm(self.sq, cb, ct, alpha=-2.0).add_(self.sq[lo: lo + m, None])
                ar = torch.arange(m, device=c.device)
                d2[ar, ar + lo] = -1.0  # the centroid itself comes first
                margin = self._err(self.sq[lo: lo + m])
                if not reuse:
                    vals, ids = torch.topk(d2, Lmax + 1, dim=1, largest=False, sorted=True)
                    lists[lo: lo + m] = ids[:, :Lmax]
                    for lv in levels:
                        # the nearest centroid left out, measured directly and pessimised
                        direct = ((cb - c[ids[:, lv]]) ** 2).sum(1)
                        r2s[lv][lo: lo + m] = torch.minimum(vals[:, lv], direct) - margin
                else:
                    done = 0
                    for lv in levels:  # lists are nested: mask the growing prefix
                        d2.scatter_(1, lists[lo: lo + m, done:lv], float("inf"))
                        done = lv
                        r2s[lv][lo: lo + m] = torch.amin(d2, dim=1) * (1 - 1e-6) - margin
            aug = torch.cat([-2.0 * c, self.sq[:, None]], 1)
            self._lists = lists
            self._age = prev._age + 1 if reuse else 0
            for lv in levels:
                nbr = lists[:, :lv].contiguous()
                self._graphs[lv] = (nbr, r2s[lv], aug[nbr].transpose(1, 2).contiguous())
            self._previous = None  # do not chain every earlier index
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

    def can_prune(self, n: int) -> bool:
        """Whether :meth:`search` will try the neighbour lists (enough centroids and points)."""
        return self.k >= 4 * self.neighbors and n >= 64

    def search(self, x: torch.Tensor, guess: Optional[torch.Tensor] = None,
               min_proven: float = 0.2) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """(index, squared distance, number of points that needed the brute force).

        ``guess`` (int64 [n], optional): a centroid index per point believed to be near it (e.g.
        the previous assignment). Without it the guess is the nearest of ``~4 sqrt(k)``
        evenly-spaced centroids. If a pass proves fewer than ``min_proven`` of its points (high
        intrinsic dimension: the triangle inequality cannot prune), the rest goes straight to
        the brute force.
        """
        x = x.to(torch.float32).contiguous()
        n = x.shape[0]
        if not self.can_prune(n):
            idx, best = self.brute_force(x)
            return idx, best, n
        c, k, L = self.centroids, self.k, self.neighbors
        if guess is None:
            m = min(k, max(16, 4 * int(math.sqrt(k))))
            subset = torch.linspace(0, k - 1, m, device=x.device).round().long()
            g = subset[CentroidIndex(c[subset], batch_size=self.batch_size).brute_force(x)[0]]
            plan = [(L, 6)]
        else:
            g = guess.to(device=x.device, dtype=torch.int64).clamp(0, k - 1)
            plan = [(L, 2)]
        if len(self._levels()) > 1:
            plan.append((self._levels()[1], 2))  # longer lists for what short ones cannot prove
        idx = torch.empty(n, dtype=torch.int64, device=x.device)
        best = torch.empty(n, dtype=torch.float32, device=x.device)
        active: Optional[torch.Tensor] = None  # None = all points
        ws: Dict[str, torch.Tensor] = {}
        for level, (length, steps) in enumerate(plan):
            graph = self._graph(length)
            stuck: List[torch.Tensor] = []
            stuck_g: List[torch.Tensor] = []
            for step in range(steps):
                gs, order = torch.sort(g)
                src = order if active is None else active.index_select(0, order)
                m = src.numel()
                tile = 1 << max(3, min(6, int(math.log2(max(1.0, m / k / 4)))))
                moved_src: List[torch.Tensor] = []
                moved_g: List[torch.Tensor] = []
                n_proven = 0
                for lo in range(0, m, _SEARCH_CHUNK):
                    s, gg = src[lo: lo + _SEARCH_CHUNK], gs[lo: lo + _SEARCH_CHUNK]
                    new_g, b2, proven = self._score_chunk(x, s, gg, tile, graph, ws)
                    done = torch.nonzero(proven).squeeze(1)
                    n_proven += done.numel()
                    dst = s.index_select(0, done)
                    idx.index_copy_(0, dst, new_g.index_select(0, done))
                    best.index_copy_(0, dst, b2.index_select(0, done))
                    unproven = ~proven
                    moved = unproven & (new_g != gg)
                    still = unproven & ~moved  # a local optimum of this graph
                    stuck.append(s[still])
                    stuck_g.append(gg[still])
                    moved_src.append(s[moved])
                    moved_g.append(new_g[moved])
                active, g = torch.cat(moved_src), torch.cat(moved_g)
                give_up = n_proven < min_proven * m and (guess is not None or step == steps - 1)
                if active.numel() == 0 or (level == 0 and give_up):
                    break
            active = torch.cat([active] + stuck)
            g = torch.cat([g] + stuck_g)
            if active.numel() == 0 or (level == 0 and give_up):
                break
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
        return collective.all_gather_cat(x), collective.all_gather_cat(w), total
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


def _d2_to(points: torch.Tensor, sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances of ``points`` to one centre ``c`` (expanded form, clamped at 0)."""
    return torch.addmv(sq + (c * c).sum(), points, c, alpha=-2.0).clamp_(min=0)


def _kmeans_plus_plus(pool: torch.Tensor, w: torch.Tensor, k: int,
                      g: torch.Generator) -> torch.Tensor:
    """Seeded weighted D^2 sampling on the replicated pool.

    Sampling is by inverse CDF (float64 cumsum + searchsorted), so it never divides by zero:
    once every pool point coincides with a chosen centre the total mass is 0 and the last pool
    point is taken again (duplicate centroids, as k > distinct points requires).
    """
    p = pool.shape[0]
    sq = (pool * pool).sum(1)
    w64 = w.double()
    chosen = torch.empty(k, dtype=torch.int64)
    u = torch.rand(k, generator=g, dtype=torch.float64)
    cdf = torch.cumsum(w64, 0)
    i = torch.searchsorted(cdf, u[:1] * cdf[-1], right=True).clamp_(max=p - 1)
    chosen[0] = i[0]
    d2 = _d2_to(pool, sq, pool[i[0]])
    for t in range(1, k):
        cdf = torch.cumsum(d2.double().mul_(w64), 0)
        i = torch.searchsorted(cdf, u[t: t + 1] * cdf[-1], right=True).clamp_(max=p - 1)
        chosen[t] = i[0]
        torch.minimum(d2, _d2_to(pool, sq, pool[i[0]]), out=d2)
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


@torch.no_grad()
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
            or ``"brute"``.
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
    weighted = weights is not None
    history: List[float] = []
    reseeded = 0
    iters_run = 0
    assign = torch.zeros(n, dtype=torch.int64, device=x.device)
    prev: Optional[torch.Tensor] = None
    x64 = None
    index: Optional[CentroidIndex] = None
    skip, backoff = 0, 1  # passes to brute-force before trying the pruned search again
    while True:
        index = CentroidIndex(centroids, batch_size=batch_size, previous=index)
        if method == "auto" and skip == 0 and index.can_prune(n):
            assign, dist2, n_brute = index.search(x, guess=prev)
            if n_brute > 0.5 * n:  # pruning does not pay on this data (yet): back off
                skip, backoff = backoff, 2 * backoff
            else:
                backoff = 1
        else:
            skip = max(0, skip - 1)
            assign, dist2 = index.brute_force(x)
        changed = n if prev is None else int((assign != prev).sum())
        if x64 is None:
            x64 = x.double() * w.double()[:, None] if weighted else x.double()
        sums = torch.zeros(k, d, dtype=torch.float64, device=x.device).index_add_(0, assign, x64)
        if weighted:
            counts = torch.bincount(assign, weights=w.double(), minlength=k)
            inertia = (dist2.double() * w.double()).sum()
        else:
            counts = torch.bincount(assign, minlength=k).double()
            inertia = dist2.sum(dtype=torch.float64)
        packed = torch.cat([sums.flatten(), counts,
                            inertia.reshape(1), torch.tensor([float(changed)], dtype=torch.float64)])
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
        prev = assign
        iters_run += 1

    return KMeansResult(centroids=centroids + shift, assignment=assign, inertia=history[-1],
                        inertia_history=history, reseeded=reseeded, iters_run=iters_run)
