"""torchrec_cce's CPU TBE kernel (``CodebookTBE``) against fbgemm's own CPU TBE.

Two copies of one fbgemm ``SplitTableBatchedEmbeddingBagsCodegen`` get the same batches: one
keeps fbgemm's kernel, the other is switched to ``CodebookTBE``. Their pooled outputs,
per-sample-weight gradients, weights and optimizer state after several fused updates must agree
up to floating-point summation order, for every covered optimizer (row-wise Adagrad, Adagrad,
SGD), SUM and MEAN pooling, weighted bags, empty bags, tables
shared by several features, a table with far more rows than lookups (the sorted path), int32
and int64 ids. What the kernel does not cover stays on fbgemm's kernel, exactly. Inside the
sharded collection (DMP, world size 1 and 2) the kernel is on by default and trains like fbgemm.
"""

import copy
import os
from typing import List, Optional, Tuple

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    EmbeddingLocation,
    PoolingMode,
)
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
    WeightDecayMode,
)
from torch import nn

from multiprocess import run_multiprocess
from torchrec_cce import ops
from torchrec_cce.distributed.cpu_tbe import CodebookTBE, unsupported_reason, use_codebook_kernel

pytestmark = pytest.mark.skipif(not ops.fused_available(),
                                reason="the C++ ops could not be built here (no compiler?)")

HOST, CPU = EmbeddingLocation.HOST, ComputeDevice.CPU
# (rows, dim) per table; features 0-2 share table 0 (like a codebook's chunk streams); table 3
# has far more rows than a batch looks up (the kernel sorts instead of using its row map)
SPECS = [(100, 4), (7, 8), (5000, 16), (300_000, 4)]
FEATURE_TABLE = [0, 0, 0, 1, 2, 3]


def make_tbe(optimizer: OptimType, pooling: PoolingMode, **kwargs
             ) -> SplitTableBatchedEmbeddingBagsCodegen:
    torch.manual_seed(0)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(r, d, HOST, CPU) for r, d in SPECS], feature_table_map=FEATURE_TABLE,
        optimizer=optimizer, learning_rate=0.1, eps=1e-3, pooling_mode=pooling, **kwargs)
    tbe.init_embedding_weights_uniform(-0.5, 0.5)
    return tbe


def switched_copy(tbe: SplitTableBatchedEmbeddingBagsCodegen) -> CodebookTBE:
    holder = nn.Module()
    holder.tbe = copy.deepcopy(tbe)
    assert use_codebook_kernel(holder) == 1
    assert type(holder.tbe) is CodebookTBE
    return holder.tbe


def batch(seed: int, B: int = 13, index_dtype: torch.dtype = torch.int64
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bags of 0-3 ids per (feature, sample), including empty bags and repeated rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(FEATURE_TABLE) * B,), generator=g)
    ids = []
    for f, t in enumerate(FEATURE_TABLE):
        n = int(lengths[f * B:(f + 1) * B].sum())
        ids.append(torch.randint(0, SPECS[t][0], (n,), generator=g))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return torch.cat(ids).to(index_dtype), offsets.to(index_dtype)


def weights(tbe: SplitTableBatchedEmbeddingBagsCodegen) -> torch.Tensor:
    return torch.cat([w.flatten() for w in tbe.split_embedding_weights()])


def train_both(ref, ours, steps: int = 4, weighted: bool = False,
               index_dtype: torch.dtype = torch.int64) -> None:
    """The same batches and output gradients through both: outputs, per-sample-weight
    gradients, then weights, optimizer state and iteration counters agree; and they moved."""
    for step in range(steps):
        ids, offsets = batch(step, index_dtype=index_dtype)
        w_ref = w_ours = None
        if weighted:
            w_ref = torch.rand(ids.numel(), generator=torch.Generator().manual_seed(step))
            w_ref.requires_grad_()
            w_ours = w_ref.detach().clone().requires_grad_()
        out_ref, out_ours = ref(ids, offsets, w_ref), ours(ids, offsets, w_ours)
        # float16: weights one float16 step apart after an update move outputs by ~1e-3
        tol = 2e-3 if ref.weights_precision == SparseType.FP16 and step else 1e-5
        torch.testing.assert_close(out_ours, out_ref, rtol=tol, atol=tol)
        grad = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(100 + step))
        (out_ref * grad).sum().backward()
        (out_ours * grad).sum().backward()
        if weighted:
            torch.testing.assert_close(w_ours.grad, w_ref.grad, rtol=10 * tol, atol=10 * tol)
    if ref.weights_precision == SparseType.FP16:
        # every updated row is rounded to float16: a different summation order can round a
        # weight one float16 step the other way
        torch.testing.assert_close(weights(ours).float(), weights(ref).float(),
                                   rtol=2e-3, atol=2e-3)
        assert (weights(ours) != weights(ref)).float().mean() < 0.01
    else:
        torch.testing.assert_close(weights(ours), weights(ref), rtol=1e-5, atol=1e-6)
    if ref.momentum1_host.numel():
        torch.testing.assert_close(ours.momentum1_host, ref.momentum1_host, rtol=1e-4, atol=1e-5)
    assert int(ours.iter) == int(ref.iter)
    assert not torch.equal(weights(ours), weights(make_tbe(
        ref.optimizer, ref.pooling_mode, weights_precision=ref.weights_precision)))


def pair(optimizer: OptimType, pooling: PoolingMode, **kwargs):
    """fbgemm's TBE and a copy of it switched to the kernel."""
    ref = make_tbe(optimizer, pooling, **kwargs)
    return ref, switched_copy(ref)


@pytest.mark.parametrize("optimizer", [OptimType.EXACT_ROWWISE_ADAGRAD, OptimType.EXACT_ADAGRAD,
                                       OptimType.EXACT_SGD])
@pytest.mark.parametrize("pooling", [PoolingMode.SUM, PoolingMode.MEAN])
def test_matches_fbgemm(optimizer: OptimType, pooling: PoolingMode) -> None:
    train_both(*pair(optimizer, pooling))


@pytest.mark.parametrize("optimizer", [OptimType.EXACT_ROWWISE_ADAGRAD, OptimType.EXACT_SGD])
def test_weighted_bags_and_their_gradient(optimizer: OptimType) -> None:
    train_both(*pair(optimizer, PoolingMode.SUM), weighted=True)


@pytest.mark.parametrize("optimizer", [OptimType.EXACT_ROWWISE_ADAGRAD, OptimType.EXACT_ADAGRAD,
                                       OptimType.EXACT_SGD])
def test_float16_weights(optimizer: OptimType) -> None:
    ref, ours = pair(optimizer, PoolingMode.SUM, weights_precision=SparseType.FP16)
    assert ours.weights_host.dtype == torch.float16
    train_both(ref, ours)
    train_both(*pair(optimizer, PoolingMode.SUM, weights_precision=SparseType.FP16),
               weighted=True)


def test_int32_ids() -> None:
    train_both(*pair(OptimType.EXACT_ROWWISE_ADAGRAD, PoolingMode.SUM), index_dtype=torch.int32)


@pytest.mark.parametrize("layout", ["expanded", "column_strided"])
def test_output_gradient_of_any_layout(layout: str) -> None:
    """The gradient of ``out.sum()`` is a stride-0 expansion (read in place); one with strided
    columns is copied first. Both train exactly like fbgemm."""
    ref, ours = pair(OptimType.EXACT_ROWWISE_ADAGRAD, PoolingMode.SUM)
    for step in range(3):
        ids, offsets = batch(step)
        outs = [ref(ids, offsets), ours(ids, offsets)]
        for out in outs:
            if layout == "expanded":
                grad = torch.full((), 0.5).expand(out.shape)
                assert grad.stride() == (0, 0)
            else:
                grad = torch.randn(out.shape[1], out.shape[0],
                                   generator=torch.Generator().manual_seed(step)).t()
                assert grad.stride(1) != 1
            out.backward(grad)
    torch.testing.assert_close(weights(ours), weights(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.momentum1_host, ref.momentum1_host, rtol=1e-5, atol=1e-6)


def test_learning_rate_change_reaches_the_kernel() -> None:
    ref, ours = pair(OptimType.EXACT_ROWWISE_ADAGRAD, PoolingMode.SUM)
    train_both(ref, ours, steps=1)
    for tbe in (ref, ours):
        tbe.set_learning_rate(0.013)
    train_both(ref, ours, steps=2)


def test_out_of_range_id_names_the_feature() -> None:
    _, ours = pair(OptimType.EXACT_ROWWISE_ADAGRAD, PoolingMode.SUM)
    ids, offsets = batch(0)
    bad = ids.clone()
    bad[-1] = SPECS[3][0]  # the last id belongs to feature 5 (table 3)
    with pytest.raises(RuntimeError, match="feature 5 looks up row 300000 of a table with "
                                           "300000 rows"):
        ours(bad, offsets)
    # the kernel's scratch state survived the error: training continues exactly
    ref2, ours2 = pair(OptimType.EXACT_ROWWISE_ADAGRAD, PoolingMode.SUM)
    grad = torch.ones((offsets.numel() - 1) // len(FEATURE_TABLE), ours2.total_D)
    with pytest.raises(RuntimeError, match="looks up row"):
        torch.ops.torchrec_cce.tbe_backward_update(
            grad, ours2.weights_host.clone(), ours2.weights_offsets,
            ours2.D_offsets, ours2.total_D, ours2._cce_rows_per_feature,
            ours2._cce_feature_table, bad, offsets, None, 0, False, 2,
            ours2.momentum1_host.clone(), ours2.momentum1_offsets, 0.1, 1e-3)
    train_both(ref2, ours2)


def test_not_covered_stays_on_fbgemm() -> None:
    # EMA in-place row-wise Adagrad (the one other optimizer fbgemm trains on CPU): not covered,
    # the TBE keeps fbgemm's class
    ema = make_tbe(OptimType.EMAINPLACE_ROWWISE_ADAGRAD, PoolingMode.SUM)
    assert unsupported_reason(ema) == f"optimizer {ema.optimizer}"
    holder = nn.Module()
    holder.tbe = ema
    assert use_codebook_kernel(holder) == 0 and type(holder.tbe) is SplitTableBatchedEmbeddingBagsCodegen
    # weight decay: fbgemm's CPU row-wise Adagrad applies it to shared tables only; not covered
    decay = make_tbe(OptimType.EXACT_ROWWISE_ADAGRAD, PoolingMode.SUM, weight_decay=0.01,
                     weight_decay_mode=WeightDecayMode.L2)
    assert unsupported_reason(decay) == "weight decay"
    # a large table (an uncompressed one): fbgemm's kernel is faster there
    big = SplitTableBatchedEmbeddingBagsCodegen([(2_000_000, 4, HOST, CPU)],
                                                optimizer=OptimType.EXACT_ROWWISE_ADAGRAD)
    assert unsupported_reason(big).startswith("a table of 8000000 weights")
    # weighted MEAN bags: fbgemm's own forward/backward runs (its backward does not divide by
    # the bag length), so the two copies stay bit-identical
    ref, ours = pair(OptimType.EXACT_ROWWISE_ADAGRAD, PoolingMode.MEAN)
    for step in range(2):
        ids, offsets = batch(step)
        w = torch.rand(ids.numel())
        ref(ids, offsets, w).sum().backward()
        ours(ids, offsets, w).sum().backward()
    assert torch.equal(weights(ours), weights(ref))


def test_environment_switch_keeps_fbgemm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHREC_CCE_TBE_KERNEL", "0")
    holder = nn.Module()
    holder.tbe = make_tbe(OptimType.EXACT_ROWWISE_ADAGRAD, PoolingMode.SUM)
    assert use_codebook_kernel(holder) == 0


# ---------------------------------------------------------------- inside the sharded module
def _train_sharded(rank: int, world: int, kernel: bool, steps: int, fp16: bool = False
                   ) -> Tuple[List[float], dict]:
    """A CCE/CE/QR/full collection under DMP (table-wise, row-wise Adagrad in backward) for
    ``steps`` steps; the losses and the gathered codebook weights. ``fp16``: float16 CCE
    codebooks."""
    os.environ["TORCHREC_CCE_TBE_KERNEL"] = "1" if kernel else "0"
    import torch.distributed as dist
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection, CEConfig, QRConfig
    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=v,
                                 feature_names=[f"f{i}"]) for i, v in enumerate([500, 400, 300, 50])]
    dtype = torch.float16 if fp16 else None
    comp = {"t0": CCEConfig(rows=16, chunks=4, codebook_dtype=dtype),
            "t1": CEConfig(rows=32, chunks=4), "t2": QRConfig(collisions=20)}
    ebc = CCEEmbeddingBagCollection(tables, comp, device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05, "eps": 1e-8})
    sharder = CCEEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder())
    names = [c.name for c in ebc.codebook_table_configs()]
    plan = construct_module_sharding_plan(
        ebc, {n: table_wise(rank=i % world) for i, n in enumerate(names)}, sharder=sharder,
        local_size=world, world_size=world, device_type="cpu")
    dmp = DistributedModelParallel(ebc, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=ShardingPlan({"": plan}), sharders=[sharder],
                                   device=torch.device("cpu"))
    used = dmp.module.codebook_kernels
    assert (used > 0) == kernel, used
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        lengths = torch.randint(0, 3, (4 * 8,), generator=g)
        ids = torch.cat([torch.randint(0, t.num_embeddings, (int(lengths[i * 8:(i + 1) * 8].sum()),),
                                       generator=g) for i, t in enumerate(tables)])
        kjt = KeyedJaggedTensor(keys=[f"f{i}" for i in range(4)], values=ids, lengths=lengths)
        out = dmp(kjt).values()
        loss = (out * torch.linspace(-1, 1, out.shape[1])).pow(2).sum()
        loss.backward()
        losses.append(float(loss))
    state = {}  # this rank's codebook weights (table-wise: the tables it owns)
    for k, v in dmp.state_dict().items():
        shards = v.local_shards() if hasattr(v, "local_shards") else []
        if "codebooks" in k and shards:
            state[k] = shards[0].tensor.clone()
    return losses, state


@pytest.mark.parametrize("world,fp16", [(1, False), (2, False), (2, True)])
def test_sharded_training_equals_fbgemm(world: int, fp16: bool) -> None:
    with_kernel = run_multiprocess(_train_sharded, world, True, 5, fp16)
    with_fbgemm = run_multiprocess(_train_sharded, world, False, 5, fp16)
    tol = 2e-3 if fp16 else 1e-5
    for (losses_k, state_k), (losses_f, state_f) in zip(with_kernel, with_fbgemm):
        assert losses_k[-1] < losses_k[0]
        torch.testing.assert_close(torch.tensor(losses_k), torch.tensor(losses_f),
                                   rtol=tol, atol=tol)
        assert state_k.keys() == state_f.keys() and state_k
        for k in state_k:
            assert state_k[k].dtype == state_f[k].dtype
            torch.testing.assert_close(state_k[k].float(), state_f[k].float(), rtol=tol, atol=tol)
