"""k-means and nearest-centroid search (single process; see test_kmeans_distributed.py for ranks)."""

import pytest
import torch

from torchrec_cce.clustering import kmeans as kmeans_module
from torchrec_cce import ops
from torchrec_cce.clustering import native
from torchrec_cce.clustering.kmeans import (
    CentroidIndex,
    Collective,
    KMeansResult,
    LocalCollective,
    _init_pool,
    _kmeans_parallel,
    _reseed,
    default_collective,
    kmeans,
    nearest_centroid,
)


def _blobs(centres: torch.Tensor, per: int, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k, d = centres.shape
    x = centres.repeat_interleave(per, 0) + sigma * torch.randn(k * per, d, generator=g)
    return x[torch.randperm(k * per, generator=g)]


def _mixture(n: int, d: int, comps: int, seed: int = 0) -> torch.Tensor:
    """Gaussian mixture with unequal spreads (not trivially separable)."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(comps, d, generator=g)
    scale = 0.3 + torch.rand(comps, 1, generator=g)
    lab = torch.randint(0, comps, (n,), generator=g)
    return centres[lab] + scale[lab] * torch.randn(n, d, generator=g)


def _brute_inertia(x: torch.Tensor, c: torch.Tensor) -> float:
    return float((torch.cdist(x.double(), c.double()).min(1).values ** 2).sum())


# ---------------------------------------------------------------------------------- collectives
def test_local_collective_is_identity():
    c = default_collective()  # torch.distributed is not initialised in this process
    assert isinstance(c, LocalCollective) and isinstance(c, Collective)
    assert (c.rank, c.world_size) == (0, 1)
    t = torch.arange(6.0).view(3, 2)
    assert torch.equal(c.all_reduce_sum(t), t)
    assert torch.equal(c.all_gather_cat(t), t)


# ----------------------------------------------------------------------------- nearest centroid
def _methods():
    """Search paths under test: torch always, the compiled kernels where they build here."""
    return ["torch"] + (["native"] if native.available() else []) + (
        ["grouped"] if native.grouped_supported() else [])


def test_native_kernel_builds_here():
    """This machine has a C++ compiler and AVX2: the op library's kernels must not silently
    fall back (to the torch path or the scalar kernel)."""
    import shutil
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler: the torch path is used (covered by the other tests)")
    assert native.available()
    assert native.simd() == (ops._cpu_has("avx2") and ops._cpu_has("fma"))


def test_scalar_kernel_equals_simd_kernel_bit_for_bit():
    """The scalar kernel (CPUs without AVX2) and the AVX2 kernel return the same float32 bits:
    the same chain of fused multiply-adds per score (the library is built without implicit
    contraction), including the remainder rows and a column count that is not a multiple of
    the AVX2 block."""
    if not native.simd():
        pytest.skip("no AVX2 kernel here")
    g = torch.Generator().manual_seed(0)
    for d in (1, 3, 4, 16):
        for kp in (8, 40, 1024):
            x = torch.randn(1001, d, generator=g) * 3
            ct = torch.randn(d, kp, generator=g)
            bias = (ct * ct).sum(0)
            bias[-3:] = float("inf")  # padding columns
            fast = torch.ops.torchrec_cce.nearest2(x, ct, bias, True)
            slow = torch.ops.torchrec_cce.nearest2(x, ct, bias, False)
            for a, b in zip(fast, slow):
                assert torch.equal(a, b), (d, kp)


def test_nearest2_releases_the_gil():
    """k-means runs the kernel on parallel Python worker threads: while one thread is inside
    the op, another runs Python. With a 10 s switch interval a thread holding the GIL would
    keep it through all its calls; the main thread wakes while the worker is still calling."""
    import sys
    import threading

    if not native.available():
        pytest.skip("op library unavailable")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, 4, generator=g)
    c = torch.randn(1024, 4, generator=g)
    ct, bias = c.t().contiguous(), (c * c).sum(1)
    started, stop = threading.Event(), threading.Event()
    calls = []

    def worker() -> None:
        started.set()
        while not stop.is_set() and len(calls) < 20:
            native.nearest2(x, ct, bias)
            calls.append(1)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        t = threading.Thread(target=worker)
        t.start()
        started.wait()
        woke_after = len(calls)
        stop.set()
        t.join()
    finally:
        sys.setswitchinterval(interval)
    assert woke_after < 20, "the main thread only ran after all the worker's calls: GIL held"


@pytest.mark.parametrize("k", [1, 7, 100, 700])
@pytest.mark.parametrize("d", [1, 3, 4, 8, 16, 20])
def test_nearest_centroid_matches_float64_argmin(k, d):
    """Both paths (and several batch sizes) give the float64 argmin exactly (d = 20: the
    kernel does d <= 16, so auto falls back to torch)."""
    g = torch.Generator().manual_seed(k + 100 * d)
    x = torch.randn(3000, d, generator=g)
    c = torch.randn(k, d, generator=g)
    d2 = ((x.double()[:, None, :] - c.double()[None]) ** 2).sum(-1)
    ref_d, ref_i = d2.min(1)
    for method in _methods() + ["auto"]:
        if method in ("native", "grouped") and d > 16:
            continue
        for batch_size in (None, 128, 1):  # 128 and 1 < n: several batches
            if batch_size == 1 and d != 4:
                continue
            idx, dist = nearest_centroid(x, c, batch_size=batch_size, method=method)
            assert idx.dtype == torch.int64 and idx.shape == (3000,) and dist.shape == (3000,)
            assert torch.equal(idx, ref_i), (method, batch_size, int((idx != ref_i).sum()))
            assert torch.allclose(dist.double(), ref_d, atol=1e-4, rtol=1e-4)
            assert bool((dist >= 0).all())


@pytest.mark.parametrize("method", ["torch", "native", "grouped"])
def test_near_ties_are_decided_in_float64(method):
    """Points placed on (and 1 ulp off) the bisector of two centroids, where float32 scores
    cannot tell: the answer is still the float64 argmin, lowest index on exact ties."""
    if method == "native" and not native.available():
        pytest.skip("compiled kernel unavailable")
    if method == "grouped" and not native.grouped_supported():
        pytest.skip("grouped kernel unavailable (needs AVX2)")
    g = torch.Generator().manual_seed(5)
    c = torch.randn(64, 4, generator=g) * 10
    c[1] = c[0] + torch.tensor([1e-3, 0.0, 0.0, 0.0])  # two nearly coincident centroids
    mid = (c[0] + c[1]) / 2
    x = mid + torch.zeros(4000, 4)
    x[:, 0] += torch.linspace(-2e-4, 2e-4, 4000)  # crosses the bisector
    x[:, 1:] += 1e-3 * torch.randn(4000, 3, generator=g)
    d2 = ((x.double()[:, None, :] - c.double()[None]) ** 2).sum(-1)
    ref_i = d2.argmin(1)
    assert 0 < int((ref_i == 0).sum()) < 4000  # both sides are populated
    threads = torch.get_num_threads()
    try:  # 2 worker threads: the near-ties (thousands here) are decided in two parts
        torch.set_num_threads(2)
        idx, _ = nearest_centroid(x, c, method=method)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(idx, ref_i), int((idx != ref_i).sum())
    # exact duplicates: the lower index wins
    cd = torch.cat([c[:10], c[3:4], c[10:]])  # index 10 duplicates index 3
    xi = c[3] + 1e-4 * torch.randn(500, 4, generator=g)
    idx, _ = nearest_centroid(xi, cd, method=method)
    ref = ((xi.double()[:, None, :] - cd.double()[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(idx, ref) and not bool((idx == 10).any())


def _float64_argmin(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The documented answer: argmin over centroids of the float64 squared distance from the
    float32 point to the float32 centroid, the lowest index among exact ties (torch's argmin
    returns the first minimum). cdist without its matrix-product shortcut, which is inexact."""
    return torch.cdist(x.double(), c.double(),
                       compute_mode="donot_use_mm_for_euclid_dist").square().argmin(1)


@pytest.mark.parametrize("kind", ["gaussian", "clustered", "duplicates", "grid"])
@pytest.mark.parametrize("d", [1, 2, 4, 7, 16])
def test_grouped_search_equals_cdist_argmin(kind, d):
    """The bounding-box pruned kernel (what ``auto`` uses for k >= 2048) returns exactly the
    float64 argmin, on data where its boxes prune a lot (clustered), a little (gaussian), with
    duplicate centroids (exact ties) and on a lattice (many exact ties between boxes)."""
    if not native.grouped_supported():
        pytest.skip("grouped kernel unavailable (needs a C++ compiler and AVX2)")
    g = torch.Generator().manual_seed(d * 10 + len(kind))
    k = 1000
    if kind == "clustered":
        x = _mixture(20_000, d, 50, seed=d)
        c = x[torch.randperm(x.shape[0], generator=g)[:k]] + 0.01 * torch.randn(k, d, generator=g)
    elif kind == "duplicates":
        base = torch.randn(k // 4, d, generator=g)
        c = base[torch.randint(0, k // 4, (k,), generator=g)]
        x = torch.cat([base[torch.randint(0, k // 4, (5000,), generator=g)],
                       torch.randn(15_000, d, generator=g)])
    elif kind == "grid":
        c = torch.randint(-4, 5, (k, d), generator=g).float()
        x = torch.randint(-8, 9, (20_000, d), generator=g).float() / 2
    else:
        x, c = torch.randn(20_000, d, generator=g), torch.randn(k, d, generator=g)
    ref = _float64_argmin(x, c)
    for method in ("grouped", "auto", "native"):
        idx, dist = nearest_centroid(x, c, method=method)
        assert torch.equal(idx, ref), (method, int((idx != ref).sum()))
        want = (x.double() - c.double()[ref]).square().sum(1)
        assert torch.allclose(dist.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["grid", "duplicates"])
@pytest.mark.parametrize("leaf", [16, 0])
@pytest.mark.parametrize("bound", [None, 8192])
def test_grouped_search_many_superboxes_and_ties(kind, leaf, bound, monkeypatch):
    """k = 9000 (default leaf: 71 groups in 3 superboxes of 32; leaf 16: 563 groups in 18):
    the two-level boxes and the box-pruned float64 re-scoring of near-ties give exactly the
    float64 argmin, lowest index on ties, as the torch path does; also when the re-scoring's
    candidate bound (``bound``) makes it halve its batches of rows again and again."""
    if not native.grouped_supported():
        pytest.skip("grouped kernel unavailable (needs a C++ compiler and AVX2)")
    monkeypatch.setattr(kmeans_module, "_GROUP_LEAF", leaf)
    if bound is not None:
        monkeypatch.setattr(kmeans_module, "_EXACT_PAIRS", bound)
    g = torch.Generator().manual_seed(3)
    k, d = 9000, 4
    if kind == "grid":
        c = torch.randint(-6, 7, (k, d), generator=g).float()
        x = torch.randint(-12, 13, (4000, d), generator=g).float() / 2
    else:
        base = torch.randn(k // 3, d, generator=g)
        c = base[torch.randint(0, k // 3, (k,), generator=g)]
        x = torch.cat([base[:2000], torch.randn(2000, d, generator=g)])
    ref = _float64_argmin(x, c)
    index = kmeans_module.CentroidIndex(c, method="grouped")
    assert index.groups.num_supers == -(-index.groups.num_groups // native.BOXES_PER_SUPER) > 1
    idx, dist = index.brute_force(x)
    assert torch.equal(idx, ref), int((idx != ref).sum())
    torch_idx, torch_dist = nearest_centroid(x, c, method="torch")
    assert torch.equal(torch_idx, ref)
    assert torch.allclose(dist.double(), torch_dist.double(), atol=1e-5, rtol=1e-5)


def test_grouped_search_prunes_low_dimensional_data():
    """At d = 4 the boxes skip most centroids (the point of the kernel): fewer than a quarter of
    the boxes are scanned per row."""
    if not native.grouped_supported():
        pytest.skip("grouped kernel unavailable")
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(5000, 4, generator=g), torch.randn(4096, 4, generator=g)
    groups = native.CentroidGroups(c, (c * c).sum(1), 64)
    assert groups.num_groups == 64 and sorted(groups.perm[groups.bias.isfinite()].tolist()) \
        == list(range(4096))
    xn = (x * x).sum(1)
    idx, best, second, visited = native.nearest2_grouped(x, groups, xn, torch.zeros(5000))
    assert torch.equal(idx, _float64_argmin(x, c))
    assert visited < 0.25 * 5000 * groups.num_groups, visited / 5000


def test_nearest_centroid_faiss_method_matches_brute():
    pytest.importorskip("faiss", reason="faiss is not installed (pip install faiss-cpu)")
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(2000, 6, generator=g), torch.randn(300, 6, generator=g)
    bi, bd = nearest_centroid(x, c, method="brute")
    fi, fd = nearest_centroid(x, c, method="faiss")
    assert torch.equal(bi, fi) and torch.allclose(bd, fd, atol=1e-4)


def test_nearest_centroid_ties_and_duplicates_are_finite():
    x = torch.zeros(50, 3)
    c = torch.zeros(600, 3)  # every centroid ties
    for method in _methods():
        idx, dist = nearest_centroid(x, c, method=method)
        assert bool(((idx >= 0) & (idx < 600)).all()) and torch.equal(dist, torch.zeros(50))


def test_nearest_centroid_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        nearest_centroid(torch.zeros(3, 2), torch.zeros(4, 3))


# --------------------------------------------------------------------------------------- kmeans
def test_recovers_planted_blobs():
    g = torch.Generator().manual_seed(0)
    true = 10 * torch.randn(8, 5, generator=g)
    x = _blobs(true, 250, 0.3)
    res = kmeans(x, 8, iters=30, seed=0)
    assert isinstance(res, KMeansResult)
    assert res.centroids.shape == (8, 5) and res.assignment.shape == (2000,)
    # match found centroids to true centres: a permutation, each within 0.1
    dist = torch.cdist(true, res.centroids)
    match = dist.argmin(1)
    assert sorted(match.tolist()) == list(range(8))
    assert float(dist.min(1).values.max()) < 0.1
    # the assignment is the planted labelling (up to the permutation)
    planted = torch.cdist(x, true).argmin(1)
    assert torch.equal(match[planted], res.assignment)
    # inertia ~ n * d * sigma^2
    assert abs(res.inertia / (2000 * 5 * 0.09) - 1) < 0.1


@pytest.mark.parametrize("init", ["kmeans++", "kmeans||", "random"])
def test_inertia_non_increasing_and_consistent(init):
    x = _mixture(6000, 6, 40, seed=2)
    res = kmeans(x, 50, iters=25, seed=3, init=init, tol=0)
    h = res.inertia_history
    assert len(h) == res.iters_run + 1 and res.iters_run >= 5
    for a, b in zip(h, h[1:]):
        assert b <= a * (1 + 1e-6) + 1e-6, h
    assert h[-1] < h[0]
    # inertia, assignment and centroids are consistent with each other
    assert res.inertia == h[-1]
    assert abs(res.inertia - _brute_inertia(x, res.centroids)) <= 1e-4 * res.inertia
    assert torch.equal(res.assignment, torch.cdist(x, res.centroids).argmin(1))
    # each centroid is the mean of its points
    means = torch.zeros(50, 6).index_add_(0, res.assignment, x) / \
        torch.bincount(res.assignment, minlength=50).clamp(min=1)[:, None]
    if res.iters_run < 25:  # converged: one more update would not move anything
        assert torch.allclose(means, res.centroids, atol=1e-4)


def test_deterministic_and_seed_dependent():
    x = _mixture(3000, 4, 20, seed=4)
    a, b = kmeans(x, 30, iters=10, seed=5), kmeans(x, 30, iters=10, seed=5)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignment, b.assignment)
    assert a.inertia_history == b.inertia_history
    c = kmeans(x, 30, iters=10, seed=6)
    assert not torch.equal(a.centroids, c.centroids)


def test_without_the_final_pass_the_same_centroids_one_search_fewer(monkeypatch):
    """final_pass=False (re-clustering: only the centroids are used) gives bit-identical
    centroids after the same updates, and runs one nearest-centroid pass fewer; its inertia is
    that of the centroids before the last update (>= the final one)."""
    x = _mixture(5000, 4, 30, seed=8)
    passes = []
    original = kmeans_module.CentroidIndex.brute_force

    def counting(self, rows):
        passes.append(rows.shape[0])
        return original(self, rows)

    monkeypatch.setattr(kmeans_module.CentroidIndex, "brute_force", counting)
    full = kmeans(x, 40, iters=3, seed=1, tol=0, init="random")
    lloyd_full = passes.count(x.shape[0])
    passes.clear()
    short = kmeans(x, 40, iters=3, seed=1, tol=0, init="random", final_pass=False)
    assert passes.count(x.shape[0]) == lloyd_full - 1 == 3
    assert torch.equal(short.centroids, full.centroids)
    assert short.iters_run == full.iters_run == 3
    assert short.inertia_history == full.inertia_history[:-1]
    assert short.inertia == full.inertia_history[-2] >= full.inertia
    assert short.inertia == pytest.approx(_brute_inertia(x, kmeans(x, 40, iters=2, seed=1, tol=0,
                                                                   init="random").centroids),
                                          rel=1e-4)


def test_tol_stops_early():
    x = _mixture(4000, 4, 30, seed=7)
    full = kmeans(x, 30, iters=40, seed=0, tol=0)
    early = kmeans(x, 30, iters=40, seed=0, tol=1e-2)
    assert early.iters_run < full.iters_run
    assert early.inertia_history == full.inertia_history[: len(early.inertia_history)]


@pytest.mark.parametrize("n,d,k", [(5, 3, 12), (1, 2, 3), (40, 1, 6), (300, 1, 1), (300, 7, 1)])
def test_edge_shapes_are_finite(n, d, k):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n + d + k))
    res = kmeans(x, k, iters=10, seed=0)
    assert res.centroids.shape == (k, d) and res.assignment.shape == (n,)
    assert bool(torch.isfinite(res.centroids).all()) and res.inertia >= 0
    assert all(torch.isfinite(torch.tensor(res.inertia_history)))
    assert bool(((res.assignment >= 0) & (res.assignment < k)).all())
    if k == 1:
        assert torch.allclose(res.centroids[0], x.mean(0), atol=1e-5)
        assert abs(res.inertia - float(((x - x.mean(0)) ** 2).sum())) < 1e-3 * max(1.0, res.inertia)
    if k >= n:  # every point can have its own centroid
        assert res.inertia < 1e-4


def test_all_points_identical():
    x = torch.full((100, 4), 3.5)
    res = kmeans(x, 10, iters=10, seed=0)
    assert torch.equal(res.centroids, torch.full((10, 4), 3.5))
    assert res.inertia == 0.0 and bool(torch.isfinite(res.centroids).all())
    assert res.reseeded >= 9  # 9 clusters cannot get a point (ties go to one index)


def test_empty_clusters_are_reseeded():
    # 3 distinct points (10 copies each) and k = 5: at least 2 clusters must be empty after the
    # first assignment; they are re-seeded, nothing is NaN, every distinct point is a centroid.
    pts = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = pts.repeat(10, 1)
    res = kmeans(x, 5, iters=10, seed=0)
    assert res.reseeded >= 2
    assert bool(torch.isfinite(res.centroids).all())
    assert res.inertia == pytest.approx(0.0, abs=1e-5)
    assert float(torch.cdist(pts, res.centroids).min(1).values.max()) < 1e-5


def test_reseed_moves_empty_cluster_to_farthest_pool_point():
    centroids = torch.tensor([[0.0], [1.0], [123.0]])
    empty = torch.tensor([False, False, True])
    pool = torch.tensor([[0.1], [0.9], [7.0], [3.0]])
    assert _reseed(centroids, empty, pool, torch.ones(4)) == 1
    assert torch.equal(centroids, torch.tensor([[0.0], [1.0], [7.0]]))
    # zero-weight pool points are never chosen
    centroids = torch.tensor([[0.0], [1.0], [123.0]])
    _reseed(centroids, empty, pool, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert float(centroids[2]) == 3.0


def test_empty_cluster_during_lloyd_is_reseeded():
    """Clusters that Lloyd empties are re-seeded onto the farthest pool point, without NaN.

    1-D points 0, 1, 2, 3, 12 from centroids 0.5, 2, 100: the first assignment leaves 100
    empty; it is re-seeded onto 12 (farthest from the updated 0.5 and 17/3); the next assignment
    then empties the middle cluster (0..3 all go to 0.5), which is re-seeded again."""
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [12.0]])
    res = kmeans(x, 3, iters=10, init=torch.tensor([[0.5], [2.0], [100.0]]), tol=0)
    assert res.reseeded >= 2
    assert bool(torch.isfinite(res.centroids).all())
    assert float(torch.cdist(x[4:], res.centroids).min()) < 1e-5  # 12 got its own centroid
    assert res.inertia <= 2.0 + 1e-5  # {0, 1}, {2, 3}, {12} or better
    # a wrong warm start is rejected
    with pytest.raises(ValueError, match="initial centroids"):
        kmeans(x, 2, init=torch.zeros(3, 1))


def test_weights_equal_repetition():
    g = torch.Generator().manual_seed(8)
    x = _mixture(400, 3, 6, seed=8)
    w = torch.randint(1, 4, (400,), generator=g)
    a = kmeans(x, 12, iters=15, seed=1, weights=w.float(), tol=0)
    b = kmeans(x.repeat_interleave(w, 0), 12, iters=15, seed=1, tol=0)
    assert torch.allclose(a.centroids, b.centroids, atol=1e-4)
    assert a.inertia == pytest.approx(b.inertia, rel=1e-5)
    assert torch.equal(a.assignment.repeat_interleave(w), b.assignment)
    # zero weights: those points do not move the centroids
    w0 = torch.cat([torch.ones(400), torch.zeros(50)])
    x0 = torch.cat([x, 1000 + torch.randn(50, 3, generator=g)])
    c = kmeans(x0, 12, iters=15, seed=1, weights=w0, tol=0)
    assert float(c.centroids.abs().max()) < 100


def test_subsampled_init_pool():
    x = _mixture(20_000, 4, 30, seed=9)
    w = torch.ones(20_000)
    pool, pool_w, total = _init_pool(x, w, key=123, pool_size=500, collective=LocalCollective())
    assert total == 20_000 and pool.shape == (500, 4) and torch.equal(pool_w, torch.ones(500))
    # a subset of x, in the original order, chosen by the key only
    pos = torch.cdist(pool, x).argmin(1)
    assert torch.equal(x[pos], pool) and bool((pos[1:] > pos[:-1]).all())
    again, _, _ = _init_pool(x, w, key=123, pool_size=500, collective=LocalCollective())
    other, _, _ = _init_pool(x, w, key=124, pool_size=500, collective=LocalCollective())
    assert torch.equal(pool, again) and not torch.equal(pool, other)
    # k-means from a small pool is still a sound clustering
    res = kmeans(x, 32, iters=15, seed=0, pool_size=500)
    full = kmeans(x, 32, iters=15, seed=0)
    assert res.inertia < 1.25 * full.inertia


def test_input_validation():
    with pytest.raises(ValueError, match="k must be positive"):
        kmeans(torch.zeros(3, 2), 0)
    with pytest.raises(ValueError, match="init"):
        kmeans(torch.zeros(3, 2), 2, init="bogus")
    with pytest.raises(ValueError, match="no samples"):
        kmeans(torch.zeros(0, 2), 2)
    with pytest.raises(ValueError, match="weights"):
        kmeans(torch.zeros(3, 2), 2, weights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.tensor([[float("nan"), 0.0]]), 1)


def test_non_contiguous_input():
    x = _mixture(2000, 8, 10, seed=10).view(2000, 2, 4)[:, 1]  # like recluster's x[:, chunk]
    a = kmeans(x, 10, iters=10, seed=0)
    b = kmeans(x.contiguous(), 10, iters=10, seed=0)
    assert torch.equal(a.centroids, b.centroids)


def test_worker_threads_give_the_same_result_and_restore_the_thread_count():
    """With 2 threads the search, brute force and Lloyd sums run on 2 Python workers (one
    intra-op thread each); the result equals the single-threaded one."""
    x = _mixture(150_000, 4, 64, seed=12)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kmeans(x, 256, iters=4, seed=0, tol=0)
        one_nc = nearest_centroid(x, one.centroids)
        torch.set_num_threads(2)
        two = kmeans(x, 256, iters=4, seed=0, tol=0)
        two_nc = nearest_centroid(x, one.centroids)
        assert torch.get_num_threads() == 2  # restored after the call
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(one.centroids, two.centroids, atol=1e-5)
    assert torch.equal(one.assignment, two.assignment)
    assert one.inertia == pytest.approx(two.inertia, rel=1e-9)
    assert torch.equal(one_nc[0], two_nc[0])
    assert torch.equal(one_nc[0], torch.cdist(x, one.centroids).argmin(1))


def _reference_lloyd(x: torch.Tensor, init: torch.Tensor, iters: int):
    """Textbook Lloyd in float64: assign by the float64 argmin (lowest index on ties), move
    each centroid to its members' mean (empty clusters stay put)."""
    c = init.double().clone()
    x64 = x.double()
    for _ in range(iters):
        a = _float64_argmin(x64, c)
        counts = torch.bincount(a, minlength=c.shape[0]).double()
        sums = torch.zeros_like(c).index_add_(0, a, x64)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
    return c, _float64_argmin(x64, c)


@pytest.mark.parametrize("d,k", [(4, 300), (4, 1024), (16, 300)])
def test_kmeans_equals_reference_lloyd(d, k):
    """Same initial centroids: our k-means (grouped kernel at k >= 256, float32 sums in
    float64) and a textbook float64 Lloyd end with the same assignment and centroids."""
    x = _mixture(30_000, d, 40, seed=d + k)
    g = torch.Generator().manual_seed(1)
    init = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    res = kmeans(x, k, iters=8, init=init, tol=0)
    assert res.reseeded == 0  # the reference does not re-seed
    ref_c, ref_a = _reference_lloyd(x, init, res.iters_run)
    torch.testing.assert_close(res.centroids.double(), ref_c, atol=2e-5, rtol=1e-5)
    assert torch.equal(res.assignment, ref_a), int((res.assignment != ref_a).sum())
    for method in ("torch", "native"):
        if method == "native" and not native.available():
            continue
        other = kmeans(x, k, iters=8, init=init, tol=0, method=method)
        assert torch.equal(other.assignment, res.assignment), method
        assert torch.equal(other.centroids, res.centroids), method


# ------------------------------------------------------------------------- vs sklearn and faiss
def _reference_data():
    """Isotropic Gaussian data: k-means' local optima differ by well under 1% in inertia, so the
    comparison measures the implementation, not the luck of the initialisation."""
    return torch.randn(20_000, 8, generator=torch.Generator().manual_seed(11)), 64, 20


def test_inertia_close_to_sklearn():
    cluster = pytest.importorskip("sklearn.cluster", reason="scikit-learn is not installed "
                                  "(pip install scikit-learn) - reference k-means")
    x, k, iters = _reference_data()
    ours = kmeans(x, k, iters=iters, seed=0, tol=0)
    sk = cluster.KMeans(n_clusters=k, n_init=1, init="k-means++", max_iter=iters, tol=0,
                        random_state=0, algorithm="lloyd").fit(x.double().numpy())
    assert abs(ours.inertia / sk.inertia_ - 1) < 0.02, (ours.inertia, sk.inertia_)


def test_inertia_close_to_faiss():
    faiss = pytest.importorskip("faiss", reason="faiss is not installed (pip install faiss-cpu) "
                                "- reference k-means")
    x, k, iters = _reference_data()
    ours = kmeans(x, k, iters=iters, seed=0, tol=0)
    km = faiss.Kmeans(x.shape[1], k, niter=iters, nredo=1, seed=0, spherical=False,
                      max_points_per_centroid=1_000_000)
    km.train(x.numpy())
    theirs = _brute_inertia(x, torch.from_numpy(km.centroids))  # after faiss' last update
    assert abs(ours.inertia / theirs - 1) < 0.02, (ours.inertia, theirs)


@pytest.mark.parametrize("env", ["TORCHREC_CCE_FORCE_NO_FUSED", "TORCHREC_CCE_NATIVE"])
def test_without_the_op_library_kmeans_uses_torch(env):
    """No op library (a failed build, simulated) or ``TORCHREC_CCE_NATIVE=0``: the torch path,
    with the same (exact) answers; a failed build is announced once (the library's notice)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from torchrec_cce.clustering import native\n"
        "from torchrec_cce.clustering.kmeans import nearest_centroid, kmeans, CentroidIndex\n"
        "x, c = torch.randn(500, 4), torch.randn(40, 4)\n"
        "idx, _ = nearest_centroid(x, c)\n"
        "kmeans(x, 8, iters=2)\n"
        "assert not native.available() and not CentroidIndex(c).native\n"
        "ref = ((x.double()[:, None] - c.double()[None]) ** 2).sum(-1).argmin(1)\n"
        "assert torch.equal(idx, ref)\n"
        "print('OK')\n")
    value = "1" if env == "TORCHREC_CCE_FORCE_NO_FUSED" else "0"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **{env: value}),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
    notices = out.stderr.count("could not be built or loaded")
    assert notices == (1 if env == "TORCHREC_CCE_FORCE_NO_FUSED" else 0), out.stderr


def test_cpu_without_avx2_uses_the_scalar_brute_force_kernel(monkeypatch):
    """A CPU without AVX2 has no grouped kernel: ``auto`` then takes the scalar brute-force
    kernel at k >= 2048 (no error), with the same exact answers."""
    if not native.available():
        pytest.skip("op library unavailable")
    monkeypatch.setattr(native, "simd", lambda: False)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(3000, 4, generator=g), torch.randn(2048, 4, generator=g)
    assert not native.grouped_supported()
    assert CentroidIndex(c).groups is None and CentroidIndex(c).native
    idx, _ = nearest_centroid(x, c)
    assert torch.equal(idx, _float64_argmin(x, c))


# ------------------------------------------------------------------------------ k-means|| seeding
def _planted(clusters: int, per: int, d: int = 4, seed: int = 0) -> torch.Tensor:
    """Well separated planted clusters of unequal spreads."""
    g = torch.Generator().manual_seed(seed)
    centres = 20 * torch.randn(clusters, d, generator=g)
    scale = 0.1 + 0.4 * torch.rand(clusters, 1, generator=g)
    lab = torch.randint(0, clusters, (clusters * per,), generator=g)
    return centres[lab] + scale[lab] * torch.randn(clusters * per, d, generator=g)


def _gap_to_points(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per centroid: the largest coordinate difference to its closest point."""
    return (c[:, None] - x[None]).abs().amax(-1).min(1).values


def test_kmeans_parallel_deterministic_for_a_seed():
    x = _planted(64, 50)
    a = kmeans(x, 400, iters=0, seed=5, init="kmeans||")
    b = kmeans(x, 400, iters=0, seed=5, init="kmeans||")
    c = kmeans(x, 400, iters=0, seed=6, init="kmeans||")
    assert torch.equal(a.centroids, b.centroids)
    assert not torch.equal(a.centroids, c.centroids)
    # seeds are drawn pool points, distinct while distinct points remain
    assert torch.unique(a.centroids, dim=0).shape[0] == 400
    assert float(_gap_to_points(a.centroids, x).max()) < 1e-4


@pytest.mark.parametrize("clusters,k", [(64, 256), (256, 1024)])
def test_kmeans_parallel_quality_close_to_kmeanspp(clusters, k):
    """Planted clusters, k = 4 per cluster: mean inertia (3 seeds) of k-means|| seeding and
    after 10 Lloyd steps within 5% of exact k-means++ (measured: <= 1.5%), and far better
    than a random draw at seeding."""
    x = _planted(clusters, 4 * k // clusters * 16)

    def mean_inertia(init, iters):
        return sum(kmeans(x, k, iters=iters, seed=s, init=init, tol=0).inertia
                   for s in range(3)) / 3

    pp0, par0, rnd0 = (mean_inertia(i, 0) for i in ("kmeans++", "kmeans||", "random"))
    assert par0 <= 1.05 * pp0, (par0, pp0)
    assert par0 < 0.5 * rnd0, (par0, rnd0)
    pp, par = mean_inertia("kmeans++", 10), mean_inertia("kmeans||", 10)
    assert par <= 1.05 * pp, (par, pp)


def test_kmeans_parallel_single_centre_per_round_is_kmeanspp():
    """growth -> 1 draws one centre per round: D^2 sampling as in k-means++, so every seed
    lies in a different planted cluster when k equals the clusters (well separated)."""
    x = _planted(32, 40)
    c = _kmeans_parallel(x, torch.ones(x.shape[0]), 32, torch.Generator().manual_seed(0),
                         growth=1.0)
    # no two seeds within 3 units (a cluster's diameter), i.e. one seed per cluster
    assert int((torch.cdist(c, c) < 3.0).sum()) == 32


@pytest.mark.parametrize("n,k", [(5, 12), (1, 3), (40, 40)])
def test_kmeans_parallel_k_exceeds_points(n, k):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(n))
    res = kmeans(x, k, iters=3, seed=0, init="kmeans||")
    assert res.centroids.shape == (k, 3) and bool(torch.isfinite(res.centroids).all())
    # every point is a centroid: zero inertia; every centroid is one of the points
    assert res.inertia < 1e-4  # float32 rounding of the expanded distances
    assert float(_gap_to_points(res.centroids, x).max()) < 1e-4


def test_kmeans_parallel_duplicates_and_zero_weights():
    """Repeated points and zero-weight points: zero-weight points are never drawn while
    positive-weight points remain, duplicates end up as (repeated) centroids, never NaN."""
    base = torch.tensor([[0.0, 0.0], [5.0, 5.0], [10.0, 0.0]])
    x = torch.cat([base.repeat(20, 1), torch.tensor([[100.0, 100.0]])])
    w = torch.ones(x.shape[0])
    w[-1] = 0.0
    res = kmeans(x, 6, iters=0, seed=1, init="kmeans||", weights=w)
    assert bool(torch.isfinite(res.centroids).all())
    assert not bool((res.centroids == 100.0).any())
    assert torch.unique(res.centroids, dim=0).shape[0] == 3


def test_auto_init_switches_at_threshold(monkeypatch):
    x = _planted(16, 200)
    for k in (64, 128):
        monkeypatch.setattr(kmeans_module, "AUTO_KMEANSPP_MAX_K", 100)
        auto = kmeans(x, k, iters=2, seed=3)
        explicit = kmeans(x, k, iters=2, seed=3, init="kmeans++" if k <= 100 else "kmeans||")
        assert torch.equal(auto.centroids, explicit.centroids), k
