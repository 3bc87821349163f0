"""memory_report / summarize / compression_for_budget / total_compression against bytes and
parameter counts computed by hand."""

import math

import pytest
import torch
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import DataType

from torchrec_cce import (CCEConfig, CEConfig, CCEEmbeddingBagCollection, HashingTrickConfig,
                          MEmComConfig, QRConfig, compression_for_budget, memory_report,
                          summarize, total_compression)


def table(name="t", v=1000, dim=16, data_type=DataType.FP32):
    return EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=v,
                              feature_names=[f"f_{name}"], data_type=data_type)


def report_of(cfg, v=1000, dim=16, device=None, data_type=DataType.FP32):
    compression = {} if cfg is None else {"t": cfg}
    ebc = CCEEmbeddingBagCollection([table(v=v, dim=dim, data_type=data_type)], compression,
                                    device=device)
    return memory_report(ebc)["t"]


def expect(r, *, method, full, codebook, assignment, compressed, params, full_params):
    assert r["method"] == method
    assert r["full_bytes"] == full
    assert r["codebook_bytes"] == codebook
    assert r["assignment_bytes"] == assignment
    assert r["compressed_bytes"] == compressed
    assert r["params"] == params
    assert r["full_params"] == full_params
    assert r["ratio"] == pytest.approx(full / compressed, rel=1e-12)


# CCE: codebooks + packed p (ceil(log2 rows) bits per entry, whole int32 words) + the 8-byte
# hash generation.
def test_cce_packed_assignment():
    r = report_of(CCEConfig(rows=64, chunks=4))
    cb = 2 * (4 * 64) * (16 // 4) * 4          # two stacked codebooks, fp32
    asg = 1000 * 4 * 6 // 8                     # V x chunks x 6 bits = 750 int32 words
    assert (cb, asg) == (8192, 3000)
    expect(r, method="cce", full=1000 * 16 * 4, codebook=cb, assignment=asg,
           compressed=cb + asg + 8, params=2 * 64 * 16, full_params=16000)


def test_cce_packed_assignment_above_32768_rows():
    r = report_of(CCEConfig(rows=40000, chunks=4), v=100_000, device="meta")
    cb = 2 * (4 * 40000) * 4 * 4
    asg = 100_000 * 4 * 16 // 8                 # 16 bits per entry
    expect(r, method="cce", full=100_000 * 16 * 4, codebook=cb, assignment=asg,
           compressed=cb + asg + 8, params=2 * 40000 * 16, full_params=1_600_000)


def test_cce_fp16_codebooks():
    r = report_of(CCEConfig(rows=64, chunks=2), data_type=DataType.FP16)
    cb = 2 * (2 * 64) * 8 * 2
    expect(r, method="cce", full=1000 * 16 * 2, codebook=cb, assignment=4 * 375,
           compressed=cb + 1500 + 8, params=2 * 64 * 16, full_params=16000)


def test_ce():
    r = report_of(CEConfig(rows=100, chunks=4))
    expect(r, method="ce", full=64000, codebook=4 * 100 * 4 * 4, assignment=0,
           compressed=6400, params=1600, full_params=16000)
    assert r["ratio"] == 10


def test_hashing():
    r = report_of(HashingTrickConfig(rows=100))
    expect(r, method="hashing", full=64000, codebook=100 * 16 * 4, assignment=0,
           compressed=6400, params=1600, full_params=16000)


def test_memcom_counts_per_id_weights():
    r = report_of(MEmComConfig(rows=100))
    expect(r, method="memcom", full=64000, codebook=100 * 16 * 4, assignment=0,
           compressed=6400 + 1000 * 4, params=1600 + 1000, full_params=16000)


@pytest.mark.parametrize("op", ["mult", "add"])
def test_qr_mult_add(op):
    r = report_of(QRConfig(collisions=30, operation=op))
    q_rows = math.ceil(1000 / 30)
    assert q_rows == 34
    expect(r, method="qr", full=64000, codebook=(34 + 30) * 16 * 4, assignment=0,
           compressed=4096, params=(34 + 30) * 16, full_params=16000)


def test_qr_concat_splits_dims():
    r = report_of(QRConfig(collisions=30, operation="concat"), dim=15)
    cb = 34 * 7 * 4 + 30 * 8 * 4                # quotient dim 15 // 2, remainder the rest
    expect(r, method="qr", full=1000 * 15 * 4, codebook=cb, assignment=0, compressed=cb,
           params=34 * 7 + 30 * 8, full_params=15000)


def test_full_table_ratio_one():
    r = report_of(None)
    expect(r, method="full", full=64000, codebook=64000, assignment=0, compressed=64000,
           params=16000, full_params=16000)
    assert r["ratio"] == 1


@pytest.mark.parametrize("cfg", [CCEConfig(rows=64), CEConfig(rows=64), HashingTrickConfig(rows=64),
                                 QRConfig(collisions=30), MEmComConfig(rows=64), None])
def test_report_params_equal_config_num_parameters(cfg):
    r = report_of(cfg)
    assert r["params"] == (16000 if cfg is None else cfg.num_parameters(table()))


def test_summarize_totals_and_nested_model():
    tables = [table("a", v=1000), table("b", v=500, dim=8), table("c", v=50)]
    ebc = CCEEmbeddingBagCollection(tables, {"a": CCEConfig(rows=64, chunks=4),
                                             "b": MEmComConfig(rows=20)})
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), ebc)  # found inside any model
    rep = memory_report(model)
    assert sorted(rep) == ["a", "b", "c"]
    s = summarize(rep)
    full_bytes = (1000 * 16 + 500 * 8 + 50 * 16) * 4
    a_bytes = 8192 + 3000 + 8
    b_bytes = 20 * 8 * 4 + 500 * 4
    c_bytes = 50 * 16 * 4
    assert s["full_bytes"] == full_bytes
    assert s["compressed_bytes"] == a_bytes + b_bytes + c_bytes
    assert s["assignment_bytes"] == 3000
    assert s["full_params"] == 1000 * 16 + 500 * 8 + 50 * 16
    assert s["params"] == 2 * 64 * 16 + (20 * 8 + 500) + 50 * 16
    assert s["param_ratio"] == pytest.approx(s["full_params"] / s["params"])
    assert s["byte_ratio"] == pytest.approx(full_bytes / (a_bytes + b_bytes + c_bytes))
    assert s["param_ratio"] == pytest.approx(total_compression(tables, ebc.compression))


def test_sample_bytes_count_cce_reservoirs_per_rank():
    """CCE's id reservoir (min(256 rows, 2^21) int64 slots, on every rank, outside the state
    dict) is reported as sample_bytes, tiered CCE's through its cold part, other methods 0;
    summarize adds them up per rank and keeps them out of training_bytes."""
    from torchrec_cce import TieredConfig
    tables = [table("a", v=1000), table("b", v=3000), table("c", v=500), table("d", v=100_000)]
    ebc = CCEEmbeddingBagCollection(tables, {
        "a": CCEConfig(rows=64, chunks=4), "b": TieredConfig(hot_ids=100, cold=CCEConfig(rows=32)),
        "c": QRConfig(collisions=20), "d": CCEConfig(rows=10_000)}, device="meta")
    rep = memory_report(ebc)
    expected = {"a": 256 * 64 * 8, "b": 256 * 32 * 8, "c": 0, "d": (1 << 21) * 8}
    assert {t: r["sample_bytes"] for t, r in rep.items()} == expected
    s = summarize(rep)
    assert s["sample_bytes_per_rank"] == sum(expected.values())
    assert s["training_bytes"] == sum(r["compressed_bytes"] for r in rep.values())


# ---------------------------------------------------------------- the paper's protocol
BUDGET_TABLES = [table("small", v=10), table("mid", v=1000), table("big", v=5000)]
P = 4000  # parameters per table; small (160 params) stays full


def _smallest_qr_m(v, budget_rows):
    return next(m for m in range(1, v + 1) if math.ceil(v / m) + m <= budget_rows)


@pytest.mark.parametrize("method,expected", [
    ("cce", {"mid": CCEConfig(rows=125, chunks=4), "big": CCEConfig(rows=125, chunks=4)}),
    ("ce", {"mid": CEConfig(rows=250, chunks=4), "big": CEConfig(rows=250, chunks=4)}),
    ("hashing", {"mid": HashingTrickConfig(rows=250), "big": HashingTrickConfig(rows=250)}),
    ("qr", {"mid": QRConfig(collisions=5), "big": QRConfig(collisions=22)}),
    ("full", {}),
])
def test_compression_for_budget_rows(method, expected):
    comp = compression_for_budget(BUDGET_TABLES, method, P)
    assert comp == expected
    by_name = {t.name: t for t in BUDGET_TABLES}
    for name, cfg in comp.items():
        assert cfg.num_parameters(by_name[name]) <= P
    if method == "qr":
        for name, cfg in comp.items():
            v = by_name[name].num_embeddings
            assert math.ceil(v / cfg.collisions) + cfg.collisions <= P // 16
            assert cfg.collisions == _smallest_qr_m(v, P // 16)
    full = 160 + 16000 + 80000
    compressed = 160 + sum(comp[n].num_parameters(by_name[n]) if n in comp
                           else by_name[n].num_embeddings * 16 for n in ("mid", "big"))
    assert total_compression(BUDGET_TABLES, comp) == pytest.approx(full / compressed)
    if method == "cce":
        assert total_compression(BUDGET_TABLES, comp) == pytest.approx(96160 / 8160)


def test_compression_for_budget_memcom():
    comp = compression_for_budget(BUDGET_TABLES, "memcom", 8000, seed=7)
    assert comp == {"mid": MEmComConfig(rows=(8000 - 1000) // 16, seed=7),
                    "big": MEmComConfig(rows=(8000 - 5000) // 16, seed=7)}
    assert comp["mid"].num_parameters(BUDGET_TABLES[1]) == 437 * 16 + 1000 <= 8000
    assert comp["big"].num_parameters(BUDGET_TABLES[2]) == 187 * 16 + 5000 <= 8000


def test_compression_for_budget_builds_and_reports():
    tables = [table("small", v=10), table("mid", v=1000), table("big", v=5000)]
    comp = compression_for_budget(tables, "cce", P, chunks=2)
    ebc = CCEEmbeddingBagCollection(tables, comp, device="meta")
    s = summarize(memory_report(ebc))
    assert s["params"] == 160 + 2 * 4000
    assert s["param_ratio"] == pytest.approx(total_compression(tables, comp))
    assert memory_report(ebc)["small"]["method"] == "full"


def test_total_compression_without_compression_is_one():
    assert total_compression(BUDGET_TABLES, None) == 1
    assert total_compression(BUDGET_TABLES, {}) == 1


def test_memcom_budget_below_vocabulary_raises():
    with pytest.raises(ValueError, match="big"):
        compression_for_budget(BUDGET_TABLES, "memcom", 4000)


def test_qr_budget_infeasible_is_not_silently_exceeded():
    big = [table("big", v=1_000_000)]
    with pytest.raises(ValueError, match="'big'.*raise max_params_per_table"):
        compression_for_budget(big, "qr", 16 * 1000)
