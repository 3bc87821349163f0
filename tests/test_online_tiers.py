"""Online hot tiers (OnlineTieredConfig): the hot set learned by the sketch during training
forwards, migration (new hot rows = the ids' cold vectors, their optimizer state reset), and
outputs / gradients / bytes against a reference computed from the documented layout: a hot id
reads row ``slot(x)`` of ``<table>__hot``, every other id the cold method over all ``V`` ids
(conftest's plain-indexing reference of that method)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType

from conftest import make_kjt, ref_pool
from torchrec_cce import (CCEConfig, CEConfig, CCEEmbeddingBagCollection, HashingTrickConfig,
                          MEmComConfig, MPEConfig, OnlineTieredConfig, QRConfig, memory_report)
from torchrec_cce.api import migrate_hot
from torchrec_cce.budget import config_bytes
from torchrec_cce.hot_sketch import HotSketch

V, H, DIM = 60, 6, 8
COLD = {
    "cce": CCEConfig(rows=5, chunks=2, seed=3),
    "ce": CEConfig(rows=7, chunks=2, seed=1),
    "hashing": HashingTrickConfig(rows=9, seed=2),
    "qr_mult": QRConfig(collisions=6, operation="mult"),
    "qr_add": QRConfig(collisions=6, operation="add"),
    "memcom": MEmComConfig(rows=7, seed=4),
}
LINEAR = ("cce", "ce", "hashing", "qr_add", "memcom")  # pooling commutes with the cold method
# A training stream whose hot ids are scattered: 41, 7, 55, 23, 30, 2 (counts 60, 50, ... 10),
# then every id once.
HOT_STREAM = [x for x, n in zip([41, 7, 55, 23, 30, 2], [60, 50, 40, 30, 20, 10])
              for _ in range(n)] + list(range(V))
BAGS = [[41, 7, 3, 59], [], [41], [3], [55, 55, 0], [], [2, 30, 23, 1, 58], [0, 59]]
WEIGHTS = [[0.5, -1.0, 2.0, 1.5], [], [3.0], [-0.25], [1.0, 2.0, 0.5], [], [1, 2, 3, 4, 5],
           [0.5, 2.0]]


def table(pooling=PoolingType.SUM):
    return EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=V,
                              feature_names=["f"], pooling=pooling)


def online(cold, is_weighted=False, pooling=PoolingType.SUM, hot_dtype=None, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = OnlineTieredConfig(hot_ids=H, cold=cold, hot_dtype=hot_dtype, sketch_width=16,
                             sketch_depth=4, **kw)
    ebc = CCEEmbeddingBagCollection([table(pooling)], {"t": cfg}, is_weighted=is_weighted,
                                    allow_larger=True)
    method = ebc.tables["t"].cold
    with torch.no_grad():
        if hasattr(method, "id_weight"):
            method.id_weight.uniform_(0.5, 1.5)
    return ebc


def train_on(ebc, ids, batch=7):
    """Training forwards over ``ids`` in single-id bags (the sketch counts them)."""
    ebc.train()
    for i in range(0, len(ids), batch):
        ebc(make_kjt({"f": [[x] for x in ids[i:i + batch]]}))


def cold_view(ebc):
    t = dataclasses.replace(ebc.embedding_bag_configs()[0], pooling=PoolingType.SUM)
    return SimpleNamespace(compression={"t": ebc.compression["t"].cold},
                           tables={"t": ebc.tables["t"].cold}, codebooks=ebc.codebooks), t


def reference(ebc, bags, weights=None):
    """Per bag: ``sum_hot w * hot[slot(x)] + cold_pool(cold ids)``; MEAN divides every part by
    the whole bag's length (QR-mult: both pools)."""
    t = ebc.embedding_bag_configs()[0]
    method = ebc.tables["t"]
    hot = ebc.codebooks.embedding_bags["t__hot"].weight.float()
    slot = {int(x): int(s) for x, s in zip(method.hot_sorted, method.hot_slot) if x < V}
    view, cold_t = cold_view(ebc)
    out = []
    for b, bag in enumerate(bags):
        w = [1.0] * len(bag) if weights is None else weights[b]
        h = sum((wj * hot[slot[x]] for x, wj in zip(bag, w) if x in slot), torch.zeros(DIM))
        cold = [(x, wj) for x, wj in zip(bag, w) if x not in slot]
        c = ref_pool(view, cold_t, [x for x, _ in cold], [wj for _, wj in cold])
        if t.pooling == PoolingType.MEAN and bag:
            n = len(bag)
            cfg = view.compression["t"]
            mult = isinstance(cfg, QRConfig) and cfg.operation == "mult"
            h, c = h / n, c / (n * n if mult else n)
        out.append(h + c)
    return torch.stack(out)


def test_sketch_counts_training_batches_only_and_migration_finds_the_hot_ids():
    ebc = online(COLD["hashing"])
    method = ebc.tables["t"]
    assert method.hot_set().numel() == 0  # nothing hot before the first migration
    ebc.eval()
    ebc(make_kjt({"f": [[1, 2, 3]]}))
    assert not method.sketch.pending.any()
    train_on(ebc, HOT_STREAM)
    stats = migrate_hot(ebc)["t"]
    assert stats == {"hot": H, "promoted": H, "demoted": 0, "sketch_total": len(HOT_STREAM),
                     "optimizer_states_reset": 0}
    assert method.hot_set().tolist() == [2, 7, 23, 30, 41, 55]
    # The hot set is the sketch's top-k, and the sketch is a plain HotSketch of the stream.
    alone = HotSketch(V, width=16, depth=4, table="t")
    alone.observe(torch.tensor(HOT_STREAM))
    alone.sync()
    assert torch.equal(method.sketch.counts, alone.counts)
    assert sorted(alone.top_k(H)[0].tolist()) == method.hot_set().tolist()


@pytest.mark.parametrize("name", list(COLD))
@pytest.mark.parametrize("weighted", [False, True])
def test_outputs_equal_reference_before_and_after_migration(name, weighted):
    ebc = online(COLD[name], is_weighted=weighted)
    kjt = make_kjt({"f": BAGS}, {"f": WEIGHTS} if weighted else None)
    ref_w = WEIGHTS if weighted else None
    ebc.eval()
    before = ebc(kjt).to_dict()["f"]
    torch.testing.assert_close(before, reference(ebc, BAGS, ref_w), rtol=1e-5, atol=1e-6)
    train_on(ebc, HOT_STREAM)
    migrate_hot(ebc)
    with torch.no_grad():  # hot rows away from their cold vectors, so a wrong read shows
        ebc.codebooks.embedding_bags["t__hot"].weight.add_(torch.randn(H, DIM))
    ebc.eval()
    out = ebc(kjt).to_dict()["f"]
    torch.testing.assert_close(out, reference(ebc, BAGS, ref_w), rtol=1e-5, atol=1e-6)
    for b in (1, 5):  # empty bags are exactly 0
        assert torch.equal(out[b], torch.zeros(DIM))


@pytest.mark.parametrize("name", ["hashing", "qr_mult", "cce"])
def test_mean_pooling(name):
    ebc = online(COLD[name], pooling=PoolingType.MEAN)
    train_on(ebc, HOT_STREAM)
    migrate_hot(ebc)
    ebc.eval()
    torch.testing.assert_close(ebc(make_kjt({"f": BAGS})).to_dict()["f"],
                               reference(ebc, BAGS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(COLD))
def test_migration_itself_changes_no_output(name):
    """A newly hot id's row is its cold vector: every single-id bag (all ids), and for
    methods that pooling commutes with every multi-id bag, gives what it gave before."""
    ebc = online(COLD[name])
    singles = make_kjt({"f": [[x] for x in range(V)]})
    train_on(ebc, HOT_STREAM)
    ebc.eval()
    before, bags_before = ebc(singles).values(), ebc(make_kjt({"f": BAGS})).values()
    migrate_hot(ebc)
    assert ebc.tables["t"].hot_set().numel() == H
    ebc.eval()
    torch.testing.assert_close(ebc(singles).values(), before, rtol=1e-6, atol=1e-6)
    if name in LINEAR:
        torch.testing.assert_close(ebc(make_kjt({"f": BAGS})).values(), bags_before,
                                   rtol=1e-5, atol=1e-6)


def test_second_migration_keeps_slots_demotes_and_promotes():
    ebc = online(COLD["cce"])
    method = ebc.tables["t"]
    hot_w = ebc.codebooks.embedding_bags["t__hot"].weight
    train_on(ebc, HOT_STREAM)
    migrate_hot(ebc)
    slot_of = dict(zip(method.hot_set().tolist(), method.hot_lookup(method.hot_set())[1].tolist()))
    with torch.no_grad():
        hot_w.add_(torch.randn(H, DIM))  # trained hot rows, no longer the cold vectors
    kept = hot_w.detach().clone()
    # 2 and 30 fall behind 11 and 12.
    train_on(ebc, [11] * 80 + [12] * 70 + [41, 7, 55, 23] * 30)
    ebc.eval()
    singles = make_kjt({"f": [[x] for x in range(V)]})
    cold_before = ebc(make_kjt({"f": [[11], [12]]})).values()
    weights = {cb.suffix: ebc.codebooks.embedding_bags[f"t__{cb.suffix}"].weight
               for cb in method.codebooks}
    cold_2_30 = method.cold_vectors(torch.tensor([2, 30]), weights.__getitem__)
    stats = migrate_hot(ebc)["t"]
    assert (stats["promoted"], stats["demoted"]) == (2, 2)
    assert method.hot_set().tolist() == [7, 11, 12, 23, 41, 55]
    new_slot = dict(zip(method.hot_set().tolist(),
                        method.hot_lookup(method.hot_set())[1].tolist()))
    for x in (7, 23, 41, 55):  # still hot: same slot, same (trained) row
        assert new_slot[x] == slot_of[x]
        assert torch.equal(hot_w[new_slot[x]], kept[slot_of[x]])
    # Newly hot ids took the freed slots (in id order) and read their old cold vectors.
    assert [new_slot[11], new_slot[12]] == sorted([slot_of[2], slot_of[30]])
    ebc.eval()
    out = ebc(singles).values()
    torch.testing.assert_close(out[[11, 12]], cold_before, rtol=1e-6, atol=1e-6)
    # Demoted ids read the cold method again, not their (trained) hot rows.
    torch.testing.assert_close(out[[2, 30]], cold_2_30, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[2], kept[slot_of[2]])
    torch.testing.assert_close(out, reference(ebc, [[x] for x in range(V)]), rtol=1e-5,
                               atol=1e-6)


def test_gradients_reach_hot_rows_of_hot_ids_and_cold_rows_of_cold_ids():
    ebc = online(COLD["ce"], is_weighted=True)
    train_on(ebc, HOT_STREAM)
    migrate_hot(ebc)
    ebc.train()
    params = [p for p in ebc.parameters()]
    g = torch.randn(len(BAGS), DIM, generator=torch.Generator().manual_seed(1))
    kjt = make_kjt({"f": BAGS}, {"f": WEIGHTS})
    got = torch.autograd.grad((ebc(kjt).to_dict()["f"] * g).sum(), params, allow_unused=True)
    want = torch.autograd.grad((reference(ebc, BAGS, WEIGHTS) * g).sum(), params,
                               allow_unused=True)
    for p, a, b in zip(params, got, want):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_migration_resets_optimizer_state_of_promoted_rows_only():
    ebc = online(COLD["hashing"])
    opt = torch.optim.Adagrad(ebc.parameters(), lr=0.1, initial_accumulator_value=0.25)
    train_on(ebc, HOT_STREAM)
    migrate_hot(ebc)
    hot_w = ebc.codebooks.embedding_bags["t__hot"].weight
    for _ in range(3):  # every hot row gets optimizer state
        opt.zero_grad()
        ebc(make_kjt({"f": [[41, 7, 55, 23, 30, 2]]})).values().sum().backward()
        opt.step()
    before = opt.state[hot_w]["sum"].clone()
    train_on(ebc, [11] * 80 + [41, 7, 55, 23, 30] * 40)  # 11 replaces 2
    slot2 = int(ebc.tables["t"].hot_lookup(torch.tensor([2]))[1])
    stats = migrate_hot(ebc, optimizers=[opt])["t"]
    assert stats["promoted"] == 1 and stats["optimizer_states_reset"] == 1
    after = opt.state[hot_w]["sum"]
    assert torch.all(after[slot2] == 0.25)
    others = [i for i in range(H) if i != slot2]
    assert torch.equal(after[others], before[others]) and torch.all(before[others] > 0.25)


def test_save_load_mid_stream_equals_uninterrupted():
    stream = HOT_STREAM[::-1] + [11] * 70 + [12] * 65
    a = online(COLD["cce"])
    train_on(a, stream[:200])
    migrate_hot(a)
    train_on(a, stream[200:260])  # pending sketch counts, not yet migrated
    b = online(COLD["cce"], seed=5)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        train_on(m, stream[260:])
        migrate_hot(m)
    assert torch.equal(a.tables["t"].hot_set(), b.tables["t"].hot_set())
    assert torch.equal(a.tables["t"].sketch.counts, b.tables["t"].sketch.counts)
    a.eval(), b.eval()
    kjt = make_kjt({"f": BAGS})
    assert torch.equal(a(kjt).values(), b(kjt).values())


@pytest.mark.parametrize("name", list(COLD))
@pytest.mark.parametrize("hot_dtype", [None, torch.float16])
def test_bytes_exact(name, hot_dtype):
    if name == "memcom" and hot_dtype is not None:
        pytest.skip("refused (test_config_errors_name_the_table)")
    ebc = online(COLD[name], hot_dtype=hot_dtype)
    cfg = ebc.compression["t"]
    hot_bytes = H * DIM * (2 if hot_dtype == torch.float16 else 4)
    sketch = HotSketch(V, width=16, depth=4)
    assert sketch.stored_bytes() == 2 * 4 * sketch.size
    alone = memory_report(CCEEmbeddingBagCollection([table()], {"t": cfg.cold},
                                                    allow_larger=True))["t"]
    r = memory_report(ebc)["t"]
    extra = hot_bytes + sketch.stored_bytes() + 2 * 8 * H  # hot rows, sketch, hot map
    assert r["codebook_bytes"] == hot_bytes + alone["codebook_bytes"]
    assert r["assignment_bytes"] == alone["assignment_bytes"]
    assert r["per_id_bytes"] == alone["per_id_bytes"]
    for key in ("compressed_bytes", "training_bytes", "serving_bytes"):
        assert r[key] == alone[key] + extra, key
    # Every stored tensor of the table, counted from the state dict.
    assert r["compressed_bytes"] == sum(
        v.numel() * v.element_size() for k, v in ebc.state_dict().items())
    assert config_bytes(table(), cfg) == r["compressed_bytes"]
    assert r["method"] == alone["method"] + "+online_hot"
    assert r["params"] == H * DIM + alone["params"]
    assert cfg.num_parameters(table()) == H * DIM + cfg.cold.num_parameters(table())


@pytest.mark.parametrize("bad", [V, -1, V + 100])
def test_ids_outside_vocabulary_raise(bad):
    ebc = online(COLD["hashing"])
    with pytest.raises(ValueError, match=rf"table 't': id {bad} is outside \[0, {V}\)"):
        ebc(make_kjt({"f": [[1, bad]]}))


def test_config_errors_name_the_table():
    def build(**kw):
        args = dict(hot_ids=H, cold=HashingTrickConfig(rows=4))
        args.update(kw)
        return CCEEmbeddingBagCollection([table()], {"t": OnlineTieredConfig(**args)},
                                         allow_larger=True)
    for hot in (0, V, -3):
        with pytest.raises(ValueError, match="table 't': OnlineTieredConfig.hot_ids"):
            build(hot_ids=hot)
    with pytest.raises(ValueError, match="table 't': OnlineTieredConfig.cold"):
        build(cold=MPEConfig(groups=2))
    with pytest.raises(ValueError, match="table 't': OnlineTieredConfig.migrate_every"):
        build(migrate_every=0)
    with pytest.raises(ValueError, match="table 't': OnlineTieredConfig.sketch_width"):
        build(sketch_width=-1)
    with pytest.raises(ValueError, match="hot rows must be float32"):
        build(cold=MEmComConfig(rows=4), hot_dtype=torch.float16)
