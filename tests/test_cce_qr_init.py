"""``CCEConfig(init="qr")``: CCE whose initial ``(p, h)`` is the quotient/remainder of a per-chunk
affine permutation of the id (unique pairs per chunk, like QR-add), re-clustered like any CCE.

Expected values are recomputed from first principles: Python-int affine maps, ``torch.cdist``
nearest centroids, bucket means from explicit member lists.
"""

import math

import pytest
import torch
from torchrec import EmbeddingBagConfig

from conftest import make_kjt
from test_recluster import build, check_recluster_state, embed, stacked_ab, train_random
from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection
from torchrec_cce.api import recluster


def _table(V: int, dim: int = 8) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=V, feature_names=["f"])


def _ref_pair(V: int, rows: int, a: int, b: int, x: int):
    x = x % V
    xp = (a * x + b) % V
    return (xp // rows) % rows, xp % rows


@pytest.mark.parametrize("V,rows,chunks", [(4082, 64, 4), (1000, 32, 2), (997, 32, 4),
                                           (1024, 32, 1), (4096, 64, 4), (50, 8, 2),
                                           (3, 2, 1)])
def test_pairs_unique_per_chunk_before_clustering(V, rows, chunks):
    """Over every id: (p_i, h_i) is unique per chunk, and p_i * rows + h_i is a permutation of
    [0, V) (so the map really is a bijection followed by quotient/remainder)."""
    assert rows * rows >= V
    ebc = CCEEmbeddingBagCollection([_table(V)], {"t": CCEConfig(rows=rows, chunks=chunks,
                                                                 init="qr")}, allow_larger=True)
    m = ebc.tables["t"]
    ids = torch.arange(V)
    p, h = m.lookup_assignment(ids), m.bucket(ids)  # the stored p and the current h
    assert p.shape == h.shape == (V, chunks)
    assert int(p.max()) < rows and int(h.max()) < rows and int(p.min()) >= 0
    for i in range(chunks):
        code = p[:, i] * rows + h[:, i]
        assert torch.equal(torch.sort(code).values, ids), f"chunk {i} is not a bijection"
        a, b = m.qr_affine[i]
        assert math.gcd(a, V) == 1 and 1 <= a and 0 <= b < V
        expect = torch.tensor([_ref_pair(V, rows, a, b, x) for x in range(V)])
        assert torch.equal(p[:, i], expect[:, 0]) and torch.equal(h[:, i], expect[:, 1])
    # The remap streams the codebook EBC sees: chunk i's rows (2i*rows + p, (2i+1)*rows + h).
    streams = m.remap(ids)
    for i, s in enumerate(streams):
        assert torch.unique(s[:, 0] * (4 * chunks * rows) + s[:, 1]).numel() == V
        assert torch.equal(s[:, 0], p[:, i] + 2 * i * rows)
        assert torch.equal(s[:, 1], h[:, i] + (2 * i + 1) * rows)


def test_chunks_use_different_permutations():
    m = CCEEmbeddingBagCollection([_table(4082)], {"t": CCEConfig(rows=64, chunks=4, init="qr")}
                                  ).tables["t"]
    assert len(set(m.qr_affine)) == 4


def test_forward_equals_reference_including_out_of_range_ids():
    V, rows, c, dim = 500, 24, 2, 8
    torch.manual_seed(0)
    ebc = CCEEmbeddingBagCollection([_table(V, dim)], {"t": CCEConfig(rows=rows, chunks=c,
                                                                      init="qr", seed=7)})
    m = ebc.tables["t"]
    assert m.stream_specs()[1].qr_mul == m.qr_affine[1][0]  # the fused op computes the pairs
    A, B = (x.view(c, rows, dim // c) for x in stacked_ab(ebc, "t"))
    bags = [[3], [0, 499], [-1, 500, 1234567], [17, 17, 250]]
    out = ebc(make_kjt({"f": bags})).to_dict()["f"]
    for row, bag in zip(out, bags):
        expect = torch.zeros(dim)
        for x in bag:
            parts = []
            for i in range(c):
                pi, hi = _ref_pair(V, rows, *m.qr_affine[i], x)
                parts.append(A[i, pi] + B[i, hi])
            expect += torch.cat(parts)
        torch.testing.assert_close(row, expect, atol=1e-6, rtol=1e-6)


def _recluster_qr(keep: bool, assigned=None):
    spec = [("big", 300, 8, CCEConfig(rows=18, chunks=2, seed=3, init="qr", keep_remainder=keep,
                                      assigned_ids=assigned))]
    ebc = build(spec)
    train_random(ebc, steps=40)
    old = embed(ebc, "big", torch.arange(300))
    m = ebc.tables["big"]
    before_p, before_h = m.lookup_assignment(torch.arange(300)), m.bucket(torch.arange(300))
    stats = recluster(ebc)["big"]
    return ebc, old, before_p, before_h, stats


def test_recluster_fresh_hash_is_the_papers_rule():
    """keep_remainder=False: after clustering the state is exactly hashed-init CCE's (nearest
    centroid p, h of the next hash generation, B = mean residuals per bucket)."""
    ebc, old, before_p, _, stats = _recluster_qr(keep=False)
    assert stats["kmeans_inertia_end"] <= stats["kmeans_inertia_start"]
    got = check_recluster_state(ebc, "big", old, old_gen=0)
    assert not torch.equal(got["p"], before_p)


def test_recluster_keeps_remainder():
    """keep_remainder=True: p = nearest new centroid, h stays the remainder, B_i[j] = mean
    residual of the ids with remainder j, and the forward uses exactly that state."""
    ebc, old, before_p, before_h, _ = _recluster_qr(keep=True)
    m = ebc.tables["big"]
    V, c, rows, cd = 300, 2, 18, 4
    ids = torch.arange(V)
    assert int(m.h_generation) == 1
    h = m.bucket(ids)
    assert torch.equal(h, before_h)  # still the deterministic remainder
    p = m.dense_assignment()
    assert not torch.equal(p, before_p)
    A, B = (x.view(c, rows, cd).double() for x in stacked_ab(ebc, "big"))
    old_c = old.view(V, c, cd).double()
    for i in range(c):
        d = torch.cdist(old_c[:, i], A[i])
        assert bool((d.gather(1, p[:, i:i + 1]).squeeze(1) <= d.min(1).values + 1e-5).all())
        resid = old_c[:, i] - A[i][p[:, i]]
        for j in range(rows):
            members = (h[:, i] == j).nonzero().flatten()
            expect = resid[members].mean(0) if members.numel() else torch.zeros(cd, dtype=torch.float64)
            torch.testing.assert_close(B[i, j], expect, atol=1e-5, rtol=1e-4)
    new = embed(ebc, "big", ids).view(V, c, cd).double()
    for i in range(c):
        torch.testing.assert_close(new[:, i], A[i][p[:, i]] + B[i][h[:, i]], atol=1e-6, rtol=1e-6)
    # Re-clustering moved every id at most to its centroid plus its bucket's mean residual.
    err = (new - old_c).norm(dim=-1)
    assert float(err.mean()) < float(old_c.norm(dim=-1).mean())


def test_uncovered_ids_keep_their_unique_pair_after_recluster():
    ebc, _, before_p, before_h, _ = _recluster_qr(keep=True, assigned=100)
    m = ebc.tables["big"]
    ids = torch.arange(100, 300)
    assert torch.equal(m.lookup_assignment(ids), before_p[100:])
    assert torch.equal(m.bucket(ids), before_h[100:])
    assert not torch.equal(m.lookup_assignment(torch.arange(100)), before_p[:100])


@pytest.mark.parametrize("kw,match", [({"init": "kmeans"}, "init must be 'hash' or 'qr'"),
                                      ({"keep_remainder": True}, "keep_remainder=True needs")])
def test_bad_init_options_name_the_table(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        CCEEmbeddingBagCollection([_table(100)], {"t": CCEConfig(rows=8, **kw)})
    assert "'t'" in str(e.value)
