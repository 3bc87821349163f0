"""MEmCom under DistributedModelParallel (gloo, world size 2): per-id weights split by id range,
fetched from their owners and stepped there; compared with the unsharded module."""

from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import SGD

from dist_state import gathered_state
from multiprocess import run_multiprocess
from torchrec_cce import CCEEmbeddingBagCollection, MEmComConfig, memory_report
from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder, plan_memory
from torchrec_cce.distributed.tensors import scatter_full

V_MEM, V_MEAN, LR = 20_001, 3000, 0.5  # odd V: the two id ranges differ in size


def tables() -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="mem", embedding_dim=16, num_embeddings=V_MEM,
                           feature_names=["f0", "f1"]),
        EmbeddingBagConfig(name="mean", embedding_dim=8, num_embeddings=V_MEAN,
                           feature_names=["f2"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="small", embedding_dim=16, num_embeddings=50,
                           feature_names=["f3"]),
    ]


COMPRESSION = {"mem": MEmComConfig(rows=64), "mean": MEmComConfig(rows=32, seed=3)}
SIZES = {"f0": V_MEM, "f1": V_MEM, "f2": V_MEAN, "f3": 50}


def batch(seed: int, batch_size: int = 8) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys, values, lengths = list(SIZES), [], []
    for k in keys:
        lens = torch.randint(0, 4, (batch_size,), generator=g)
        lengths.append(lens)
        ids = torch.randint(0, SIZES[k], (int(lens.sum()),), generator=g)
        if k == "f0" and ids.numel():  # ids outside [0, V) use w[x mod V] and hash the raw id
            ids[0] = V_MEM + 7 + seed
        values.append(ids)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values),
                                               lengths=torch.cat(lengths))


def reference() -> CCEEmbeddingBagCollection:
    torch.manual_seed(0)
    ref = CCEEmbeddingBagCollection(tables(), COMPRESSION)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial per-id weights, so fetching the right ones is tested
        for name in COMPRESSION:
            w = ref.tables[name].id_weight
            w.copy_(torch.rand(w.shape, generator=g) + 0.5)
    return ref


def shard(kind: str, world: int, sgd: bool = True,
          per_id_adagrad: bool = False) -> DistributedModelParallel:
    # "dp" places codebooks data-parallel on purpose (an opt-in of the sharder).
    sharder = CCEEmbeddingBagCollectionSharder(allow_data_parallel=kind == "dp")
    module = CCEEmbeddingBagCollection(tables(), COMPRESSION, device=torch.device("meta"))
    if per_id_adagrad:  # as train.py: fused SGD on codebooks, in-backward Adagrad on w
        per_id = [p for n, p in module.named_parameters() if n.endswith("id_weight")]
        apply_optimizer_in_backward(SGD, [p for p in module.parameters()
                                          if not any(p is q for q in per_id)], {"lr": LR})
        apply_optimizer_in_backward(torch.optim.Adagrad, per_id, {"lr": LR})
    elif sgd:
        apply_optimizer_in_backward(SGD, module.parameters(), {"lr": LR})
    names = [c.name for c in module.codebook_table_configs()]
    gens = {"tw": lambda i: table_wise(rank=i % world, compute_kernel="fused"),
            "cw": lambda i: column_wise(ranks=list(range(world)), compute_kernel="fused"),
            "dp": lambda i: data_parallel()}[kind]
    plan = ShardingPlan({"": construct_module_sharding_plan(
        module, {n: gens(i) for i, n in enumerate(names)}, sharder=sharder,
        local_size=world, world_size=world, device_type="cpu")})
    return DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                    plan=plan, sharders=[sharder], device=torch.device("cpu"))


def load_full_state(dmp: torch.nn.Module, full: Dict[str, torch.Tensor]) -> None:
    for key, value in dmp.state_dict().items():
        scatter_full(value, full[key])


# ---------------------------------------------------------------- forward and one step
def _forward_and_step(rank: int, world: int, kind: str):
    ref = reference()
    dmp = shard(kind, world)
    load_full_state(dmp, ref.state_dict())
    kjt = batch(100 + rank)
    out = dmp(kjt).wait()
    forward_err = (out.values() - ref(kjt).values()).abs().max().item()
    w = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(rank))
    (out.values() * w).sum().backward()
    # Fused codebooks and the per-id weights (in-backward SGD) are stepped in backward; the
    # data_parallel codebooks use TorchRec's dense kernel: step them by hand, as test_sharding.
    with torch.no_grad():
        for p in dmp.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    local = {t: dmp.module.tables[t].id_weight.numel() for t in COMPRESSION}
    return forward_err, gathered_state(dmp), local


@pytest.mark.parametrize("kind", ["tw", "cw", "dp"])
def test_sharded_forward_and_step_equal_unsharded(kind: str) -> None:
    results = run_multiprocess(_forward_and_step, 2, kind, timeout=600)
    ref = reference()
    loss = 0
    for r in range(2):
        out = ref(batch(100 + r))
        w = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(r))
        loss = loss + (out.values() * w).sum()
    loss.backward()
    params = dict(ref.named_parameters())
    assert params["tables.mem.id_weight"].grad.abs().sum() > 0
    for rank, (forward_err, after, local) in enumerate(results):
        assert forward_err < 1e-5, f"rank {rank} {kind}: forward differs by {forward_err}"
        # id ranges: ceil(V/2) ids on rank 0, the rest on rank 1.
        assert local["mem"] == (10_001 if rank == 0 else 10_000)
        assert local["mean"] == 1500
        for name, p in params.items():
            # The mean of the two ranks' gradients, as TorchRec and DDP average them.
            expected = p.detach() - LR * 0.5 * p.grad
            err = (after[name].float() - expected).abs().max().item()
            assert err < 1e-5, f"rank {rank} {kind}: {name} update differs by {err}"


# ---------------------------------------------------------------- a dense optimizer
def _dense_adagrad(rank: int, world: int):
    ref = reference()
    dmp = shard("tw", world, sgd=False)
    load_full_state(dmp, ref.state_dict())
    per_id = [p for n, p in dmp.named_parameters() if n.endswith("id_weight")]
    opt = torch.optim.Adagrad(per_id, lr=LR)
    out = dmp(batch(200 + rank)).wait().values()
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(rank))
    (out * w).sum().backward()
    opt.step()
    return gathered_state(dmp)["tables.mem.id_weight"]


def test_per_id_weights_stepped_by_a_dense_optimizer() -> None:
    results = run_multiprocess(_dense_adagrad, 2, timeout=600)
    ref = reference()
    loss = 0
    for r in range(2):
        out = ref(batch(200 + r)).values()
        loss = loss + (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(r))).sum()
    loss.backward()
    p = ref.tables["mem"].id_weight
    opt = torch.optim.Adagrad([p], lr=LR)
    p.grad *= 0.5  # the ranks' mean
    before = p.detach().clone()
    opt.step()
    assert (p - before).abs().max() > 0.1  # a real step happened
    for after in results:
        torch.testing.assert_close(after, p.detach(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- checkpoints (DCP)
def _save_world2(rank: int, world: int, path: str):
    import torch.distributed.checkpoint as dcp

    dmp = shard("cw", world)
    load_full_state(dmp, reference().state_dict())
    with torch.no_grad():  # distinctive per-rank weights
        w = dmp.module.tables["mem"].id_weight
        w.copy_(torch.rand(w.shape, generator=torch.Generator().manual_seed(10 + rank)))
    dcp.save(dmp.state_dict(), checkpoint_id=path)
    return [dmp(batch(500 + r)).wait().values() for r in range(world)], w.detach().clone()


def _load_world2(rank: int, world: int, path: str):
    import torch.distributed.checkpoint as dcp

    dmp = shard("tw", world)
    state = dmp.state_dict()
    dcp.load(state, checkpoint_id=path)
    dmp.load_state_dict(state)
    return dmp(batch(600 + rank)).wait().values(), dmp.module.tables["mem"].id_weight.detach().clone()


def test_dcp_reshards_world2_to_world1_and_back(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

    path2 = str(tmp_path / "world2")
    saved = run_multiprocess(_save_world2, 2, path2, timeout=600)
    single = CCEEmbeddingBagCollection(tables(), COMPRESSION)
    state = single.state_dict()
    dcp.load(state, checkpoint_id=path2)
    single.load_state_dict(state)
    torch.testing.assert_close(single.tables["mem"].id_weight.detach(),
                               torch.cat([saved[0][1], saved[1][1]]), atol=0, rtol=0)
    for r in range(2):
        torch.testing.assert_close(single(batch(500 + r)).values(), saved[0][0][r],
                                   atol=1e-6, rtol=0)
    path1 = str(tmp_path / "world1")
    with torch.no_grad():
        single.tables["mem"].id_weight.mul_(-1.5)
    dcp.save(single.state_dict(), checkpoint_id=path1)
    loaded = run_multiprocess(_load_world2, 2, path1, timeout=600)
    full = single.tables["mem"].id_weight.detach()
    for r, (out, local) in enumerate(loaded):
        torch.testing.assert_close(out, single(batch(600 + r)).values(), atol=1e-6, rtol=0)
        torch.testing.assert_close(local, full[r * 10_001: min(V_MEM, (r + 1) * 10_001)])


# ---------------------------------------------------------------- optimizer state (DCP)
def _adagrad_step_and_save(rank: int, world: int, path: str):
    import torch.distributed.checkpoint as dcp

    dmp = shard("tw", world, sgd=False, per_id_adagrad=True)
    load_full_state(dmp, reference().state_dict())
    out = dmp(batch(100 + rank)).wait().values()
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(rank))).sum().backward()
    w = dmp.module.tables["mem"].id_weight
    state_sum = w._in_backward_optimizers[0].state[w]["sum"].clone()
    dcp.save({"optim": dmp.fused_optimizer.state_dict()}, checkpoint_id=path)
    # A fresh model with another codebook plan restores this rank's part of the state.
    fresh = shard("cw", world, sgd=False, per_id_adagrad=True)
    state = {"optim": fresh.fused_optimizer.state_dict()}
    dcp.load(state, checkpoint_id=path)
    fresh.fused_optimizer.load_state_dict(state["optim"])
    v = fresh.module.tables["mem"].id_weight
    return state_sum, v._in_backward_optimizers[0].state[v]["sum"].clone(), w.detach().clone()


def test_per_id_adagrad_state_checkpointed_with_fused_optimizer(tmp_path) -> None:
    results = run_multiprocess(_adagrad_step_and_save, 2, str(tmp_path / "optim"), timeout=600)
    ref = reference()
    loss = 0
    for r in range(2):
        out = ref(batch(100 + r)).values()
        loss = loss + (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(r))).sum()
    loss.backward()
    p = ref.tables["mem"].id_weight
    mean_grad = 0.5 * p.grad
    before = p.detach().clone()
    opt = torch.optim.Adagrad([p], lr=LR)
    p.grad = mean_grad
    opt.step()
    sums = torch.cat([results[0][0], results[1][0]])
    torch.testing.assert_close(sums, mean_grad ** 2, atol=1e-6, rtol=1e-5)  # Adagrad's sum
    torch.testing.assert_close(torch.cat([results[0][2], results[1][2]]), p.detach(),
                               atol=1e-5, rtol=0)  # the in-backward Adagrad step
    assert (p.detach() - before).abs().max() > 0.1
    for saved, restored, _ in results:
        assert torch.equal(saved, restored)


# ---------------------------------------------------------------- bytes per rank
def _bytes(rank: int, world: int):
    dmp = shard("tw", world)
    module = CCEEmbeddingBagCollection(tables(), COMPRESSION, device=torch.device("meta"))
    plan = ShardingPlan({"": dmp.plan.get_plan_for_module("")})
    return memory_report(dmp), plan_memory(plan, module, world)


def test_per_rank_bytes_count_per_id_weights() -> None:
    results = run_multiprocess(_bytes, 2, timeout=600)
    mem_codebook = 64 * 16 * 4
    for rank, (report, planned) in enumerate(results):
        row = report["mem"]
        assert row["per_id_bytes"] == V_MEM * 4
        assert row["compressed_bytes"] == mem_codebook + V_MEM * 4
        assert row["params"] == 64 * 16 + V_MEM
        assert row["local_per_id_bytes"] == (10_001 if rank == 0 else 10_000) * 4
        # table_wise: codebook i on rank i % 2 (mem__memcom on 0, mean__memcom on 1, small 0).
        assert row["local_codebook_bytes"] == (mem_codebook if rank == 0 else 0)
        assert planned["mem"]["bytes_per_rank"] == [mem_codebook + 10_001 * 4, 10_000 * 4]
        assert planned["mean"]["bytes_per_rank"] == [1500 * 4, 32 * 8 * 4 + 1500 * 4]
        assert planned["mem"]["compressed_bytes"] == row["compressed_bytes"]
