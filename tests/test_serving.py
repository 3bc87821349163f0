"""Serving CCE collections with INT8/INT4 codebooks (torchrec_cce/serving.py): TorchRec's
quantised EBC in place of the codebooks; outputs within the documented bound of the float
module's; exact serving bytes; clear errors for what cannot be served."""

import copy
from typing import Dict, List

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

from torchrec_cce import (
    CCEConfig,
    CCEEmbeddingBagCollection,
    CEConfig,
    HashingTrickConfig,
    MEmComConfig,
    MPEConfig,
    QRConfig,
    memory_report,
)
from torchrec_cce.memory import stored_bytes
from torchrec_cce.methods import packed
from torchrec_cce.serving import (
    dequantize_rows,
    quantize_codebooks,
    quantize_rows,
    row_error_bound,
    served_codebooks,
    serving_bytes,
)

DIM = 16
SIZES = {"cce": 3000, "ce": 2000, "qr_add": 1500, "qr_mult": 1500, "hash": 1000, "memcom": 1200,
         "mean": 800, "full": 30}
INT4 = torch.quint4x2


def tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=v, feature_names=[f"f_{n}"],
                               pooling=PoolingType.MEAN if n == "mean" else PoolingType.SUM)
            for n, v in SIZES.items()]


COMPRESSION = {"cce": CCEConfig(rows=64, chunks=4), "ce": CEConfig(rows=64, chunks=2),
               "qr_add": QRConfig(collisions=16, operation="add"),
               "qr_mult": QRConfig(collisions=16, operation="mult"),
               "hash": HashingTrickConfig(rows=50), "memcom": MEmComConfig(rows=40),
               "mean": CEConfig(rows=32, chunks=4)}


def trained_like() -> CCEEmbeddingBagCollection:
    """A collection with spread-out weights (as after training): rows of different ranges."""
    torch.manual_seed(0)
    m = CCEEmbeddingBagCollection(tables(), COMPRESSION)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * torch.rand(p.shape[0], 1, generator=g))
            else:  # MEmCom's per-id weights, some negative
                p.copy_(torch.randn(p.shape, generator=g))
    return m


def batch(seed: int, weighted: bool, batch_size: int = 16) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys, values, lengths = [f"f_{n}" for n in SIZES], [], []
    for n, v in SIZES.items():
        lens = torch.randint(0, 5, (batch_size,), generator=g)
        lengths.append(lens)
        values.append(torch.randint(0, v, (int(lens.sum()),), generator=g))
    values = torch.cat(values)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=values, lengths=torch.cat(lengths),
        weights=torch.rand(values.numel(), generator=g) * 2 - 0.5 if weighted else None)


def _with_weights(m: CCEEmbeddingBagCollection, rows: Dict[str, torch.Tensor],
                  per_id_abs: bool) -> CCEEmbeddingBagCollection:
    """A copy of ``m`` whose codebook rows are ``rows[table]`` (and MEmCom's per-id weights
    their absolute values when ``per_id_abs``)."""
    out = copy.deepcopy(m)
    with torch.no_grad():
        for name, bag in out.codebooks.embedding_bags.items():
            bag.weight.copy_(rows[name])
        if per_id_abs:
            out.tables["memcom"].id_weight.abs_()
    return out


def _abs_kjt(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    w = kjt.weights_or_none()
    return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                             weights=None if w is None else w.abs())


def _bounds(m: CCEEmbeddingBagCollection, kjt: KeyedJaggedTensor, dtype: torch.dtype):
    """Per output element: the documented bound ``sum_j |w_j| e_row_j`` (+ fp32 slack) for the
    linear tables, and the product rule for QR-mult."""
    weights = {n: b.weight.detach() for n, b in m.codebooks.embedding_bags.items()}
    e = {n: row_error_bound(w, dtype).unsqueeze(1).expand_as(w) for n, w in weights.items()}
    err_module = _with_weights(m, e, per_id_abs=True)
    abs_module = _with_weights(m, {n: w.abs() for n, w in weights.items()}, per_id_abs=True)
    akjt = _abs_kjt(kjt)
    max_rows = 2 * 4 * 4  # CCE: <= 4 ids per bag, 2 rows per id and chunk, 4 chunks
    slack = {k: max_rows * 2.0 ** -23 * v for k, v in abs_module(akjt).to_dict().items()}
    bound = {k: v + slack[k] for k, v in err_module(akjt).to_dict().items()}
    # QR-mult: |Q'R' - QR| <= eQ |R| + |Q| eR + eQ eR over the pooled quotient/remainder.
    remapped = m.remap(kjt)
    pooled = m.codebooks(remapped).to_dict()
    e_pooled = err_module.codebooks(_abs_kjt(remapped)).to_dict()
    q, r = pooled["f_qr_mult__qr_q"], pooled["f_qr_mult__qr_r"]
    eq = e_pooled["f_qr_mult__qr_q"] + max_rows * 2.0 ** -23 * q.abs()
    er = e_pooled["f_qr_mult__qr_r"] + max_rows * 2.0 ** -23 * r.abs()
    bound["f_qr_mult"] = eq * r.abs() + q.abs() * er + eq * er + 2.0 ** -20 * (q * r).abs()
    return bound


@pytest.mark.parametrize("dtype", [torch.int8, INT4], ids=["int8", "int4"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_quantised_outputs_within_the_documented_bound(dtype: torch.dtype, weighted: bool) -> None:
    m = trained_like()
    served = quantize_codebooks(m, dtype)
    assert isinstance(served.codebooks, QuantEBC) and isinstance(m.codebooks.embedding_bags,
                                                                 torch.nn.ModuleDict)
    worst = 0.0
    for seed in range(3):
        kjt = batch(seed, weighted)
        ref = m(kjt).to_dict()
        out = served(kjt).to_dict()
        bound = _bounds(m, kjt, dtype)
        for key, value in ref.items():
            err = (out[key] - value.detach()).abs()
            assert bool((err <= bound[key]).all()), (
                f"{key}: error {float(err.max())} above its bound at "
                f"{int((err > bound[key]).sum())} elements")
            ratio = (err / bound[key].clamp(min=1e-30))[bound[key] > 0]
            worst = max(worst, float(ratio.max()) if ratio.numel() else 0.0)
    # The bound is tight: a bag of one row reaches almost half a step.
    assert worst > 0.5, worst  # measured: 0.98 (INT8), 0.995 (INT4)


def test_rows_bound_each_entry_and_are_fbgemm_rows() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(500, 8, generator=g) * torch.rand(500, 1, generator=g) * 10
    w[0] = 1.0  # a constant row (scale 1, exact)
    w[1] = 3.0 + torch.arange(8) * 1e-6  # a nearly constant row far from 0 (bias rounding)
    for dtype, bits in ((torch.int8, 8), (INT4, 4)):
        rows = quantize_rows(w, dtype)
        assert tuple(rows.shape) == (500, 8 * bits // 8 + 4)
        err = (dequantize_rows(rows, dtype) - w).abs().max(dim=1).values
        bound = row_error_bound(w, dtype)
        assert bool((err <= bound).all())
        scale = rows[:, -4:].contiguous().view(torch.float16)[:, 0].float()
        rng = w.max(dim=1).values - w.min(dim=1).values
        # the step is the row's range over 2^bits - 1 (up to fp16 rounding of scale and bias)
        torch.testing.assert_close(scale[2:], rng[2:] / (2 ** bits - 1), rtol=2e-3, atol=1e-6)
        assert float(err[0]) == 0.0


def test_serving_bytes_exact() -> None:
    m = trained_like()
    predicted = serving_bytes(m, torch.int8)
    served = quantize_codebooks(m, torch.int8)
    report = memory_report(served)

    def row(d: int) -> int:  # an fbgemm INT8 row: d code bytes + fp16 scale and bias
        return d + 4

    cce = COMPRESSION["cce"]
    p_bytes = packed.packed_bytes(SIZES["cce"], 4, packed.bits_for(64))
    expected = {
        "cce": 2 * 64 * 4 * row(4) + p_bytes + 8,  # A and B of 4 chunks, packed p, h generation
        "ce": 64 * 2 * row(8),
        "qr_add": -(-1500 // 16) * row(16) + 16 * row(16),
        "qr_mult": -(-1500 // 16) * row(16) + 16 * row(16),
        "hash": 50 * row(16),
        "memcom": 40 * row(16) + 4 * SIZES["memcom"],  # fp32 per-id weights stay
        "mean": 32 * 4 * row(4),
        "full": 30 * row(16),
    }
    assert cce.rows == 64
    stored = {}  # every tensor the quantised module stores, per table
    for key, t in served.state_dict().items():
        name = key.split(".")[2] if key.startswith("codebooks.") else key.split(".")[1]
        stored[name.split("__")[0]] = stored.get(name.split("__")[0], 0) + stored_bytes(t)
    for name, n in expected.items():
        assert report[name]["compressed_bytes"] == predicted[name] == n == stored[name], name
        assert report[name]["serving_bytes"] == n
    # fp32 codebooks: 16 bytes per 4-column row; INT8: 8
    assert memory_report(m)["cce"]["codebook_bytes"] == 2 * 64 * 4 * 16


def test_int4_bytes_and_odd_columns_refused() -> None:
    m = trained_like()
    served = quantize_codebooks(m, INT4)
    assert memory_report(served)["hash"]["compressed_bytes"] == 50 * (8 + 4)
    def ce(dim: int, chunks: int) -> CCEEmbeddingBagCollection:
        return CCEEmbeddingBagCollection(
            [EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=100, feature_names=["f"])],
            {"t": CEConfig(rows=8, chunks=chunks)})

    # fbgemm keeps the fp16 scale/bias 2-byte aligned: a row's code bytes must be even.
    with pytest.raises(ValueError, match=r"codebook table 't__ce' has 6 columns.*torch.int8"):
        quantize_codebooks(ce(12, 2), INT4)
    quantize_codebooks(ce(12, 2), torch.int8)  # 6 code bytes
    with pytest.raises(ValueError, match=r"codebook table 't__ce' has 3 columns.*even number"):
        quantize_codebooks(ce(6, 2), torch.int8)


def test_unservable_configurations_raise_clearly() -> None:
    m = trained_like()
    with pytest.raises(ValueError, match="torch.int8 or torch.quint4x2"):
        quantize_codebooks(m, torch.float16)
    served = quantize_codebooks(m)
    with pytest.raises(ValueError, match="already quantised"):
        quantize_codebooks(served)
    with pytest.raises(TypeError, match="unsharded CCEEmbeddingBagCollection"):
        quantize_codebooks(torch.nn.Linear(2, 2))
    mpe = CCEEmbeddingBagCollection(tables()[:1], {"cce": MPEConfig(groups=4, counts=[1] * 3000)})
    with pytest.raises(ValueError, match=r"table 'cce' is an MPE table.*save_mpe"):
        quantize_codebooks(mpe)
    # Training INT8 codebooks stays refused, pointing at the serving export.
    with pytest.raises(ValueError, match=r"table 'cce'.*quantize_codebooks"):
        CCEEmbeddingBagCollection(tables()[:1], {"cce": CCEConfig(64, 4, codebook_dtype=torch.int8)})


def test_served_codebooks_context_equals_quantised_module_and_restores() -> None:
    m = trained_like()
    served = quantize_codebooks(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    kjt = batch(7, weighted=True)
    with served_codebooks(m):
        inside = m(kjt).values().detach()
    torch.testing.assert_close(inside, served(kjt).values(), atol=1e-5, rtol=1e-5)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_planner_budgets_serving_bytes() -> None:
    """``plan_compression(serving_dtype=torch.int8)`` sizes float CCE tables so that their
    INT8 serving form fits the budget; its per-table bytes are the quantised module's."""
    from torchrec_cce import plan_compression
    from torchrec_cce.budget import config_bytes

    ts = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=v, feature_names=[f"f{i}"])
          for i, v in enumerate([20000, 5000, 900, 12])]
    full = sum(config_bytes(t, None) for t in ts)
    budget = full // 16
    plan = plan_compression(ts, budget, methods=["cce"], serving_dtype=torch.int8)
    float_plan = plan_compression(ts, budget, methods=["cce"])
    m = CCEEmbeddingBagCollection(ts, plan.compression)
    served = serving_bytes(m, torch.int8)
    assert {n: p.bytes for n, p in plan.tables.items()} == served
    assert sum(served.values()) <= budget
    assert sum(memory_report(m)[t.name]["compressed_bytes"] for t in ts) > budget  # float
    assert plan.tables["t0"].rows > float_plan.tables["t0"].rows  # more rows per byte
    quantized = memory_report(quantize_codebooks(m))
    assert {t.name: quantized[t.name]["compressed_bytes"] for t in ts} == served


# ---------------------------------------------------------------- under DMP (2 processes)
def _served_under_dmp(rank: int, world: int, kind: str):
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import (
        column_wise,
        construct_module_sharding_plan,
        table_wise,
    )
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder
    from torchrec_cce.distributed.tensors import scatter_full

    sharder = CCEEmbeddingBagCollectionSharder()
    module = CCEEmbeddingBagCollection(tables(), COMPRESSION, device=torch.device("meta"))
    gen = {"tw": lambda i: table_wise(rank=i % world),
           "cw": lambda i: column_wise(ranks=list(range(world)))}[kind]
    names = [c.name for c in module.codebook_table_configs()]
    plan = ShardingPlan({"": construct_module_sharding_plan(
        module, {n: gen(i) for i, n in enumerate(names)}, sharder=sharder, local_size=world,
        world_size=world, device_type="cpu")})
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=plan, sharders=[sharder], device=torch.device("cpu"))
    full = trained_like().state_dict()
    for key, value in dmp.state_dict().items():
        scatter_full(value, full[key])
    kjt = batch(40 + rank, weighted=True)
    before = dmp(kjt).wait().values().detach()
    try:
        with served_codebooks(dmp):
            served = dmp(kjt).wait().values().detach()
    except ValueError as e:
        return str(e)
    after = dmp(kjt).wait().values().detach()
    return before, served, after


def test_served_codebooks_under_dmp_equal_the_quantised_module() -> None:
    from multiprocess import run_multiprocess

    results = run_multiprocess(_served_under_dmp, 2, "tw", timeout=600)
    m = trained_like()
    quantised = quantize_codebooks(m)
    for rank, (before, served, after) in enumerate(results):
        kjt = batch(40 + rank, weighted=True)
        torch.testing.assert_close(before, m(kjt).values().detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(served, quantised(kjt).values(), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(served, before, atol=1e-5)  # it did serve INT8 values
        assert torch.equal(after, before)  # restored
    # Column-wise shards hold parts of rows: serving quantises whole rows, so it refuses.
    messages = run_multiprocess(_served_under_dmp, 2, "cw", timeout=600)
    assert all("split by columns" in msg for msg in messages)
