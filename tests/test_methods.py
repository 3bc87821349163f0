"""Every compression method's forward equals a plain-indexing reference built from the module's
own codebook weights and hashes recomputed from first principles (conftest.ref_hash, a pure-
Python splitmix64), for single/multi/empty bags, weighted and unweighted, SUM and MEAN, and a
table serving two features. Also: CCE assignment semantics, gradients, and training.

Pooled semantics checked here (fbgemm's, per logical table):
* SUM: sum_j w_j e(x_j); MEAN: sum_j w_j e(x_j) / bag length (empty bag -> 0).
* QR-mult is not linear; its pooled form pools each codebook first, as the DLRM reference's
  QREmbeddingBag does: SUM -> (sum_j w_j Q[q_j]) * (sum_j w_j R[r_j]) (elementwise), so a
  single-id bag with weight w gives w**2 * Q[q] * R[r]; MEAN -> mean(Q) * mean(R).
"""

import pytest
import torch
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType

from conftest import make_kjt, ref_combine, ref_forward, ref_hash
from torchrec_cce import (CCEConfig, CEConfig, CCEEmbeddingBagCollection, HashingTrickConfig,
                          MEmComConfig, QRConfig)
from torchrec_cce.hashing import derive_seed

# method -> configs for t0 (V=100, dim 8, features f0 and f1) and t1 (V=37, dim 6, feature g).
METHODS = {
    "full": None,
    "hashing": (HashingTrickConfig(rows=16, seed=1), HashingTrickConfig(rows=7)),
    "ce": (CEConfig(rows=16, chunks=4, seed=2), CEConfig(rows=7, chunks=2)),
    "qr_mult": (QRConfig(collisions=10, operation="mult"), QRConfig(collisions=6)),
    "qr_add": (QRConfig(collisions=10, operation="add"), QRConfig(collisions=6, operation="add")),
    "qr_concat": (QRConfig(collisions=10, operation="concat"),
                  QRConfig(collisions=6, operation="concat")),
    "memcom": (MEmComConfig(rows=8, seed=3), MEmComConfig(rows=4)),
    "cce": (CCEConfig(rows=8, chunks=4, seed=4), CCEConfig(rows=5, chunks=2)),
}

BAGS = {
    "f0": [[5], [1, 99, 5], [], [42, 42]],
    "f1": [[], [0], [7, 8, 9, 10], [63]],
    "g": [[36], [], [0, 1, 2, 3, 4], [20, 20, 21]],
}


def bag_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f: [[float(torch.rand(1, generator=g)) * 2 + 0.1 for _ in bag] for bag in bags]
            for f, bags in BAGS.items()}


def tables(pooling=PoolingType.SUM):
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100,
                           feature_names=["f0", "f1"], pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=6, num_embeddings=37,
                           feature_names=["g"], pooling=pooling),
    ]


def build(method, pooling=PoolingType.SUM, weighted=False, seed=0):
    torch.manual_seed(seed)
    cfgs = METHODS[method]
    compression = {} if cfgs is None else {"t0": cfgs[0], "t1": cfgs[1]}
    ebc = CCEEmbeddingBagCollection(tables(pooling), compression, is_weighted=weighted)
    # Non-trivial per-id weights for MEmCom (init is all ones) and non-hash CCE state.
    with torch.no_grad():
        for m in ebc.tables.values():
            if m.method_name == "memcom":
                m.id_weight.uniform_(0.5, 1.5)
    return ebc


def check_against_reference(ebc, bags, weights=None, atol=1e-6):
    out = ebc(make_kjt(bags, weights))
    ref = ref_forward(ebc, bags, weights)
    assert out.keys() == list(bags)
    got = out.to_dict()
    for f in bags:
        torch.testing.assert_close(got[f], ref[f], atol=atol, rtol=1e-5)
    return got


def _case_params():
    for method in METHODS:
        for pooling in (PoolingType.SUM, PoolingType.MEAN):
            for weighted in (False, True):
                yield pytest.param(method, pooling, weighted,
                                   id=f"{method}-{pooling.name}-{'w' if weighted else 'unw'}")


@pytest.mark.parametrize("method,pooling,weighted", list(_case_params()))
def test_forward_matches_reference(method, pooling, weighted):
    ebc = build(method, pooling, weighted)
    w = bag_weights() if weighted else None
    got = check_against_reference(ebc, BAGS, w)
    # Empty bags pool to exactly 0.
    assert torch.equal(got["f0"][2], torch.zeros(8))
    assert torch.equal(got["g"][1], torch.zeros(6))
    # The output is not trivially zero.
    assert float(got["f1"].abs().sum()) > 0


@pytest.mark.parametrize("method", list(METHODS))
def test_weighted_module_without_kjt_weights_is_unit_weights(method):
    ebc = build(method, weighted=True)
    check_against_reference(ebc, BAGS, None)


def test_qr_mult_mean_on_single_id_bags_is_q_times_r():
    # Where both readings of MEAN agree (bags of length <= 1), QR-mult MEAN is exact.
    ebc = build("qr_mult", PoolingType.MEAN)
    bags = {"f0": [[5], [], [99]], "f1": [[0], [12], []], "g": [[36], [3], []]}
    check_against_reference(ebc, bags)


def test_qr_mult_mean_of_repeated_id_is_its_embedding():
    ebc = build("qr_mult", PoolingType.MEAN)
    single = ebc(make_kjt({"f0": [[13]], "f1": [[]], "g": [[]]})).to_dict()["f0"]
    double = ebc(make_kjt({"f0": [[13, 13]], "f1": [[]], "g": [[]]})).to_dict()["f0"]
    torch.testing.assert_close(double, single)


def test_qr_mult_sum_pooled_semantics_is_product_of_sums():
    # Documented: (sum_j Q[q_j]) * (sum_j R[r_j]), not sum_j Q[q_j] * R[r_j].
    ebc = build("qr_mult")
    q = ebc.codebooks.embedding_bags["t0__qr_q"].weight
    r = ebc.codebooks.embedding_bags["t0__qr_r"].weight
    bags = {"f0": [[13, 57]], "f1": [[]], "g": [[]]}
    got = ebc(make_kjt(bags)).to_dict()["f0"][0]
    expect = (q[1] + q[5]) * (r[3] + r[7])
    torch.testing.assert_close(got, expect)
    assert not torch.allclose(got, q[1] * r[3] + q[5] * r[7])


def test_qr_concat_odd_dim_splits_floor_ceil():
    t = [EmbeddingBagConfig(name="t", embedding_dim=7, num_embeddings=50, feature_names=["f"])]
    ebc = CCEEmbeddingBagCollection(t, {"t": QRConfig(collisions=8, operation="concat")})
    assert ebc.codebooks.embedding_bags["t__qr_q"].weight.shape == (7, 3)
    assert ebc.codebooks.embedding_bags["t__qr_r"].weight.shape == (8, 4)
    check_against_reference(ebc, {"f": [[0], [49, 17], [], [8]]})


@pytest.mark.parametrize("method", ["hashing", "ce", "qr_mult", "qr_add", "qr_concat",
                                    "memcom", "cce"])
def test_out_of_range_ids_use_hash_or_modulo(method):
    ebc = build(method)
    huge = [-1, -100, 100, 101, 2**40, -(2**63), 2**63 - 1, 0xFFFFFFFF]
    bags = {"f0": [[x] for x in huge], "f1": [[x, 3] for x in huge],
            "g": [[x] for x in reversed(huge)]}
    got = check_against_reference(ebc, bags)
    assert all(bool(torch.isfinite(v).all()) for v in got.values())


@pytest.mark.parametrize("method", ["hashing", "ce", "memcom", "cce"])
def test_remap_helpers_agree_with_first_principles(method):
    ebc = build(method)
    m = ebc.tables["t0"]
    ids = torch.tensor([0, 1, 99, -5, 2**62, 1234567])
    cfg = METHODS[method][0]
    streams = m.remap(ids)
    if method == "hashing":
        assert streams[0].tolist() == [ref_hash(x, derive_seed(1, "t0", 0, "hash"), 16)
                                       for x in ids.tolist()]
    elif method == "ce":
        for i in range(4):
            assert streams[i].tolist() == [
                i * 16 + ref_hash(x, derive_seed(2, "t0", i, "ce"), 16) for x in ids.tolist()]
    elif method == "memcom":
        assert streams[0].tolist() == [ref_hash(x, derive_seed(3, "t0", 0, "memcom"), 8)
                                       for x in ids.tolist()]
        torch.testing.assert_close(m.id_weights(ids), m.id_weight[ids % 100, 0])
    else:
        p, h = m.lookup_assignment(ids), m.bucket(ids)
        for i in range(cfg.chunks):
            # Initial assignment is the "p" hash for every id, in range or not.
            assert p[:, i].tolist() == [ref_hash(x, derive_seed(4, "t0", i, "p"), 8)
                                        for x in ids.tolist()]
            hk = ref_combine(derive_seed(4, "t0", i, "h"), 0)
            assert h[:, i].tolist() == [ref_hash(x, hk, 8) for x in ids.tolist()]
            # Chunk i holds A_i in rows [16i, 16i + 8) and B_i in [16i + 8, 16i + 16) of the
            # one codebook table: 2 rows per id.
            assert streams[i].tolist() == [[16 * i + a, 16 * i + 8 + b] for a, b in zip(
                p[:, i].tolist(), h[:, i].tolist())]


# ---------------------------------------------------------------- CCE-specific state
def test_cce_custom_assignment_changes_output():
    ebc = build("cce")
    m = ebc.tables["t0"]
    w = ebc.codebooks.embedding_bags["t0__cce"].weight  # chunk i: A_i, B_i in rows [16i, 16i+16)
    c0, c1 = w[:16], w[16:32]
    kjt_bags = {"f0": [[5], [77]], "f1": [[0], []], "g": [[1], [2]]}
    before = ebc(make_kjt(kjt_bags)).to_dict()["f0"]
    with torch.no_grad():
        p = m.dense_assignment()
        p[:, 0] = 3                     # every id -> row 3 of A_0
        p[:, 1] = torch.arange(100) % 8
        m.write_assignment(torch.arange(100), p)
    after = ebc(make_kjt(kjt_bags)).to_dict()["f0"]
    h0 = [ref_hash(x, ref_combine(derive_seed(4, "t0", 0, "h"), 0), 8) for x in (5, 77)]
    for row, x in enumerate((5, 77)):
        torch.testing.assert_close(after[row, :2], c0[3] + c0[8 + h0[row]])
        torch.testing.assert_close(after[row, 2:4], c1[x % 8] + c1[8 + m.bucket(
            torch.tensor([x]))[0, 1]])
    assert not torch.allclose(before, after)
    check_against_reference(ebc, BAGS)


def test_cce_out_of_range_ids_ignore_assignment_and_stay_in_bounds():
    ebc = build("cce")
    m = ebc.tables["t0"]
    with torch.no_grad():
        m.write_assignment(torch.arange(100), torch.full((100, 4), 7))
    ids = torch.tensor([-1, 100, 2**63 - 1, -(2**63), 5])
    p = m.lookup_assignment(ids)
    assert torch.equal(p[:4], m.hash_assignment(ids[:4]))
    assert p[4].tolist() == [7, 7, 7, 7]
    assert int(p.min()) >= 0 and int(p.max()) < 8
    for i in range(4):
        assert p[:4, i].tolist() == [ref_hash(x, derive_seed(4, "t0", i, "p"), 8)
                                     for x in ids[:4].tolist()]
    check_against_reference(ebc, {"f0": [[-1, 100], [2**63 - 1]], "f1": [[-(2**63)], [5]],
                                  "g": [[37], [-37]]})


def test_cce_h_generation_changes_buckets():
    ebc = build("cce")
    m = ebc.tables["t0"]
    ids = torch.arange(100)
    h0 = m.bucket(ids)
    m.h_generation.fill_(1)
    h1 = m.bucket(ids)
    assert h1[:, 0].tolist() == [ref_hash(x, ref_combine(derive_seed(4, "t0", 0, "h"), 1), 8)
                                 for x in range(100)]
    assert float((h0 == h1).double().mean()) < 0.3  # ~1/8 expected
    check_against_reference(ebc, BAGS)


@pytest.mark.parametrize("rows,bits", [(8, 3), (32768, 15), (32769, 16), (40000, 16)])
def test_cce_assignment_is_packed(rows, bits):
    t = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=100_000,
                            feature_names=["f"])]
    ebc = CCEEmbeddingBagCollection(t, {"t": CCEConfig(rows=rows, chunks=2)},
                                    device=torch.device("meta"))
    a = ebc.tables["t"].assignment  # ceil(log2 rows) bits per entry, in int32 words
    assert a.dtype == torch.int32 and tuple(a.shape) == (-(-100_000 * 2 * bits // 32),)


def test_cce_initial_assignment_is_hash_of_all_ids():
    ebc = build("cce")
    m = ebc.tables["t1"]
    assert m.assignment.dtype == torch.int32
    expect = [[ref_hash(x, derive_seed(0, "t1", i, "p"), 5) for i in range(2)] for x in range(37)]
    assert m.dense_assignment().tolist() == expect


# ---------------------------------------------------------------- gradients and training
def _params(ebc):
    ps = [bag.weight for bag in ebc.codebooks.embedding_bags.values()]
    ps += [m.id_weight for m in ebc.tables.values() if m.method_name == "memcom"]
    return ps


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("weighted", [False, True])
def test_gradients_match_reference_and_reach_every_codebook(method, weighted):
    ebc = build(method, weighted=weighted)
    w = bag_weights(1) if weighted else None
    out = ebc(make_kjt(BAGS, w)).to_dict()
    ref = ref_forward(ebc, BAGS, w)
    g = torch.Generator().manual_seed(2)
    proj = {f: torch.randn(v.shape, generator=g) for f, v in out.items()}
    params = _params(ebc)
    grads = torch.autograd.grad(sum((out[f] * proj[f]).sum() for f in out), params)
    ref_grads = torch.autograd.grad(sum((ref[f] * proj[f]).sum() for f in ref), params)
    for p, gm, gr in zip(params, grads, ref_grads):
        torch.testing.assert_close(gm, gr, atol=1e-5, rtol=1e-4)
        assert float(gm.abs().sum()) > 0, f"no gradient reaches a parameter of shape {p.shape}"


@pytest.mark.parametrize("method", list(METHODS))
def test_sgd_reduces_regression_loss(method):
    ebc = build(method)
    bags = {"f0": [[3], [10, 11], [50], [3, 90]],
            "f1": [[21], [22], [26], [23, 24, 25]],
            "g": [[1], [2, 30], [31], [4]]}
    kjt = make_kjt(bags)
    g = torch.Generator().manual_seed(3)
    target = torch.randn(4, 8 + 8 + 6, generator=g)
    opt = torch.optim.SGD(ebc.parameters(), lr=0.1)
    losses = []
    for _ in range(50):
        loss = ((ebc(kjt).values() - target) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_gain_probe_hash_mult_is_product_of_two_hashed_codebooks(monkeypatch):
    """benchmarks/gain_probe.py's hash_mult table (the multiplicative-composition probe):
    SUM-pooled output == (sum_j w_j A[h1(x_j)]) * (sum_j w_j B[h2(x_j)]), with h1/h2 recomputed
    by the reference hash, for multi-id, empty and weighted bags."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import gain_probe
    from torchrec_cce import modules

    monkeypatch.setattr(modules, "build_table", gain_probe._with_hash_mult(modules.build_table))
    t = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=50, feature_names=["f"])]
    ebc = CCEEmbeddingBagCollection(t, {"t": gain_probe.HashMultConfig(rows=7, seed=3)},
                                    is_weighted=True)
    a = ebc.codebooks.embedding_bags["t__hm_a"].weight.detach()
    b = ebc.codebooks.embedding_bags["t__hm_b"].weight.detach()
    k1, k2 = (derive_seed(3, "t", i, "hash_mult") for i in range(2))
    bags, weights = [[3, 41, 3], [], [49]], [[0.5, 2.0, 1.5], [], [3.0]]
    got = ebc(make_kjt({"f": bags}, {"f": weights})).to_dict()["f"].detach()
    for row, (bag, w) in enumerate(zip(bags, weights)):
        pa = sum((wj * a[ref_hash(x, k1, 7)] for x, wj in zip(bag, w)), torch.zeros(4))
        pb = sum((wj * b[ref_hash(x, k2, 7)] for x, wj in zip(bag, w)), torch.zeros(4))
        torch.testing.assert_close(got[row], pa * pb)
    assert float(got[0].abs().sum()) > 0
