"""Online hot tiers (OnlineTieredConfig) under DistributedModelParallel (gloo, world size 2):
each rank trains on its own batches; after ``migrate_hot`` every rank holds the sketch, hot map
and hot rows of the unsharded module that saw both ranks' batches, and forward plus one
in-backward SGD step equal that module's. Cold parts: CCE (p whole, or split by id range and
fetched from its owners), QR-mult (MEAN), MEmCom (per-id weights split by id range) and hashing;
codebooks table-wise or column-wise. A checkpoint saved between migrations (each rank holding
pending sketch counts of its own batches) resumes to the uninterrupted run's hot sets."""

from typing import List

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import SGD

from dist_state import gathered_state
from multiprocess import run_multiprocess
from torchrec_cce import (CCEConfig, CCEEmbeddingBagCollection, HashingTrickConfig, MEmComConfig,
                          OnlineTieredConfig, QRConfig, memory_report, migrate_hot)
from torchrec_cce.checkpoint import CheckpointManager
from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder
from torchrec_cce.train import apply_sparse_optimizer
from torchrec_cce.distributed.tensors import local_pieces, scatter_full

LR = 0.5
SIZES = {"f_cce": 3001, "f_qr": 2000, "f_mem": 1501, "f_hash": 800}
HOT = {"f_cce": 20, "f_qr": 15, "f_mem": 25, "f_hash": 10}
COLD = {"cce": CCEConfig(rows=16, chunks=2, seed=1), "qr": QRConfig(collisions=20),
        "mem": MEmComConfig(rows=32, seed=2), "hash": HashingTrickConfig(rows=40, seed=3)}
COMPRESSION = {t: OnlineTieredConfig(hot_ids=HOT[f"f_{t}"], cold=c, sketch_width=256,
                                     sketch_depth=3, seed=7) for t, c in COLD.items()}
TRAIN_BATCHES = 3


def tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f[2:], embedding_dim=8, num_embeddings=v, feature_names=[f],
                               pooling=PoolingType.MEAN if f == "f_qr" else PoolingType.SUM)
            for f, v in SIZES.items()]


def batch(seed: int, batch_size: int = 16) -> KeyedJaggedTensor:
    """Random bags (some empty), half their ids from a pool of ``2 * hot_ids`` scattered ids
    (the same pool for every seed), so the hot sets overlap the batches."""
    g = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    for f, v in SIZES.items():
        pool = torch.randperm(v, generator=torch.Generator().manual_seed(v))[: 2 * HOT[f]]
        lens = torch.randint(0, 5, (batch_size,), generator=g)
        ids = torch.randint(0, v, (int(lens.sum()),), generator=g)
        hot = torch.rand(ids.shape, generator=g) < 0.5
        ids[hot] = pool[torch.randint(0, pool.numel(), (int(hot.sum()),), generator=g)]
        values.append(ids)
        lengths.append(lens)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(SIZES), values=torch.cat(values),
                                               lengths=torch.cat(lengths))


def train_batches(rank: int) -> List[KeyedJaggedTensor]:
    return [batch(1000 * rank + i) for i in range(TRAIN_BATCHES)]


def reference() -> CCEEmbeddingBagCollection:
    torch.manual_seed(0)
    ref = CCEEmbeddingBagCollection(tables(), COMPRESSION)
    with torch.no_grad():  # non-trivial per-id weights, so fetching the right ones is tested
        w = ref.tables["mem"].cold.id_weight
        w.copy_(torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    return ref


def shard(kind: str, world: int) -> DistributedModelParallel:
    # "tw": p of the CCE cold part split by id range too (below: kept whole on every rank)
    sharder = CCEEmbeddingBagCollectionSharder(
        replicate_assignment_below=0 if kind == "tw" else 1 << 30)
    module = CCEEmbeddingBagCollection(tables(), COMPRESSION, device=torch.device("meta"))
    apply_optimizer_in_backward(SGD, list(module.parameters()), {"lr": LR})
    names = [c.name for c in module.codebook_table_configs()]
    gens = {"tw": lambda i: table_wise(rank=i % world, compute_kernel="fused"),
            "cw": lambda i: column_wise(ranks=list(range(world)), compute_kernel="fused")}[kind]
    plan = ShardingPlan({"": construct_module_sharding_plan(
        module, {n: gens(i) for i, n in enumerate(names)}, sharder=sharder,
        local_size=world, world_size=world, device_type="cpu")})
    return DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                    plan=plan, sharders=[sharder], device=torch.device("cpu"))


def _migrate_and_step(rank: int, world: int, kind: str):
    ref = reference()
    dmp = shard(kind, world)
    for key, value in dmp.state_dict().items():
        scatter_full(value, ref.state_dict()[key])
    dmp.train()
    for kjt in train_batches(rank):  # training forwards: this rank's ids into its sketches
        dmp(kjt).wait()
    stats = migrate_hot(dmp)
    tables = dmp.module.tables
    sketches = {t: (tables[t].sketch.counts.clone(), tables[t].hot_sorted.clone(),
                    tables[t].hot_slot.clone()) for t in COLD}
    migrated = gathered_state(dmp)
    split = {t: dmp.module.id_range(t) is not None for t in COLD}
    sharded_bytes = {t: r["compressed_bytes"] for t, r in memory_report(dmp).items()}
    kjt = batch(100 + rank)
    out = dmp(kjt).wait()
    w = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(rank))
    (out.values() * w).sum().backward()
    return (stats, sketches, migrated, split, sharded_bytes, out.values().detach(),
            gathered_state(dmp))


# column-wise (~40 s on the shared 2 cores) runs with the slow tests; table-wise (p split by id
# range) in the default run.
@pytest.mark.parametrize("kind", ["tw", pytest.param("cw", marks=pytest.mark.slow)])
def test_sharded_migration_forward_and_step_equal_unsharded(kind: str) -> None:
    results = run_multiprocess(_migrate_and_step, 2, kind, timeout=600)
    ref = reference()
    ref.train()
    for rank in range(2):  # one process seeing both ranks' batches
        for kjt in train_batches(rank):
            ref(kjt)
    ref_stats = migrate_hot(ref)
    ref_state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    ref_bytes = {t: r["compressed_bytes"] for t, r in memory_report(ref).items()}
    for t in COLD:
        assert ref_stats[t]["promoted"] == HOT[f"f_{t}"]
    outs, loss = [], 0
    for r in range(2):
        out = ref(batch(100 + r)).values()
        outs.append(out.detach())
        loss = loss + (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(r))).sum()
    loss.backward()
    params = dict(ref.named_parameters())
    for rank, (stats, sketches, migrated, split, sharded_bytes, out, after) in enumerate(results):
        assert split == {"cce": kind == "tw", "qr": False, "mem": True, "hash": False}
        assert stats == ref_stats
        for t in COLD:  # identical sketch and hot map on every rank, == one process's
            m = ref.tables[t]
            counts, hot_sorted, hot_slot = sketches[t]
            assert torch.equal(counts, m.sketch.counts), (rank, t)
            assert torch.equal(hot_sorted, ref_state[f"tables.{t}.hot_sorted"]), (rank, t)
            assert torch.equal(hot_slot, ref_state[f"tables.{t}.hot_slot"]), (rank, t)
            key = f"codebooks.embedding_bags.{t}__hot.weight"  # rows from the cold vectors
            torch.testing.assert_close(migrated[key], ref_state[key], rtol=1e-6, atol=1e-6)
        assert sharded_bytes == ref_bytes
        torch.testing.assert_close(out, outs[rank], rtol=1e-5, atol=1e-5)
        for name, p in params.items():
            expected = p.detach() - LR * 0.5 * p.grad  # the mean of the two ranks' gradients
            err = (after[name].float() - expected).abs().max().item()
            assert err < 1e-5, f"rank {rank} {kind}: {name} update differs by {err}"


# ---------------------------------------------------------------- checkpoint between migrations
def _checkpoint_resume(rank: int, world: int, ckpt_dir: str):
    ref = reference()

    def fresh() -> DistributedModelParallel:
        dmp = shard("tw", world)
        for key, value in dmp.state_dict().items():
            scatter_full(value, ref.state_dict()[key])
        dmp.train()
        return dmp

    batches = [batch(2000 + 10 * rank + i) for i in range(4)]
    manager = CheckpointManager(ckpt_dir, config={"test": "online tiers"}, batch_size=16)
    saved = fresh()
    for kjt in batches[:2]:  # pending counts of this rank's batches only
        saved(kjt).wait()
    manager.save(2, saved, None, {"epoch": 0, "step": 2, "step_in_epoch": 2})
    resumed = shard("tw", world)
    resumed.train()
    assert manager.load(resumed) is not None
    uninterrupted = fresh()
    for kjt in batches[:2]:
        uninterrupted(kjt).wait()
    out = []
    for dmp in (resumed, uninterrupted):
        for kjt in batches[2:]:
            dmp(kjt).wait()
        migrate_hot(dmp)
        tables = dmp.module.tables
        out.append(({t: (tables[t].sketch.counts.clone(), tables[t].hot_sorted.clone())
                     for t in COLD},
                    {k: v for k, v in gathered_state(dmp).items() if "__hot." in k}))
    return out


def test_checkpoint_between_migrations_resumes_to_the_same_hot_sets(tmp_path) -> None:
    results = run_multiprocess(_checkpoint_resume, 2, str(tmp_path), timeout=600)
    for rank, ((r_sketch, r_hot), (u_sketch, u_hot)) in enumerate(results):
        for t in COLD:
            assert torch.equal(r_sketch[t][0], u_sketch[t][0]), (rank, t)
            assert torch.equal(r_sketch[t][1], u_sketch[t][1]), (rank, t)
            assert torch.equal(r_sketch[t][0], results[0][1][0][t][0])  # same on both ranks
        for key in u_hot:
            assert torch.equal(r_hot[key], u_hot[key]), (rank, key)



# ---------------------------------------------------------------- fused optimizer state of rows
def _fused_reset(rank: int, world: int):
    V, H = 800, 10
    t = [EmbeddingBagConfig(name="hash", embedding_dim=8, num_embeddings=V,
                            feature_names=["f_hash"])]
    cfg = {"hash": OnlineTieredConfig(hot_ids=H, cold=HashingTrickConfig(rows=40, seed=3),
                                      sketch_width=512, sketch_depth=3)}  # exact
    sharder = CCEEmbeddingBagCollectionSharder()
    module = CCEEmbeddingBagCollection(t, cfg, device=torch.device("meta"))
    apply_sparse_optimizer(module, "rowwise_adagrad", 0.1)  # fused EXACT_ROWWISE_ADAGRAD
    plan = ShardingPlan({"": construct_module_sharding_plan(
        module, {c.name: table_wise(rank=i % world, compute_kernel="fused")
                 for i, c in enumerate(module.codebook_table_configs())}, sharder=sharder,
        local_size=world, world_size=world, device_type="cpu")})
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(
        dist.GroupMember.WORLD), plan=plan, sharders=[sharder], device=torch.device("cpu"))
    dmp.train()

    def bags(ids):
        ids = torch.tensor(ids, dtype=torch.int64)
        return KeyedJaggedTensor.from_lengths_sync(keys=["f_hash"], values=ids,
                                                   lengths=torch.ones_like(ids))

    def momentum() -> torch.Tensor:
        """The hot table's row-wise Adagrad sums ``[H]`` (held by one rank: table-wise)."""
        full = torch.zeros(H)
        for k, s in dmp.fused_optimizer.state_dict()["state"].items():
            for v in s.values():
                if "hash__hot" in str(k) and hasattr(v, "local_shards"):
                    for tensor, off in local_pieces(v):
                        full[off[0]: off[0] + tensor.shape[0]] = tensor.float().reshape(-1)
        dist.all_reduce(full)
        return full

    old = [7 * i + 3 for i in range(H)]  # hot after the first migration
    new = [500 + i for i in range(4)]    # overtake old[6:] before the second
    dmp(bags(old * 20)).wait()
    migrate_hot(dmp)
    m = dmp.module.tables["hash"]
    dmp(bags(old)).wait().values().sum().backward()  # every hot row gets Adagrad state
    before = momentum()
    dmp(bags(new * 40 + old[:6] * 30)).wait()
    stats = migrate_hot(dmp)["hash"]
    promoted = m.hot_lookup(torch.tensor(new))[1]
    return stats, promoted, before, momentum(), m.hot_set()


def test_migration_zeroes_fused_optimizer_state_of_promoted_rows_only() -> None:
    results = run_multiprocess(_fused_reset, 2, timeout=600)
    for stats, promoted, before, after, hot in results:
        assert stats["promoted"] == 4 and stats["demoted"] == 4
        assert sorted(hot.tolist()) == sorted([7 * i + 3 for i in range(6)] + [500, 501, 502, 503])
        assert torch.all(before > 0)
        kept = [i for i in range(10) if i not in promoted.tolist()]
        assert torch.all(after[promoted] == 0)
        assert torch.equal(after[kept], before[kept])
    assert torch.equal(results[0][3], results[1][3])
