"""HotSketch (torchrec_cce/hot_sketch.py): top-k of a planted Zipf stream against the true
counts, exact levels against a brute-force count, linearity across ranks (two real gloo
processes each seeing half the stream end with the counters and hot set of one process seeing
all of it) and across save/load mid-stream."""

import math

import pytest
import torch

from multiprocess import run_multiprocess
from torchrec_cce.clustering.kmeans import default_collective
from torchrec_cce.hot_sketch import HotSketch

V, DRAWS, K = 100_000, 1_000_000, 1000


def zipf_stream(num_ids: int, draws: int, a: float = 1.1, seed: int = 0) -> torch.Tensor:
    """``draws`` ids with P(rank r) ~ r^-a, the ranks assigned to ids by a random permutation
    (so the hot ids are scattered over [0, num_ids), not a prefix)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.arange(1, num_ids + 1, dtype=torch.float64) ** -a
    ranks = torch.multinomial(p, draws, replacement=True, generator=g)
    return torch.randperm(num_ids, generator=g)[ranks]


def true_top_k(stream: torch.Tensor, num_ids: int, k: int):
    """Ids by true count descending then id ascending (the first ``k``), and all counts."""
    counts = torch.bincount(stream, minlength=num_ids)
    ids = torch.arange(num_ids)
    order = sorted(range(num_ids), key=lambda i: (-int(counts[i]), i))
    return ids[order[:k]], counts


def observe_all(sketch: HotSketch, stream: torch.Tensor, batch: int = 4096) -> None:
    for b in stream.split(batch):
        sketch.observe(b)


@pytest.fixture(scope="module")
def stream():
    return zipf_stream(V, DRAWS)


def test_zipf_top_k_recall_and_error_bound(stream):
    sketch = HotSketch(V, width=16384, depth=4, table="t")
    assert not sketch.exact[0]  # level 0 really is a Count-Min sketch (65,536 counters < V)
    observe_all(sketch, stream)
    sketch.sync()
    assert sketch.total == DRAWS
    ids, est = sketch.top_k(K)
    want, counts = true_top_k(stream, V, K)
    recall = len(set(ids.tolist()) & set(want.tolist())) / K
    assert recall >= 0.95, recall
    # Never undercounts; ordered by estimate then id.
    assert torch.all(est >= counts[ids])
    assert torch.equal(est, sketch.estimate(ids))
    assert all((-int(est[i]), int(ids[i])) < (-int(est[i + 1]), int(ids[i + 1]))
               for i in range(K - 1))
    # Every id beating the (k+1)-th true count by more than the error bound e/W*N is found.
    kth1 = int(counts.sort(descending=True).values[K])
    must = torch.nonzero(counts > kth1 + math.e / sketch.width * DRAWS).flatten()
    assert must.numel() > 100
    assert set(must.tolist()) <= set(ids.tolist())


def test_exact_levels_give_the_true_top_k():
    num_ids = 3000
    s = zipf_stream(num_ids, 50_000, seed=3)
    sketch = HotSketch(num_ids, width=1024, depth=4, table="t")  # 4096 counters >= 3000
    assert all(sketch.exact)
    observe_all(sketch, s, batch=999)
    sketch.sync()
    want, counts = true_top_k(s, num_ids, 200)
    ids, est = sketch.top_k(200)
    assert torch.equal(ids, want)
    assert torch.equal(est.long(), counts[want])
    # Fewer seen ids than k: only the seen ones, zero counts never returned.
    few = HotSketch(num_ids, width=1024, depth=4)
    few.observe(torch.tensor([5, 7, 5, 2999]))
    few.sync()
    ids, est = few.top_k(10)
    assert ids.tolist() == [5, 7, 2999] and est.tolist() == [2, 1, 1]


def test_save_load_mid_stream_equals_uninterrupted(stream):
    part = stream[:200_000]
    whole = HotSketch(V, width=4096, depth=3, table="t")
    observe_all(whole, part)
    whole.sync()
    first = HotSketch(V, width=4096, depth=3, table="t")
    observe_all(first, part[:70_001])  # not synced: the state holds pending counts
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = HotSketch(V, width=4096, depth=3, table="t")
    resumed.load_state_dict(saved)
    observe_all(resumed, part[70_001:])
    resumed.sync()
    assert torch.equal(resumed.counts, whole.counts)
    assert torch.equal(resumed.top_k(500)[0], whole.top_k(500)[0])


def test_bad_input_names_the_table():
    sketch = HotSketch(100, table="t_user")
    with pytest.raises(ValueError, match="t_user.*id 100 is outside"):
        sketch.observe(torch.tensor([3, 100]))
    with pytest.raises(ValueError, match="t_user.*id -1 is outside"):
        sketch.observe(torch.tensor([-1]))
    with pytest.raises(ValueError, match="t_user.*width"):
        HotSketch(100, width=0, table="t_user")


def _two_ranks(rank: int, world_size: int, stream: torch.Tensor):
    sketch = HotSketch(V, width=4096, depth=3, table="t")
    mine = stream[rank::world_size]  # interleaved halves, different order per rank
    observe_all(sketch, mine.flip(0) if rank else mine, batch=3000)
    sketch.sync(default_collective())
    return sketch.counts, sketch.top_k(500)


def test_two_ranks_equal_one_process_seeing_the_union(stream):
    part = stream[:300_000]
    results = run_multiprocess(_two_ranks, 2, part, timeout=180)
    single = HotSketch(V, width=4096, depth=3, table="t")
    observe_all(single, part)
    single.sync()
    ids, est = single.top_k(500)
    for counts, (r_ids, r_est) in results:
        assert torch.equal(counts, single.counts)
        assert torch.equal(r_ids, ids) and torch.equal(r_est, est)


def test_int32_counters_halve_at_the_limit_and_refuse_overflow(monkeypatch):
    import torchrec_cce.hot_sketch as hs

    monkeypatch.setattr(hs, "LIMIT", 64)  # the int32 bound, scaled down
    sketch = HotSketch(100, width=64, depth=2, table="t_user")
    assert sketch.counts.dtype == sketch.pending.dtype == torch.int32
    sketch.observe(torch.tensor([5] * 40 + [9] * 21 + [3]))
    sketch.sync()
    assert not sketch.halve_if_large()  # 40 < 64
    sketch.observe(torch.tensor([5] * 30 + [9] * 3))
    sketch.sync()
    assert sketch.halve_if_large()  # 70 >= 64: every counter halved, rounding down
    ids, est = sketch.top_k(3)
    assert (ids.tolist(), est.tolist()) == ([5, 9], [35, 12])  # id 3: 1 -> 0, no longer seen
    with pytest.raises(ValueError, match="t_user.*migrate more often"):
        sketch.observe(torch.zeros(64, dtype=torch.int64))
