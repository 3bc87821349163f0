"""CCEEmbeddingBagCollection as a drop-in EmbeddingBagCollection: DLRM, interface methods,
meta-device construction, state_dict round trips and equality with the stock EBC."""

import copy
import io

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import PoolingType

from conftest import make_kjt, ref_forward
from torchrec_cce import (CCEConfig, CEConfig, CCEEmbeddingBagCollection, HashingTrickConfig,
                          MEmComConfig, QRConfig, memory_report)

D = 8
METHODS = {
    "full": lambda: None,
    "hashing": lambda: HashingTrickConfig(rows=16, seed=1),
    "ce": lambda: CEConfig(rows=16, chunks=4, seed=2),
    "qr_mult": lambda: QRConfig(collisions=10),
    "qr_add": lambda: QRConfig(collisions=10, operation="add"),
    "qr_concat": lambda: QRConfig(collisions=10, operation="concat"),
    "memcom": lambda: MEmComConfig(rows=8, seed=3),
    "cce": lambda: CCEConfig(rows=8, chunks=4, seed=4),
}
BAGS = {"u0": [[1], [2, 3], [], [99, 4]], "u1": [[5], [6], [7, 8, 9], []],
        "i": [[0], [49, 1], [2], [3]]}


def tables(pooling_i=PoolingType.SUM):
    return [
        EmbeddingBagConfig(name="t_user", embedding_dim=D, num_embeddings=100,
                           feature_names=["u0", "u1"]),
        EmbeddingBagConfig(name="t_item", embedding_dim=D, num_embeddings=50,
                           feature_names=["i"], pooling=pooling_i),
    ]


def build(method, seed=0, device=None, pooling_i=PoolingType.SUM):
    torch.manual_seed(seed)
    cfg = METHODS[method]()
    compression = {} if cfg is None else {"t_user": cfg, "t_item": METHODS[method]()}
    return CCEEmbeddingBagCollection(tables(pooling_i), compression, device=device)


# ---------------------------------------------------------------- DLRM
@pytest.mark.parametrize("method", list(METHODS))
def test_dlrm_accepts_module_and_trains(method):
    ebc = build(method)
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=4,
                 dense_arch_layer_sizes=[16, D], over_arch_layer_sizes=[16, 1])
    assert model.sparse_arch.embedding_bag_collection is ebc
    # Identical dense rows: only the sparse (embedding) path can tell the examples apart.
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(1, 4, generator=g).expand(4, 4).contiguous()
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    kjt = make_kjt(BAGS)
    logits = model(dense, kjt)
    assert logits.shape == (4, 1) and bool(torch.isfinite(logits).all())
    codebooks = {n: b.weight.detach().clone() for n, b in ebc.codebooks.embedding_bags.items()}
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(15):
        loss = loss_fn(model(dense, kjt).squeeze(1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) == 1:  # the first step already moves every codebook
            for n, b in ebc.codebooks.embedding_bags.items():
                assert not torch.equal(b.weight, codebooks[n]), n
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- interface
def test_embedding_bag_configs_are_the_logical_tables():
    ebc = build("cce")
    cfgs = ebc.embedding_bag_configs()
    assert [(c.name, c.num_embeddings, c.embedding_dim, c.feature_names) for c in cfgs] == [
        ("t_user", 100, D, ["u0", "u1"]), ("t_item", 50, D, ["i"])]
    # ... and the codebook tables are the inner, separate list.
    inner = sorted((c.name, c.num_embeddings, c.embedding_dim)
                   for c in ebc.codebooks.embedding_bag_configs())
    # CCE: one table, A_i and B_i of every chunk stacked (2 * chunks * rows rows of dim / chunks).
    assert inner == [("t_item__cce", 64, 2), ("t_user__cce", 64, 2)]


def test_is_weighted():
    t = tables()
    assert CCEEmbeddingBagCollection(t).is_weighted() is False
    assert CCEEmbeddingBagCollection(tables(), is_weighted=True).is_weighted() is True
    # MEmCom makes the *inner* EBC weighted, never the logical interface.
    m = CCEEmbeddingBagCollection(tables(), {"t_user": MEmComConfig(rows=8)})
    assert m.is_weighted() is False and m.codebooks.is_weighted() is True


# ---------------------------------------------------------------- meta device
@pytest.mark.parametrize("device", ["meta", torch.device("meta")])
def test_meta_construction_allocates_nothing_and_reports_exact_bytes(device):
    big = [EmbeddingBagConfig(name="t_big", embedding_dim=16, num_embeddings=10_000_000,
                              feature_names=["b"]),
           EmbeddingBagConfig(name="t_small", embedding_dim=16, num_embeddings=1000,
                              feature_names=["s"])]
    ebc = CCEEmbeddingBagCollection(big, {"t_big": CCEConfig(rows=4096, chunks=4)}, device=device)
    tensors = list(ebc.parameters()) + list(ebc.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    report = memory_report(ebc)
    b = report["t_big"]
    assert b["full_bytes"] == 10_000_000 * 16 * 4
    assert b["codebook_bytes"] == 2 * (4 * 4096) * 4 * 4
    assert b["assignment_bytes"] == 10_000_000 * 4 * 12 // 8   # packed: 12 bits for 4096 rows
    assert b["compressed_bytes"] == 2 * (4 * 4096) * 4 * 4 + 10_000_000 * 4 * 12 // 8 + 8
    assert report["t_small"]["compressed_bytes"] == 1000 * 16 * 4
    assert report["t_small"]["ratio"] == 1


@pytest.mark.parametrize("method", list(METHODS))
def test_meta_report_equals_cpu_report(method):
    assert memory_report(build(method, device="meta")) == memory_report(build(method))


# ---------------------------------------------------------------- state_dict
def _scramble(ebc, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ebc.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", list(METHODS))
def test_state_dict_round_trip(method):
    src = build(method, seed=1, pooling_i=PoolingType.MEAN)
    _scramble(src, 1)
    if method == "cce":
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for m in src.tables.values():
                m.write_assignment(torch.arange(m.num_embeddings), torch.randint(
                    0, m.rows, (m.num_embeddings, m.chunks), generator=g))
                m.h_generation.fill_(3)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    dst = build(method, seed=2, pooling_i=PoolingType.MEAN)
    kjt = make_kjt(BAGS)
    expected = src(kjt).values()
    assert not torch.allclose(dst(kjt).values(), expected)  # the load below must matter
    dst.load_state_dict(state)  # strict
    assert torch.equal(dst(kjt).values(), expected)
    ref = torch.cat(list(ref_forward(src, BAGS).values()), 1)
    torch.testing.assert_close(expected, ref)
    if method == "cce":
        for name, m in dst.tables.items():
            assert torch.equal(m.assignment, src.tables[name].assignment)
            assert torch.equal(m.dense_assignment(), src.tables[name].dense_assignment())
            assert m.assignment.dtype == torch.int32
            assert int(m.h_generation) == 3


def test_cce_state_dict_holds_assignment_and_generation():
    ebc = build("cce")
    sd = ebc.state_dict()
    m = ebc.tables["t_user"]  # packed: 100 ids x 4 chunks x ceil(log2 rows) bits, int32 words
    assert sd["tables.t_user.assignment"].shape == (-(-100 * 4 * m.assignment_bits // 32),)
    assert sd["tables.t_user.h_generation"].dtype == torch.int64
    assert not any("reservoir" in k for k in sd)  # training state, not model state


# ---------------------------------------------------------------- vs stock EBC
def test_keyed_tensor_layout_matches_stock_ebc():
    t = [EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=30, feature_names=["x", "y"]),
         EmbeddingBagConfig(name="b", embedding_dim=12, num_embeddings=20, feature_names=["z"],
                            pooling=PoolingType.MEAN),
         EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=40, feature_names=["w"])]
    stock = EmbeddingBagCollection(tables=copy.deepcopy(t))
    ours = CCEEmbeddingBagCollection(copy.deepcopy(t), {"a": CCEConfig(rows=4, chunks=2),
                                                        "b": QRConfig(collisions=5)})
    # KJT keys in a different order than the tables: the output follows the tables.
    bags = {"w": [[1], [2]], "z": [[3], []], "y": [[4, 5], [6]], "x": [[], [7]]}
    kjt = make_kjt(bags)
    a, b = stock(kjt), ours(kjt)
    assert b.keys() == a.keys() == ["x", "y", "z", "w"]
    assert b.length_per_key() == a.length_per_key() == [4, 4, 12, 8]
    assert b.offset_per_key() == a.offset_per_key()
    assert b.values().shape == a.values().shape == (2, 28)
    assert b.key_dim() == a.key_dim()


@pytest.mark.parametrize("weighted", [False, True])
def test_uncompressed_module_equals_stock_ebc(weighted):
    # Stock EBC (nn.EmbeddingBag) supports per-sample weights only with SUM pooling.
    pool = PoolingType.SUM if weighted else PoolingType.MEAN
    t = [EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=30, feature_names=["x", "y"]),
         EmbeddingBagConfig(name="b", embedding_dim=6, num_embeddings=20, feature_names=["z"],
                            pooling=pool)]
    stock = EmbeddingBagCollection(tables=copy.deepcopy(t), is_weighted=weighted)
    ours = CCEEmbeddingBagCollection(copy.deepcopy(t), is_weighted=weighted)
    with torch.no_grad():
        for name in ("a", "b"):
            ours.codebooks.embedding_bags[name].weight.copy_(stock.embedding_bags[name].weight)
    bags = {"x": [[1], [2, 3, 29], []], "y": [[0], [], [5, 5]], "z": [[19, 0, 7], [1], []]}
    w = None
    if weighted:
        w = {f: [[0.5 + j for j, _ in enumerate(bag)] for bag in b] for f, b in bags.items()}
    kjt = make_kjt(bags, w)
    a, b = stock(kjt), ours(kjt)
    assert a.keys() == b.keys()
    torch.testing.assert_close(b.values(), a.values(), rtol=0, atol=1e-7)
