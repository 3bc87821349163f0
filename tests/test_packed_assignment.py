"""Bit-packed, frequency-bounded CCE assignment ``p`` (torchrec_cce/methods/packed.py, CCETable).

References are independent of the code under test: a plain Python bit stream for the packing,
a dense ``[V, chunks]`` tensor written alongside for lookups, conftest's pure-Python splitmix64
for the hash fallback, a dense-storage CCETable subclass (the pre-packing layout) for
re-clustering, and explicit member lists for B's bucket means.
"""

import copy
import math
import warnings

import pytest
import torch
from torchrec import EmbeddingBagConfig

from conftest import ref_hash
from multiprocess import run_multiprocess
from torchrec_cce import (
    CCEConfig,
    CCEEmbeddingBagCollection,
    CEConfig,
    HashingTrickConfig,
    MEmComConfig,
    QRConfig,
    memory_report,
    recluster,
)
from torchrec_cce.hashing import derive_seed
from torchrec_cce.methods import CCETable, packed


# ---------------------------------------------------------------- the packing itself
def python_bitstream(values, bits):
    """Reference packing: one Python int as the bit stream, cut into 32-bit words."""
    stream = 0
    for k, v in enumerate(v for row in values for v in row):
        stream |= int(v) << (k * bits)
    n_words = -(-len(values) * (len(values[0]) if values else 0) * bits // 32)
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 255, 256, 257, 1000, 4096, 5000, 40000,
                                  1 << 20, (1 << 31)])
@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 8])
def test_pack_matches_python_bitstream_and_unpacks(rows, chunks):
    bits = packed.bits_for(rows)
    assert bits == (math.ceil(math.log2(rows)) if rows > 1 else 0)
    g = torch.Generator().manual_seed(rows * 10 + chunks)
    n = 37
    values = torch.randint(0, rows, (n, chunks), generator=g)
    words = packed.pack(values, bits)
    assert words.dtype == torch.int32
    assert words.tolist() == python_bitstream(values.tolist(), bits)
    assert words.numel() * 4 == packed.packed_bytes(n, chunks, bits)
    ids = torch.randperm(n, generator=g)
    assert torch.equal(packed.unpack(words, ids, chunks, bits), values[ids])
    # Partial in-place writes leave the other entries alone.
    sel = torch.randperm(n, generator=g)[:13]
    new = torch.randint(0, rows, (13, chunks), generator=g)
    packed.write(words, sel, new, bits)
    values[sel] = new
    assert words.tolist() == python_bitstream(values.tolist(), bits)


def test_id_alignment_starts_blocks_on_word_boundaries():
    for chunks in (1, 2, 4, 8):
        for bits in range(0, 31):
            a = packed.id_alignment(chunks, bits)
            assert (a * chunks * bits) % 32 == 0
            assert all((k * chunks * bits) % 32 for k in range(1, a))  # the smallest such


def test_bytes_per_id_packed_vs_int16():
    # 4 chunks: 256 rows -> 8 bits -> 4 bytes per id (int16: 8); 4096 rows -> 12 bits -> 6.
    assert packed.packed_bytes(1_000_000, 4, packed.bits_for(256)) == 4_000_000
    assert packed.packed_bytes(1_000_000, 4, packed.bits_for(4096)) == 6_000_000
    assert packed.packed_bytes(1_000_000, 1, packed.bits_for(4096)) == 1_500_000


# ---------------------------------------------------------------- CCETable lookups
def cce_table(V, rows, chunks, assigned_ids=None, dim=8, seed=3):
    t = EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=V, feature_names=["f"])
    return CCETable(t, CCEConfig(rows=rows, chunks=chunks, seed=seed, assigned_ids=assigned_ids))


@pytest.mark.parametrize("rows,chunks", [(24, 4), (256, 2), (1, 8), (5000, 1), (33, 8)])
@pytest.mark.parametrize("assigned", [None, 0, 1, 97, 300, 10**9])
def test_lookup_equals_dense_reference_for_every_id(rows, chunks, assigned):
    V = 300
    m = cce_table(V, rows, chunks, assigned)
    N = V if assigned is None else min(assigned, V)
    assert m.assigned_ids == N
    assert m.assignment_bytes() == packed.packed_bytes(N, chunks, packed.bits_for(rows))
    g = torch.Generator().manual_seed(1)
    dense = torch.randint(0, rows, (V, chunks), generator=g)
    m.write_assignment(torch.arange(V), dense)     # uncovered ids are skipped
    ids = torch.cat([torch.arange(V), torch.tensor([-1, -7, V, V + 5, 2**40, 2**63 - 1,
                                                    -(2**63)])])
    got = m.lookup_assignment(ids)
    for x, row in zip(ids.tolist(), got.tolist()):
        if 0 <= x < N:
            assert row == dense[x].tolist(), x
        else:  # uncovered or out of range: the initial hash, forever
            assert row == [ref_hash(x, derive_seed(3, "t", i, "p"), rows)
                           for i in range(chunks)], x
    assert torch.equal(m.dense_assignment(), dense[:N])


def test_write_assignment_rejects_bad_input():
    m = cce_table(100, 16, 2)
    with pytest.raises(ValueError, match="shape"):
        m.write_assignment(torch.arange(3), torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        m.write_assignment(torch.arange(3), torch.full((3, 2), 16))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        m.write_assignment(torch.tensor([100]), torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="assigned_ids"):
        CCEConfig(rows=4, assigned_ids=-1).validate(EmbeddingBagConfig(
            name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"]))


def test_shard_range_reads_only_its_ids():
    t = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=100, feature_names=["f"])
    m = CCETable(t, CCEConfig(rows=24, chunks=4), id_range=(8, 16))
    assert m.assignment.numel() == 8 * 4 * 5 // 32
    assert torch.equal(m.lookup_assignment(torch.tensor([9, 150])),
                       m.hash_assignment(torch.tensor([9, 150])))
    with pytest.raises(ValueError, match="another rank"):
        m.lookup_assignment(torch.tensor([3]))
    with pytest.raises(ValueError, match="multiple of 8"):
        CCETable(t, CCEConfig(rows=24, chunks=4), id_range=(4, 16))


# ---------------------------------------------------------------- bytes == stored tensors
def all_method_tables():
    tables = [EmbeddingBagConfig(name=n, embedding_dim=16, num_embeddings=v, feature_names=[n])
              for n, v in [("a", 3000), ("b", 2000), ("c", 1500), ("d", 1000), ("e", 800),
                           ("f", 700), ("g", 600), ("h", 50)]]
    compression = {"a": CCEConfig(rows=100, chunks=4), "b": CCEConfig(rows=33, chunks=1,
                   assigned_ids=777), "c": CCEConfig(rows=7, chunks=8, assigned_ids=5),
                   "d": CEConfig(rows=50), "e": HashingTrickConfig(rows=64),
                   "f": QRConfig(collisions=30), "g": MEmComConfig(rows=20)}
    return tables, compression


def state_bytes_by_table(state, tables):
    out = {t.name: 0 for t in tables}
    for key, value in state.items():
        if key.startswith("codebooks.embedding_bags."):
            name = key.split(".")[2].split("__")[0]
        else:
            name = key.split(".")[1]
        if hasattr(value, "metadata"):  # ShardedTensor: its global size
            meta = value.metadata()
            numel = int(torch.Size(meta.size).numel())
            elem = torch.empty((), dtype=meta.tensor_properties.dtype).element_size()
        else:
            numel, elem = value.numel(), value.element_size()
        out[name] += numel * elem
    return out


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_memory_report_equals_stored_tensor_bytes_for_every_method(device):
    tables, compression = all_method_tables()
    ebc = CCEEmbeddingBagCollection(tables, compression, device=torch.device(device))
    report = memory_report(ebc)
    expected = state_bytes_by_table(ebc.state_dict(), tables)
    assert {n: r["compressed_bytes"] for n, r in report.items()} == expected
    assert report["b"]["assignment_bytes"] == math.ceil(777 * 1 * 6 / 32) * 4
    assert report["c"]["assignment_bytes"] == math.ceil(5 * 8 * 3 / 32) * 4


# ---------------------------------------------------------------- re-clustering vs dense
class DenseCCETable(CCETable):
    """The pre-packing storage: p in a plain ``[V, chunks]`` int64 tensor (reference)."""

    def use_dense(self, dense: torch.Tensor) -> None:
        self.dense = dense.clone()

    def write_assignment(self, ids, p):
        keep = ids < self.assigned_ids
        self.dense[ids[keep]] = p[keep].to(torch.int64)

    def lookup_assignment(self, ids):
        inside = (ids >= 0) & (ids < self.assigned_ids)
        stored = self.dense[torch.where(inside, ids, torch.zeros_like(ids))]
        return torch.where(inside.unsqueeze(1), stored, self.hash_assignment(ids))


def trained(V, rows, chunks, assigned, steps=30):
    from test_recluster import build, train_random

    ebc = build([("t", V, 16, CCEConfig(rows=rows, chunks=chunks, seed=2,
                                        assigned_ids=assigned))])
    train_random(ebc, steps=steps)
    return ebc


@pytest.mark.parametrize("rows,chunks,assigned", [(24, 4, None), (16, 1, None), (12, 8, None),
                                                  (24, 4, 90), (16, 1, 0), (12, 8, 250)])
def test_recluster_packed_equals_dense_storage(rows, chunks, assigned):
    from test_recluster import embed, new_buckets

    V = 250
    packed_ebc = trained(V, rows, chunks, assigned)
    dense_ebc = copy.deepcopy(packed_ebc)
    src = packed_ebc.tables["t"]
    ref = DenseCCETable(dense_ebc.embedding_bag_configs()[0], src.config)
    ref.h_generation.copy_(src.h_generation)
    ref.reservoir = copy.deepcopy(src.reservoir)
    ref.use_dense(src.lookup_assignment(torch.arange(V)))
    dense_ebc.tables["t"] = ref
    old = embed(packed_ebc, "t", torch.arange(V))
    torch.testing.assert_close(embed(dense_ebc, "t", torch.arange(V)), old, rtol=0, atol=0)
    gen = int(src.h_generation)
    recluster(packed_ebc)
    recluster(dense_ebc)
    for name in ("t__cce",):
        assert torch.equal(packed_ebc.codebooks.embedding_bags[name].weight,
                           dense_ebc.codebooks.embedding_bags[name].weight), name
    ids = torch.arange(-3, V + 3)
    assert torch.equal(src.lookup_assignment(ids), ref.lookup_assignment(ids))
    # Uncovered ids kept their hash; B is the mean residual of the *covered* ids per bucket.
    N = src.assigned_ids
    assert torch.equal(src.lookup_assignment(torch.arange(N, V)),
                       src.hash_assignment(torch.arange(N, V)))
    cd = 16 // chunks
    A, B = src.stack_ab(lambda suffix: packed_ebc.codebooks.embedding_bags[f"t__{suffix}"].weight)
    A, B = A.detach().view(chunks, rows, cd), B.detach().view(chunks, rows, cd)
    h = new_buckets(packed_ebc, "t", V, gen + 1)
    p = src.lookup_assignment(torch.arange(V))
    for i in range(chunks):
        resid = old.view(V, chunks, cd)[:, i].double() - A[i].double()[p[:, i]]
        for j in range(rows):
            members = [x for x in range(N) if int(h[x, i]) == j]
            expect = resid[members].mean(0) if members else torch.zeros(cd, dtype=torch.float64)
            torch.testing.assert_close(B[i, j].double(), expect, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- sharded (2 processes)
V_BIG = 20_000


def sharded_tables():
    return [EmbeddingBagConfig(name="big", embedding_dim=16, num_embeddings=V_BIG,
                               feature_names=["f0", "f1"]),
            EmbeddingBagConfig(name="small", embedding_dim=16, num_embeddings=500,
                               feature_names=["f2"])]


def sharded_compression(chunks, assigned):
    return {"big": CCEConfig(rows=24, chunks=chunks, seed=1, assigned_ids=assigned),
            "small": CCEConfig(rows=8, chunks=chunks, seed=2)}


def sharded_batch(seed, n=12):
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(seed)
    sizes = {"f0": V_BIG, "f1": V_BIG, "f2": 500}
    values, lengths = [], []
    for k, v in sizes.items():
        lens = torch.randint(0, 4, (n,), generator=g)
        lengths.append(lens)
        ids = torch.randint(-5, v + 5, (int(lens.sum()),), generator=g)  # some out of range
        values.append(ids)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(sizes), values=torch.cat(values),
                                               lengths=torch.cat(lengths))


def sharded_reference(chunks, assigned):
    torch.manual_seed(0)
    ref = CCEEmbeddingBagCollection(sharded_tables(), sharded_compression(chunks, assigned))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in ref.tables.values():
            m.write_assignment(torch.arange(m.num_embeddings),
                               torch.randint(0, m.rows, (m.num_embeddings, m.chunks), generator=g))
            m.h_generation.fill_(2)
    return ref


def _sample(rank):
    g = torch.Generator().manual_seed(50 + rank)
    return torch.cat([(torch.rand(1500, generator=g) ** 3 * V_BIG).long(),
                      torch.randint(0, V_BIG, (1500,), generator=g)])


def _sharded_run(rank, world, chunks, assigned, replicate_below):
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import (column_wise, construct_module_sharding_plan,
                                                    table_wise)
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from test_sharding import gathered_state, load_full_state
    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder

    ref = sharded_reference(chunks, assigned)
    sharder = CCEEmbeddingBagCollectionSharder(replicate_assignment_below=replicate_below)
    module = CCEEmbeddingBagCollection(sharded_tables(), sharded_compression(chunks, assigned),
                                       device=torch.device("meta"))
    names = [c.name for c in module.codebook_table_configs()]
    gen = [lambda i: table_wise(rank=i % world), lambda i: column_wise(ranks=[0, 1])]
    plan = ShardingPlan({"": construct_module_sharding_plan(
        module, {n: gen[i % 2](i) for i, n in enumerate(names)}, sharder=sharder,
        local_size=world, world_size=world, device_type="cpu")})
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=plan, sharders=[sharder], device=torch.device("cpu"))
    load_full_state(dmp, ref.state_dict())
    fwd = dmp(sharded_batch(100 + rank)).wait().values()
    report = memory_report(dmp)
    stored = state_bytes_by_table(dmp.state_dict(), sharded_tables())
    m = dmp.module.tables["big"]
    local = (m.stored_lo, m.stored_hi, m.assignment.numel() * 4)
    for t in dmp.module.tables.values():  # the forward above observed its ids: start afresh
        t.reservoir.reset()
    dmp.module.tables["big"].reservoir.observe(_sample(rank))
    dmp.module.tables["small"].reservoir.observe(_sample(rank)[:1000] % 500)  # < capacity
    stats = recluster(dmp)
    state = gathered_state(dmp)
    after = dmp(sharded_batch(200 + rank)).wait().values()
    return fwd, report, stored, local, stats["big"], state, after


@pytest.mark.parametrize("chunks,assigned,replicate_below", [
    (4, 9_999, 0), (1, None, 0), (8, 12_345, 0), (4, 9_999, 1 << 30)],
    ids=["c4-covered-id_range", "c1-all-id_range", "c8-covered-id_range", "c4-replicated"])
def test_sharded_packed_equals_unsharded(chunks, assigned, replicate_below):
    results = run_multiprocess(_sharded_run, 2, chunks, assigned, replicate_below, timeout=900)
    ref = sharded_reference(chunks, assigned)
    ref_report = memory_report(ref)
    m_ref = ref.tables["big"]
    N = m_ref.assigned_ids
    bytes_local = 0
    for rank, (fwd, report, stored, local, _, _, _) in enumerate(results):
        torch.testing.assert_close(fwd, ref(sharded_batch(100 + rank)).values(), rtol=0, atol=1e-6)
        # Bytes: report == global size of every stored tensor == the unsharded report.
        assert {n: r["compressed_bytes"] for n, r in report.items()} == stored
        assert {n: r["compressed_bytes"] for n, r in ref_report.items()} == stored
        lo, hi, nbytes = local
        assert report["big"]["local_assignment_bytes"] == nbytes
        if replicate_below == 0:
            assert lo % m_ref.id_alignment() == 0 and hi - lo <= -(-N // 2) + m_ref.id_alignment()
        bytes_local += nbytes
    if replicate_below == 0:  # the shards are exactly the pieces of the one packed array
        assert bytes_local == ref_report["big"]["assignment_bytes"]
    # Distributed re-clustering == single process on both ranks' samples.
    for t in ref.tables.values():  # the reference forwards above observed their ids
        t.reservoir.reset()
    ref.tables["big"].reservoir.observe(torch.cat([_sample(0), _sample(1)]))
    ref.tables["small"].reservoir.observe(torch.cat([_sample(0)[:1000], _sample(1)[:1000]]) % 500)
    ref_stats = recluster(ref)["big"]
    expected = ref.state_dict()
    (_, _, _, _, stats0, state0, _), (_, _, _, _, _, state1, _) = results
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key
    got_p = packed.unpack(state0["tables.big.assignment"].to(torch.int32), torch.arange(N),
                          chunks, m_ref.assignment_bits)
    agree = (got_p == m_ref.dense_assignment()).float().mean()
    assert agree > 0.999, float(agree)
    for name in ("codebooks.embedding_bags.big__cce.weight",):
        torch.testing.assert_close(state0[name], expected[name], atol=1e-4, rtol=1e-3)
    assert stats0["num_samples"] == ref_stats["num_samples"]
    for rank, (*_, after) in enumerate(results):
        torch.testing.assert_close(after, ref(sharded_batch(200 + rank)).values(),
                                   atol=1e-4, rtol=1e-3)


def _dcp_save(rank, world, path, chunks, assigned):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from test_sharding import load_full_state
    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder

    sharder = CCEEmbeddingBagCollectionSharder(replicate_assignment_below=0)
    module = CCEEmbeddingBagCollection(sharded_tables(), sharded_compression(chunks, assigned),
                                       device=torch.device("meta"))
    plan = ShardingPlan({"": construct_module_sharding_plan(
        module, {c.name: table_wise(rank=i % world)
                 for i, c in enumerate(module.codebook_table_configs())},
        sharder=sharder, local_size=world, world_size=world, device_type="cpu")})
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=plan, sharders=[sharder], device=torch.device("cpu"))
    load_full_state(dmp, sharded_reference(chunks, assigned).state_dict())
    m = dmp.module.tables["big"]
    ids = torch.arange(m.stored_lo, m.stored_hi)
    g = torch.Generator().manual_seed(rank)
    m.write_assignment(ids, torch.randint(0, m.rows, (ids.numel(), chunks), generator=g))
    dcp.save(dmp.state_dict(), checkpoint_id=path)
    return m.stored_lo, m.dense_assignment(), dmp(sharded_batch(7)).wait().values()


@pytest.mark.parametrize("chunks,assigned", [(8, 12_345), (1, None)])
def test_dcp_packed_world2_to_world1(tmp_path, chunks, assigned):
    import torch.distributed.checkpoint as dcp

    path = str(tmp_path / "ckpt")
    saved = run_multiprocess(_dcp_save, 2, path, chunks, assigned, timeout=900)
    single = CCEEmbeddingBagCollection(sharded_tables(), sharded_compression(chunks, assigned))
    state = single.state_dict()
    dcp.load(state, checkpoint_id=path)
    single.load_state_dict(state)
    dense = single.tables["big"].dense_assignment()
    for lo, p, _ in saved:
        assert torch.equal(dense[lo: lo + p.shape[0]], p)
    assert sum(p.shape[0] for _, p, _ in saved) == single.tables["big"].assigned_ids
    torch.testing.assert_close(single(sharded_batch(7)).values(), saved[0][2], rtol=0, atol=1e-6)
