"""Low-precision CCE codebooks: ``CCEConfig(codebook_dtype=torch.float16 | torch.bfloat16)``.

Tolerance (documented in docs/low_precision.md): a float16 codebook entry is the float32 value
rounded to 11 significant bits, relative error <= 2^-11 (bfloat16: 8 bits, 2^-8). A pooled CCE
output is a sum of such entries, so each output element of the low-precision module differs from
the float32 module with the same (rounded) initial weights by at most ``2^-10 * sum |terms|``
(bfloat16: ``2^-7 * sum |terms|``; rounding plus low-precision accumulation), where the sum
runs over the entries pooled into that element.
"""

from typing import List

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import DataType

from multiprocess import run_multiprocess
from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection, memory_report

V, DIM, ROWS, CHUNKS = 5000, 16, 64, 4


def tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=V, feature_names=["f"]),
            EmbeddingBagConfig(name="small", embedding_dim=DIM, num_embeddings=40,
                               feature_names=["g"])]


def module(dtype: torch.dtype, device=None) -> CCEEmbeddingBagCollection:
    return CCEEmbeddingBagCollection(tables(), {"t": CCEConfig(ROWS, CHUNKS, codebook_dtype=dtype)},
                                     device=device)


def batch(seed: int, batch_size: int = 16) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 5, (2, batch_size), generator=g)
    values = [torch.randint(0, V, (int(lens[0].sum()),), generator=g),
              torch.randint(0, 40, (int(lens[1].sum()),), generator=g)]
    return KeyedJaggedTensor.from_lengths_sync(keys=["f", "g"], values=torch.cat(values),
                                               lengths=lens.flatten())


def same_init(dtype: torch.dtype):
    """A float32 module and a ``dtype`` module holding the same (rounded) weights."""
    torch.manual_seed(0)
    ref = module(torch.float32)
    low = module(dtype)
    state = ref.state_dict()
    low.load_state_dict({k: v.to(low.state_dict()[k].dtype) for k, v in state.items()})
    with torch.no_grad():  # round the fp32 weights the same way, so only arithmetic differs
        for k, v in low.state_dict().items():
            if v.dtype.is_floating_point:
                ref.state_dict()[k].copy_(v.float())
    return ref, low


LOW = [torch.float16, torch.bfloat16]
# per-element output bound relative to sum |terms| (module docstring)
BOUND = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.mark.parametrize("bad", [torch.int8, torch.float64])
def test_unsupported_codebook_dtype_names_table_and_fix(bad: torch.dtype) -> None:
    with pytest.raises(ValueError, match=r"table 't'.*(float16|float32)"):
        module(bad)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_codebooks_are_tables_of_that_dtype(dtype: torch.dtype) -> None:
    m = module(dtype)
    types = {c.name: c.data_type for c in m.codebook_table_configs()}
    data_type = DataType.FP16 if dtype == torch.float16 else DataType.BF16
    assert types == {"t__cce": data_type, "small": DataType.FP32}
    # stored at that dtype (TorchRec's unsharded EBC alone would store BF16 as float16)
    assert m.codebooks.embedding_bags["t__cce"].weight.dtype == dtype
    default = CCEEmbeddingBagCollection(tables(), {"t": CCEConfig(ROWS, CHUNKS)})
    assert default.codebooks.embedding_bags["t__cce"].weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_outputs_within_tolerance_of_fp32(dtype: torch.dtype) -> None:
    ref, low = same_init(dtype)
    for seed in range(3):
        kjt = batch(seed)
        out32, out16 = ref(kjt).values(), low(kjt).values()
        assert out16.dtype == torch.float32
        # The bound: 2^-10 * sum of |terms| per output element, from an |A|/|B| copy of ref.
        absref = module(torch.float32)
        absref.load_state_dict({k: (v.abs() if v.dtype.is_floating_point else v)
                                for k, v in ref.state_dict().items()})
        bound = BOUND[dtype] * absref(kjt).values() + 1e-7
        err = (out16 - out32).abs()
        assert torch.all(err <= bound), f"max err/bound {(err / bound).max():.3f}"
        assert err.max() > 0  # low-precision arithmetic really happened


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_bytes_exactly_halved(dtype: torch.dtype) -> None:
    r32 = memory_report(module(torch.float32))["t"]
    r16 = memory_report(module(dtype))["t"]
    cb32 = 2 * (CHUNKS * ROWS) * (DIM // CHUNKS) * 4
    assert r32["codebook_bytes"] == cb32
    assert r16["codebook_bytes"] == cb32 // 2
    bits = (ROWS - 1).bit_length()  # packed p: ceil(log2 rows) bits per entry, int32 words
    assignment = -(-V * CHUNKS * bits // 32) * 4
    assert r16["assignment_bytes"] == r32["assignment_bytes"] == assignment
    assert r16["compressed_bytes"] == cb32 // 2 + assignment + 8  # + the int64 hash generation
    assert r16["full_bytes"] == r32["full_bytes"] == V * DIM * 4
    assert r16["params"] == r32["params"]  # same parameter count, half the bytes


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_unsharded_trains(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    m = module(dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    kjt = batch(1, 64)
    target = torch.full((64, 2 * DIM), 0.1)
    losses = []
    for _ in range(10):
        loss = (m(kjt).values() - target).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- DMP (2 processes)
def _train_dmp(rank: int, world: int, dtype: torch.dtype = torch.float16):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import SGD

    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder, plan_memory

    sharder = CCEEmbeddingBagCollectionSharder()
    m = module(dtype, device=torch.device("meta"))
    apply_optimizer_in_backward(SGD, m.parameters(), {"lr": 0.5})
    plan = construct_module_sharding_plan(
        m, {"t__cce": table_wise(rank=0, compute_kernel="fused"),
            "small": table_wise(rank=1, compute_kernel="fused")},
        sharder=sharder, local_size=world, world_size=world, device_type="cpu")
    mem = plan_memory(ShardingPlan({"": plan}), m, world)
    dmp = DistributedModelParallel(m, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=ShardingPlan({"": plan}), sharders=[sharder],
                                   device=torch.device("cpu"))
    weights = dmp.state_dict()["codebooks.embedding_bags.t__cce.weight"]
    dtype = weights.metadata().tensor_properties.dtype
    kjt = batch(10 + rank, 64)
    target = torch.full((64, 2 * DIM), 0.1)
    losses = []
    for _ in range(15):
        loss = (dmp(kjt).wait().values() - target).pow(2).sum(1).mean()
        loss.backward()  # fused SGD steps the low-precision TBE weights in backward
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(float(t) / world)
    return losses, dtype, memory_report(dmp)["t"], mem["t"]


@pytest.mark.parametrize("low", LOW)
def test_low_precision_trains_under_dmp(low: torch.dtype) -> None:
    """float16 on CPU trains with either TBE kernel; bfloat16 only with torchrec_cce's (the
    sharder's default)."""
    results = run_multiprocess(_train_dmp, 2, low, timeout=600)
    cb16 = 2 * (CHUNKS * ROWS) * (DIM // CHUNKS) * 2
    packed = -(-V * CHUNKS * (ROWS - 1).bit_length() // 32) * 4  # bit-packed p, int32 words
    for rank, (losses, dtype, report, planned) in enumerate(results):
        assert dtype == low
        assert losses[-1] < 0.5 * losses[0], losses
        assert report["codebook_bytes"] == cb16
        # the one CCE codebook table is on rank 0 (table-wise), the small full table on rank 1
        assert report["local_codebook_bytes"] == (cb16 if rank == 0 else 0)
        assert planned["compressed_bytes"] == cb16 + packed + 8  # + the int64 hash generation
    # The planned per-rank bytes count codebooks at float16, plus p and the hash generation
    # (replicated: p is below the sharder's replication threshold) and each rank's half of the
    # id reservoir (256 x ROWS int64 slots over both ranks).
    share = 8 * -(-256 * ROWS // 2)
    planned = results[0][3]["bytes_per_rank"]
    assert planned == [cb16 + packed + 8 + share, packed + 8 + share]


# ---------------------------------------------------------------- every method at float16
def _other_configs(dtype):
    from torchrec_cce import CEConfig, FullConfig, HashingTrickConfig, QRConfig

    return {"full": FullConfig(codebook_dtype=dtype),
            "hashing": HashingTrickConfig(300, codebook_dtype=dtype),
            "ce": CEConfig(300, chunks=4, codebook_dtype=dtype),
            "qr_mult": QRConfig(80, "mult", codebook_dtype=dtype),
            "qr_add": QRConfig(80, "add", codebook_dtype=dtype),
            "qr_concat": QRConfig(80, "concat", codebook_dtype=dtype)}


@pytest.mark.parametrize("kind", ["full", "hashing", "ce", "qr_mult", "qr_add", "qr_concat"])
def test_every_method_stores_float16_codebooks_at_half_the_bytes(kind: str) -> None:
    """FullConfig/HashingTrickConfig/CEConfig/QRConfig(codebook_dtype=torch.float16): FP16
    codebook tables, exactly half the bytes, full_bytes unchanged (the fp32 reference), float32
    outputs within 2^-10 relative of the float32 module holding the same rounded weights."""
    torch.manual_seed(0)
    c32, c16 = _other_configs(torch.float32)[kind], _other_configs(torch.float16)[kind]
    ref = CCEEmbeddingBagCollection(tables(), {"t": c32})
    low = CCEEmbeddingBagCollection(tables(), {"t": c16})
    assert {c.name: c.data_type for c in low.codebook_table_configs() if c.name != "small"} == {
        c.name: DataType.FP16 for c in ref.codebook_table_configs() if c.name != "small"}
    low.load_state_dict({k: v.to(low.state_dict()[k].dtype) for k, v in ref.state_dict().items()})
    with torch.no_grad():
        for k, v in low.state_dict().items():
            ref.state_dict()[k].copy_(v.float())
    r32, r16 = memory_report(ref)["t"], memory_report(low)["t"]
    assert r16["compressed_bytes"] * 2 == r32["compressed_bytes"]
    assert r16["full_bytes"] == r32["full_bytes"] == V * DIM * 4
    assert r16["method"] == r32["method"] == kind.split("_")[0]
    for seed in range(2):
        kjt = batch(seed)
        out32, out16 = ref(kjt).values(), low(kjt).values()
        assert out16.dtype == torch.float32
        scale = out32.abs().max() + 1e-6
        assert ((out16 - out32).abs() <= 2.0 ** -9 * scale).all()  # products: 2 roundings


def test_memcom_has_no_float16_form() -> None:
    from torchrec_cce import MEmComConfig

    # MEmCom's fp32 per-id weights weight the codebook's bag: torch's EmbeddingBag needs the
    # same dtype for both, so MEmCom stays float32 (no codebook_dtype field).
    with pytest.raises(TypeError):
        MEmComConfig(100, codebook_dtype=torch.float16)


def _train_full_fp16(rank: int, world: int):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim import RowWiseAdagrad

    from torchrec_cce import FullConfig
    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder

    sharder = CCEEmbeddingBagCollectionSharder()
    m = CCEEmbeddingBagCollection(tables(), {"t": FullConfig(codebook_dtype=torch.float16)},
                                  device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, m.parameters(), {"lr": 0.1})
    plan = construct_module_sharding_plan(
        m, {"t": table_wise(rank=0, compute_kernel="fused"),
            "small": table_wise(rank=1, compute_kernel="fused")},
        sharder=sharder, local_size=world, world_size=world, device_type="cpu")
    dmp = DistributedModelParallel(m, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=ShardingPlan({"": plan}), sharders=[sharder],
                                   device=torch.device("cpu"))
    dtype = dmp.state_dict()["codebooks.embedding_bags.t.weight"].metadata().tensor_properties.dtype
    kjt = batch(10 + rank, 64)
    target = torch.full((64, 2 * DIM), 0.1)
    losses = []
    for _ in range(15):
        loss = (dmp(kjt).wait().values() - target).pow(2).sum(1).mean()
        loss.backward()  # the fused row-wise Adagrad steps the float16 TBE weights in backward
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(float(t) / world)
    return losses, dtype, memory_report(dmp)["t"]


def test_full_fp16_trains_under_dmp_with_the_fused_optimizer() -> None:
    for losses, dtype, report in run_multiprocess(_train_full_fp16, 2, timeout=600):
        assert dtype == torch.float16
        assert losses[-1] < 0.5 * losses[0], losses
        assert report["compressed_bytes"] == V * DIM * 2 and report["full_bytes"] == V * DIM * 4


def _shard_without_kernel(rank: int, world: int) -> str:
    """The ValueError of sharding bfloat16 codebooks with torchrec_cce's kernel off ("" if
    none)."""
    import os

    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import SGD

    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder

    os.environ["TORCHREC_CCE_TBE_KERNEL"] = "0"
    sharder = CCEEmbeddingBagCollectionSharder()
    m = module(torch.bfloat16, device=torch.device("meta"))
    apply_optimizer_in_backward(SGD, m.parameters(), {"lr": 0.5})
    plan = construct_module_sharding_plan(
        m, {n: table_wise(rank=0, compute_kernel="fused") for n in ("t__cce", "small")},
        sharder=sharder, local_size=world, world_size=world, device_type="cpu")
    try:
        DistributedModelParallel(m, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                 plan=ShardingPlan({"": plan}), sharders=[sharder],
                                 device=torch.device("cpu"))
    except ValueError as e:
        return str(e)
    return ""


def test_bfloat16_needs_the_torchrec_cce_kernel_on_cpu() -> None:
    """fbgemm-gpu-cpu's own CPU TBE has no bfloat16 forward (pinned here, so a future fbgemm
    with kernels shows up); with torchrec_cce's kernel off, sharding bfloat16 codebooks fails
    at construction with a message naming the tables and the fix, not deep inside fbgemm."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(10, 8, EmbeddingLocation.HOST, ComputeDevice.CPU)], weights_precision=SparseType.BF16,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.1)
    assert tbe.weights_host.dtype == torch.bfloat16
    with pytest.raises(NotImplementedError, match="not implemented for 'BFloat16'"):
        tbe(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3]))
    messages = run_multiprocess(_shard_without_kernel, 1, timeout=300)
    assert "tables ['t__cce']: bfloat16 codebooks train on CPU only" in messages[0]
    assert "codebook_dtype=torch.float16" in messages[0]
