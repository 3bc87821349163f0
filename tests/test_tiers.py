"""Hot/cold tiers (TieredConfig): outputs, gradients and bytes against a reference computed
from the documented layouts (conftest's plain-indexing reference of each cold method, applied
to the cold ids ``x - H``, plus one hot row per hot id), for every cold method."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torchrec import EmbeddingBagConfig
from torchrec.fx import symbolic_trace
from torchrec.modules.embedding_configs import PoolingType

from conftest import make_kjt, ref_pool
from torchrec_cce import (CCEConfig, CEConfig, CCEEmbeddingBagCollection, FullConfig,
                          HashingTrickConfig, MEmComConfig, MPEConfig, QRConfig, TieredConfig,
                          memory_report, recluster)

V, H, DIM = 60, 12, 8
MPE_COUNTS = torch.arange(V, 0, -1)  # frequency-ordered ids

COLD = {
    "cce": CCEConfig(rows=5, chunks=2, seed=3),
    "ce": CEConfig(rows=7, chunks=2, seed=1),
    "hashing": HashingTrickConfig(rows=9, seed=2),
    "qr_mult": QRConfig(collisions=6, operation="mult"),
    "qr_add": QRConfig(collisions=6, operation="add"),
    "qr_concat": QRConfig(collisions=6, operation="concat"),
    "memcom": MEmComConfig(rows=7, seed=4),
    "mpe": MPEConfig(groups=4, bits=(0, 2, 4, 8), counts=MPE_COUNTS),
    "full_fp16": FullConfig(codebook_dtype=torch.float16),
}

# Every boundary: 0, H-1, H, V-1; bags all hot, all cold, mixed, empty.
BAGS = [[0, H - 1, H, V - 1], [], [H - 1], [H], [3, 3, 40], [], [V - 1, 0, 20, H + 1, 5]]
WEIGHTS = [[0.5, -1.0, 2.0, 1.5], [], [3.0], [-0.25], [1.0, 2.0, 0.5], [], [1, 2, 3, 4, 5]]


def table(pooling=PoolingType.SUM):
    return EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=V,
                              feature_names=["f"], pooling=pooling)


def tiered(cold, is_weighted=False, pooling=PoolingType.SUM, hot_dtype=None, seed=0):
    torch.manual_seed(seed)
    ebc = CCEEmbeddingBagCollection([table(pooling)],
                                    {"t": TieredConfig(hot_ids=H, cold=cold, hot_dtype=hot_dtype)},
                                    is_weighted=is_weighted, allow_larger=True)
    method = ebc.tables["t"].cold
    with torch.no_grad():  # non-trivial per-id state, so the reference reads the right entry
        if hasattr(method, "id_weight"):
            method.id_weight.uniform_(0.5, 1.5)
    return ebc


def cold_view(ebc):
    """What conftest's reference needs of a collection, for the cold table alone: its config on
    ``V - H`` ids, its method and the (shared) codebooks."""
    t = ebc.embedding_bag_configs()[0]
    cfg = ebc.compression["t"]
    cold_t = dataclasses.replace(t, num_embeddings=V - H, pooling=PoolingType.SUM)
    cold_cfg = cfg.cold_config(t)
    view = SimpleNamespace(compression={} if isinstance(cold_cfg, FullConfig) else {"t": cold_cfg},
                           tables={"t": ebc.tables["t"].cold}, codebooks=ebc.codebooks)
    return view, cold_t


def reference(ebc, bags, weights=None):
    """Per bag: ``sum_hot w * hot[x] + cold_pool(cold ids - H)``; MEAN divides every pooled
    part by the whole bag's length (QR-mult: both pools)."""
    t = ebc.embedding_bag_configs()[0]
    hot = ebc.codebooks.embedding_bags["t__hot"].weight.float()
    view, cold_t = cold_view(ebc)
    cold_cfg = view.compression.get("t")
    out = []
    for b, bag in enumerate(bags):
        w = [1.0] * len(bag) if weights is None else weights[b]
        h = sum((wj * hot[x] for x, wj in zip(bag, w) if x < H), torch.zeros(DIM))
        cold = [(x - H, wj) for x, wj in zip(bag, w) if x >= H]
        if cold_cfg is None:  # FullConfig: one (float16) row per cold id, summed in fp32
            W = ebc.codebooks.embedding_bags["t"].weight.float()
            c = sum((wj * W[x] for x, wj in cold), torch.zeros(DIM))
        else:
            c = ref_pool(view, cold_t, [x for x, _ in cold], [wj for _, wj in cold])
        if t.pooling == PoolingType.MEAN and bag:
            n = len(bag)
            mult = isinstance(cold_cfg, QRConfig) and cold_cfg.operation == "mult"
            h, c = h / n, c / (n * n if mult else n)
        out.append(h + c)
    return torch.stack(out)


@pytest.mark.parametrize("name", list(COLD))
@pytest.mark.parametrize("weighted", [False, True])
def test_outputs_equal_reference(name, weighted):
    if name == "full_fp16" and weighted:
        pytest.skip("the unsharded EBC cannot weight float16 rows by float32 weights (any "
                    "float16 table, tiered or not)")
    ebc = tiered(COLD[name], is_weighted=weighted)
    kjt = make_kjt({"f": BAGS}, {"f": WEIGHTS} if weighted else None)
    out = ebc(kjt).to_dict()["f"]
    ref = reference(ebc, BAGS, WEIGHTS if weighted else None)
    # torch's float16 EmbeddingBag accumulates in float16: the reference sums in float32.
    tol = dict(rtol=1e-2, atol=1e-3) if name == "full_fp16" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref, **tol)
    for b in (1, 5):  # empty bags are exactly 0
        assert torch.equal(out[b], torch.zeros(DIM))


@pytest.mark.parametrize("name", ["hashing", "qr_mult", "cce"])
def test_mean_pooling(name):
    ebc = tiered(COLD[name], pooling=PoolingType.MEAN)
    out = ebc(make_kjt({"f": BAGS})).to_dict()["f"]
    torch.testing.assert_close(out, reference(ebc, BAGS), rtol=1e-5, atol=1e-6)


def test_hot_ids_read_only_their_own_row():
    """Changing one hot row changes exactly the bags holding that id; cold codebooks are not
    read by an all-hot batch (zero gradient)."""
    ebc = tiered(COLD["cce"])
    bags = [[H - 1], [0, 1], [H - 1, 2]]
    before = ebc(make_kjt({"f": bags})).values()
    with torch.no_grad():
        ebc.codebooks.embedding_bags["t__hot"].weight[H - 1] += 1.0
    after = ebc(make_kjt({"f": bags})).values()
    torch.testing.assert_close(after - before, torch.tensor([[1.0] * DIM, [0.0] * DIM,
                                                             [1.0] * DIM]))
    after.sum().backward()
    assert not ebc.codebooks.embedding_bags["t__cce"].weight.grad.any()


@pytest.mark.parametrize("name", [n for n in COLD if n not in ("mpe", "full_fp16")])
def test_gradients_equal_reference(name):
    ebc = tiered(COLD[name], is_weighted=True)
    params = [p for p in ebc.parameters() if p.dtype == torch.float32]
    g = torch.randn(len(BAGS), DIM, generator=torch.Generator().manual_seed(1))
    out = ebc(make_kjt({"f": BAGS}, {"f": WEIGHTS})).to_dict()["f"]
    got = torch.autograd.grad((out * g).sum(), params, allow_unused=True)
    want = torch.autograd.grad((reference(ebc, BAGS, WEIGHTS) * g).sum(), params,
                               allow_unused=True)
    for p, a, b in zip(params, got, want):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    hot_grad = got[[i for i, p in enumerate(params)
                    if p is ebc.codebooks.embedding_bags["t__hot"].weight][0]]
    assert hot_grad[H:].numel() == 0 and hot_grad[[0, 3, H - 1]].abs().sum() > 0


def test_mpe_cold_gradient_reaches_master_weights():
    ebc = tiered(COLD["mpe"])
    ebc(make_kjt({"f": BAGS})).values().sum().backward()
    grad = ebc.tables["t"].cold.weight.grad
    touched = sorted({x - H for bag in BAGS for x in bag if x >= H})
    assert grad[touched].abs().sum() > 0
    untouched = [i for i in range(V - H) if i not in touched]
    assert not grad[untouched].any()


@pytest.mark.parametrize("bad", [V, -1, V + 100])
def test_ids_outside_vocabulary_raise(bad):
    ebc = tiered(COLD["hashing"])
    with pytest.raises(ValueError, match=rf"table 't': id {bad} is outside \[0, {V}\)"):
        ebc(make_kjt({"f": [[1, bad]]}))


def test_config_errors_name_the_table():
    for hot in (0, V, V + 1, -3):
        with pytest.raises(ValueError, match="table 't': TieredConfig.hot_ids"):
            tiered(HashingTrickConfig(rows=4)).__class__(
                [table()], {"t": TieredConfig(hot_ids=hot, cold=HashingTrickConfig(rows=4))})
    with pytest.raises(ValueError, match="table 't': TieredConfig.cold"):
        CCEEmbeddingBagCollection([table()], {"t": TieredConfig(
            hot_ids=H, cold=TieredConfig(hot_ids=1, cold=HashingTrickConfig(rows=4)))})
    with pytest.raises(ValueError, match="hot rows must be float32"):
        CCEEmbeddingBagCollection([table()], {"t": TieredConfig(
            hot_ids=H, cold=MEmComConfig(rows=4), hot_dtype=torch.float16)})
    with pytest.raises(ValueError, match="table 't': rows must be a positive int"):
        CCEEmbeddingBagCollection([table()], {"t": TieredConfig(
            hot_ids=H, cold=HashingTrickConfig(rows=0))})


def _stored(ebc, name):
    w = ebc.codebooks.embedding_bags[name].weight
    return w.numel() * w.element_size()


@pytest.mark.parametrize("name", list(COLD))
@pytest.mark.parametrize("hot_dtype", [None, torch.float16])
def test_bytes_exact(name, hot_dtype):
    if name == "memcom" and hot_dtype is not None:
        pytest.skip("refused (test_config_errors_name_the_table)")
    ebc = tiered(COLD[name], hot_dtype=hot_dtype)
    cfg = ebc.compression["t"]
    hot_bytes = H * DIM * (2 if hot_dtype == torch.float16 else 4)
    assert _stored(ebc, "t__hot") == hot_bytes
    # The cold table alone, as its own collection on V - H ids.
    cold_t = dataclasses.replace(table(), num_embeddings=V - H)
    alone = memory_report(CCEEmbeddingBagCollection([cold_t], {"t": cfg.cold_config(table())},
                                                    allow_larger=True))["t"]
    r = memory_report(ebc)["t"]
    assert r["full_bytes"] == V * DIM * 4
    assert r["codebook_bytes"] == hot_bytes + alone["codebook_bytes"]
    assert r["assignment_bytes"] == alone["assignment_bytes"]
    assert r["per_id_bytes"] == alone["per_id_bytes"]
    for key in ("compressed_bytes", "training_bytes", "serving_bytes"):  # (MPE: serving)
        assert r[key] == hot_bytes + alone[key], key
    assert r["method"] == alone["method"] + "+hot"
    assert r["params"] == H * DIM + alone["params"]
    assert cfg.num_parameters(table()) == H * DIM + cfg.cold.num_parameters(cold_t)


def test_cold_cce_reclusters_and_stays_exact():
    ebc = tiered(COLD["cce"])
    cold = ebc.tables["t"].cold
    ids = torch.randint(0, V, (4000,), generator=torch.Generator().manual_seed(0))
    kjt = make_kjt({"f": [[int(x)] for x in ids]})
    ebc(kjt)
    hot_before = ebc.codebooks.embedding_bags["t__hot"].weight.detach().clone()
    p_before = cold.dense_assignment().clone()
    stats = recluster(ebc)
    assert "t" in stats
    assert int(cold.h_generation) == 1 and not torch.equal(p_before, cold.dense_assignment())
    assert cold.dense_assignment().shape[0] == V - H  # p covers the cold ids only
    assert torch.equal(hot_before, ebc.codebooks.embedding_bags["t__hot"].weight)
    torch.testing.assert_close(ebc(make_kjt({"f": BAGS})).to_dict()["f"],
                               reference(ebc, BAGS), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip():
    a, b = tiered(COLD["memcom"], seed=0), tiered(COLD["memcom"], seed=1)
    kjt = make_kjt({"f": BAGS})
    assert not torch.equal(a(kjt).values(), b(kjt).values())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(kjt).values(), b(kjt).values())


def test_float16_hot_rows():
    """float16 hot rows: an all-hot bag reads them (float16 sums), a cold id its float32 rows."""
    ebc = tiered(COLD["qr_mult"], hot_dtype=torch.float16)
    hot = ebc.codebooks.embedding_bags["t__hot"].weight
    assert hot.dtype == torch.float16
    assert ebc.codebooks.embedding_bags["t__qr_q"].weight.dtype == torch.float32
    out = ebc(make_kjt({"f": [[H - 1], [0, 5], [H]]})).to_dict()["f"]
    assert out.dtype == torch.float32
    assert torch.equal(out[0], hot[H - 1].float())
    assert torch.equal(out[1], (hot[0] + hot[5]).float())
    torch.testing.assert_close(out[2], reference(ebc, [[H]])[0], rtol=1e-5, atol=1e-6)


def test_fx_trace_equals_eager():
    """TorchRec's fx tracer takes a collection with a tiered table (the eager stages as one
    wrapped call, as for MPE tables) and the traced module computes the same pooled values."""
    ebc = tiered(COLD["cce"])
    kjt = make_kjt({"f": BAGS})
    traced = symbolic_trace(ebc)
    assert torch.equal(traced(kjt).values(), ebc(kjt).values())
