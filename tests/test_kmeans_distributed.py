"""k-means over 2 real processes (spawn, gloo on CPU) equals k-means on the concatenation.

Each rank clusters only its own slice of a dataset through :class:`ProcessGroupCollective`;
both ranks must hold bit-identical centroids, and those must equal a single-process
:func:`kmeans` on all samples in rank order with the same seed (float summation tolerance).
The process harness (free localhost port, ``destroy_process_group`` in every child) is
``tests/multiprocess.py``.
"""

from typing import Any, Dict, List

import pytest
import torch

from multiprocess import run_multiprocess
from torchrec_cce.clustering.kmeans import ProcessGroupCollective, kmeans

# name -> data / kmeans arguments. "split" = number of samples on rank 0 (uneven on purpose;
# 0 = an empty rank).
CONFIGS: Dict[str, Dict[str, Any]] = {
    "kmeans++": dict(n=2000, d=6, comps=12, split=700, k=16, iters=15, init="kmeans++"),
    "weights_random_subsampled_pool": dict(n=6000, d=4, comps=20, split=3500, k=40, iters=12,
                                           init="random", pool_size=500, weighted=True),
    "d4_many_points": dict(n=40_000, d=4, comps=64, split=20_000, k=256, iters=8, init="kmeans++"),
    "k_exceeds_n_empty_rank": dict(n=6, d=3, comps=3, split=0, k=10, iters=5, init="kmeans++"),
    "kmeans_parallel_weighted": dict(n=8000, d=4, comps=30, split=3000, k=300, iters=6,
                                     init="kmeans||", weighted=True),
    "kmeans_parallel_k_exceeds_n": dict(n=6, d=3, comps=3, split=4, k=10, iters=5,
                                        init="kmeans||"),
}


def _data(cfg: Dict[str, Any]):
    g = torch.Generator().manual_seed(cfg["n"] + cfg["k"])
    centres = 4 * torch.randn(cfg["comps"], cfg["d"], generator=g)
    lab = torch.randint(0, cfg["comps"], (cfg["n"],), generator=g)
    x = centres[lab] + 0.5 * torch.randn(cfg["n"], cfg["d"], generator=g)
    w = torch.randint(1, 5, (cfg["n"],), generator=g).float() if cfg.get("weighted") else None
    return x, w


def _run(cfg: Dict[str, Any], x: torch.Tensor, w, collective=None):
    return kmeans(x, cfg["k"], iters=cfg["iters"], seed=7, weights=w, collective=collective,
                  init=cfg["init"], tol=0, pool_size=cfg.get("pool_size"))


def _rank_fn(rank: int, world_size: int) -> Dict[str, Dict[str, Any]]:
    collective = ProcessGroupCollective()
    assert (collective.rank, collective.world_size) == (rank, world_size)
    # the collective itself: variable-length gather in rank order, sum
    got = collective.all_gather_cat(torch.arange(rank + 1, dtype=torch.int64) + 10 * rank)
    assert got.tolist() == [0, 10, 11], got
    assert collective.all_reduce_sum(torch.tensor([1.0 + rank])).tolist() == [3.0]
    out = {}
    for name, cfg in CONFIGS.items():
        x, w = _data(cfg)
        lo, hi = (0, cfg["split"]) if rank == 0 else (cfg["split"], cfg["n"])
        res = _run(cfg, x[lo:hi], None if w is None else w[lo:hi], collective)
        out[name] = dict(centroids=res.centroids, assignment=res.assignment, inertia=res.inertia,
                         history=res.inertia_history, reseeded=res.reseeded,
                         iters_run=res.iters_run)
    return out


@pytest.fixture(scope="module")
def rank_results() -> List[Dict[str, Dict[str, Any]]]:
    return run_multiprocess(_rank_fn, 2, timeout=120)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_single_process(rank_results, name):
    cfg = CONFIGS[name]
    r0, r1 = rank_results[0][name], rank_results[1][name]
    # every rank holds the same (bit-identical) centroids and global numbers
    assert torch.equal(r0["centroids"], r1["centroids"])
    assert r0["inertia"] == r1["inertia"] and r0["history"] == r1["history"]
    assert (r0["reseeded"], r0["iters_run"]) == (r1["reseeded"], r1["iters_run"])
    assert r0["assignment"].shape == (cfg["split"],)
    assert r1["assignment"].shape == (cfg["n"] - cfg["split"],)

    x, w = _data(cfg)
    single = _run(cfg, x, w)
    assert torch.allclose(r0["centroids"], single.centroids, atol=1e-4, rtol=0), \
        float((r0["centroids"] - single.centroids).abs().max())
    assert r0["inertia"] == pytest.approx(single.inertia, rel=1e-6, abs=1e-6)
    assert r0["history"] == pytest.approx(single.inertia_history, rel=1e-6, abs=1e-6)
    assert (r0["reseeded"], r0["iters_run"]) == (single.reseeded, single.iters_run)
    assert torch.equal(torch.cat([r0["assignment"], r1["assignment"]]), single.assignment)
    assert all(torch.isfinite(torch.tensor(r0["history"])))
    if name == "k_exceeds_n_empty_rank":
        assert r0["reseeded"] > 0 and r0["inertia"] < 1e-4
