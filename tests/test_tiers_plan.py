"""The byte-budget planner with hot tiers (tier_plan, plan_candidates' tiered plans): every
plan fits its budget, its bytes are exactly what memory_report counts of the built module, a
tiered table never takes more bytes than its untiered plan, and the hot ids are the prefix the
rule says."""

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce import (CCEEmbeddingBagCollection, OnlineTieredConfig, TieredConfig,
                          memory_report, plan_candidates, plan_compression)
from torchrec_cce.budget import AUTO_HOT_SHARE, config_bytes, tier_plan
from torchrec_cce.hot_sketch import HotSketch

DIM = 16


def tables():
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=v,
                               feature_names=[f"f{i}"])
            for i, v in enumerate([5000, 800, 8, 40000])]


def counts(ts):
    g = np.random.default_rng(0)
    return {t.name: np.sort(g.zipf(1.3, t.num_embeddings))[::-1].astype(np.float64) for t in ts}


def report_bytes(ts, plan):
    ebc = CCEEmbeddingBagCollection(ts, plan.compression, device=torch.device("meta"))
    return {n: r["compressed_bytes"] for n, r in memory_report(ebc).items()}


FULL = sum(config_bytes(t, None) for t in tables())


@pytest.mark.parametrize("method,fraction", [("cce", 16), ("qr", 16), ("hashing", 64),
                                             ("ce", 64), ("memcom", 4)])
def test_tiered_plans_fit_and_match_memory_report(method, fraction):
    ts, c = tables(), counts(tables())
    base = plan_compression(ts, FULL / fraction, counts=c, methods=[method])
    plan = tier_plan(base, ts, counts=c)
    assert plan.total_bytes <= base.total_bytes <= FULL / fraction
    assert report_bytes(ts, plan) == {n: p.bytes for n, p in plan.tables.items()}
    tiered = [n for n, p in plan.tables.items() if p.hot_ids]
    assert "t3" in tiered  # the large table gets a hot tier
    for n, p in plan.tables.items():
        assert p.bytes <= base.tables[n].bytes
        if n not in tiered:
            assert p == base.tables[n]
            continue
        cfg = p.config
        assert isinstance(cfg, TieredConfig) and cfg.hot_ids == p.hot_ids
        assert p.method == method + "+hot"  # the cold part keeps the table's method
        # auto: AUTO_HOT_SHARE of the table's bytes in hot rows (halved only if the cold
        # method cannot fit the rest)
        row = DIM * (2 if cfg.hot_dtype == torch.float16 else 4)
        assert cfg.hot_ids <= AUTO_HOT_SHARE * base.tables[n].bytes // row
        mass = c[n][: cfg.hot_ids].sum() / c[n].sum()
        assert p.hot_mass == pytest.approx(mass)


def test_explicit_hot_ids():
    ts, c = tables(), counts(tables())
    base = plan_compression(ts, FULL / 8, counts=c, methods=["cce"])
    plan = tier_plan(base, ts, counts=c, hot_ids=300)
    assert plan.tables["t3"].hot_ids == 300
    assert report_bytes(ts, plan) == {n: p.bytes for n, p in plan.tables.items()}
    for bad in (0, -1, "all", 2.5):
        with pytest.raises(ValueError, match="hot_ids must be 'auto' or an int"):
            tier_plan(base, ts, hot_ids=bad)


def test_hot_tables_tier_only_the_named_tables():
    ts, c = tables(), counts(tables())
    base = plan_compression(ts, FULL / 16, counts=c, methods=["cce"])
    everywhere = tier_plan(base, ts, counts=c)
    only = tier_plan(base, ts, counts=c, hot_tables=["t3"])
    assert {n for n, p in everywhere.tables.items() if p.hot_ids} >= {"t0", "t3"}
    assert only.tables["t3"] == everywhere.tables["t3"]  # same tier where asked
    for n in ("t0", "t1", "t2"):  # the others keep their untiered plan
        assert only.tables[n] == base.tables[n]
    assert report_bytes(ts, only) == {n: p.bytes for n, p in only.tables.items()}
    with pytest.raises(ValueError, match="hot_tables: no table named t9, tx .*t0, t1, t2, t3"):
        tier_plan(base, ts, counts=c, hot_tables=["t3", "tx", "t9"])


def test_candidates_include_fitting_tiered_plans():
    ts, c = tables(), counts(tables())
    for fraction in (16, 64):
        plans = plan_candidates(ts, FULL / fraction, counts=c)
        tiered = [p for p in plans if any(r.hot_ids for r in p.tables.values())]
        assert tiered and len(tiered) < len(plans)
        for p in plans:
            assert p.total_bytes <= FULL / fraction
            assert p.total_bytes == sum(config_bytes(t, p.tables[t.name].config) for t in ts)
            assert report_bytes(ts, p) == {n: r.bytes for n, r in p.tables.items()}


@pytest.mark.parametrize("fraction", [16, 64])
def test_candidates_include_a_tiered_cce_plan(fraction):
    """CANDIDATE_TIERED_LADDERS' CCE-first ladder: a candidate whose CCE tables all get a hot
    tier (CCE keeps the cold part), the
    cold CCE sized to the bytes the hot rows leave, each table within its untiered plan's bytes,
    the plan within the budget."""
    from torchrec_cce import CCEConfig
    from torchrec_cce.budget import CANDIDATE_TIERED_LADDERS

    ts, c = tables(), counts(tables())
    ladder = (("cce", 0.0), ("qr", 0.0), ("ce", 0.0))
    assert ladder in CANDIDATE_TIERED_LADDERS
    base = plan_compression(ts, FULL / fraction, counts=c, ladder=ladder)
    want = tier_plan(base, ts, counts=c)
    plans = plan_candidates(ts, FULL / fraction, counts=c)
    keys = [tuple(p.tables.values()) for p in plans]
    assert tuple(want.tables.values()) in keys
    cce = [n for n, r in base.tables.items() if r.method == "cce"]
    assert "t3" in cce  # the largest table
    for big in cce:
        row = want.tables[big]
        assert row.method == "cce+hot" and row.hot_ids >= 1
        assert isinstance(row.config.cold, CCEConfig)
        assert row.bytes <= base.tables[big].bytes
        cold_t = EmbeddingBagConfig(name=big, embedding_dim=DIM, feature_names=["f"],
                                    num_embeddings=ts[int(big[1])].num_embeddings - row.hot_ids)
        assert row.bytes == (row.hot_ids * DIM * 2  # float16 hot rows (the ladder's dtype)
                             + config_bytes(cold_t, row.config.cold))
    assert want.total_bytes <= FULL / fraction
    assert report_bytes(ts, want) == {n: r.bytes for n, r in want.tables.items()}


@pytest.mark.parametrize("method,fraction", [("cce", 8), ("qr", 16), ("hashing", 16),
                                             ("memcom", 4)])
def test_online_tiered_plans_fit_and_match_memory_report(method, fraction):
    """hot_set="online": OnlineTieredConfig per compressed table at no more bytes, its sketch
    in at most the sketch share of them and at least hot_ids counters wide, bytes exactly
    memory_report's (sketch, hot map, hot rows, cold method over all ids)."""
    ts = tables()
    base = plan_compression(ts, FULL / fraction, methods=[method])
    plan = tier_plan(base, ts, hot_set="online", migrate_every=50, sketch_share=0.25)
    assert plan.total_bytes <= base.total_bytes
    assert report_bytes(ts, plan) == {n: p.bytes for n, p in plan.tables.items()}
    online = [n for n, p in plan.tables.items() if p.hot_ids]
    assert "t3" in online
    for n in online:
        p, cfg = plan.tables[n], plan.tables[n].config
        assert isinstance(cfg, OnlineTieredConfig) and cfg.migrate_every == 50
        assert p.method == method + "+online_hot" and cfg.hot_ids == p.hot_ids
        sketch = HotSketch(next(t for t in ts if t.name == n).num_embeddings,
                           width=cfg.sketch_width, depth=cfg.sketch_depth)
        assert cfg.sketch_width >= cfg.hot_ids
        assert sketch.stored_bytes() <= 0.25 * base.tables[n].bytes
        assert p.bytes <= base.tables[n].bytes
    with pytest.raises(ValueError, match="hot_set must be 'prefix' or 'online'"):
        tier_plan(base, ts, hot_set="sketch")


@pytest.mark.parametrize("share", [0.25, 0.75])
def test_hot_share_sizes_the_hot_rows(share):
    """hot_share: the hot rows take at most that share of each tiered table's bytes (the most
    rows that fit it, unless the cold method then no longer fits), bytes still exact."""
    ts, c = tables(), counts(tables())
    base = plan_compression(ts, FULL / 16, counts=c, methods=["ce"],
                            codebook_dtype=torch.float16)
    plan = tier_plan(base, ts, counts=c, hot_share=share)
    assert report_bytes(ts, plan) == {n: p.bytes for n, p in plan.tables.items()}
    t3 = plan.tables["t3"]
    assert t3.hot_ids == int(share * base.tables["t3"].bytes) // (DIM * 2)
    assert t3.bytes <= base.tables["t3"].bytes
    for bad in (0, 1, 1.5, "half"):
        with pytest.raises(ValueError, match="hot_share must be in"):
            tier_plan(base, ts, counts=c, hot_share=bad)


def test_mass_hot_share_follows_the_counts():
    """hot_share="mass": H is the largest prefix whose rows' share of the table's bytes is at
    most the share of the occurrences it carries (checked against a direct scan), a table of
    uniform counts gets no tier, and a more skewed table a larger one."""
    from torchrec_cce.budget import _Curve, mass_hot_ids

    ts = tables()
    skewed = {t.name: np.arange(1, t.num_embeddings + 1, dtype=np.float64) ** -1.2 for t in ts}
    flat = dict(skewed, t3=np.ones(ts[3].num_embeddings))
    base = plan_compression(ts, FULL / 16, counts=skewed, methods=["ce"],
                            codebook_dtype=torch.float16)
    plan = tier_plan(base, ts, counts=skewed, hot_share="mass")
    b, row = base.tables["t3"].bytes, DIM * 2
    cum = np.cumsum(skewed["t3"]) / skewed["t3"].sum()
    want = max(h for h in range(1, b // row + 1) if h * row <= cum[h - 1] * b)
    assert plan.tables["t3"].hot_ids == want
    assert mass_hot_ids(_Curve(ts[3], skewed["t3"]), b, row) == want
    assert report_bytes(ts, plan) == {n: p.bytes for n, p in plan.tables.items()}
    flat_plan = tier_plan(plan_compression(ts, FULL / 16, counts=flat, methods=["ce"],
                                           codebook_dtype=torch.float16),
                          ts, counts=flat, hot_share="mass")
    assert flat_plan.tables["t3"].hot_ids is None  # uniform ids: no hot tier
    steeper = {**skewed, "t3": skewed["t3"] ** 2}
    assert mass_hot_ids(_Curve(ts[3], steeper["t3"]), b, row) > want


@pytest.mark.parametrize("method", ["ce", "cce"])
def test_hot_dtype_float32_in_front_of_float16(method):
    """hot_dtype=float32 before a float16 cold method: the hot rows are float32 (4 bytes per
    value, so half as many in the same share), the cold codebooks stay float16, bytes exact."""
    ts, c = tables(), counts(tables())
    base = plan_compression(ts, FULL / 16, counts=c, methods=[method],
                            codebook_dtype=torch.float16)
    fp16 = tier_plan(base, ts, counts=c)
    fp32 = tier_plan(base, ts, counts=c, hot_dtype=torch.float32)
    assert report_bytes(ts, fp32) == {n: p.bytes for n, p in fp32.tables.items()}
    cfg = fp32.tables["t3"].config
    assert cfg.hot_dtype == torch.float32 and cfg.cold.codebook_dtype == torch.float16
    assert fp16.tables["t3"].config.hot_dtype == torch.float16
    assert fp32.tables["t3"].hot_ids == int(AUTO_HOT_SHARE * base.tables["t3"].bytes) // (DIM * 4)
    assert fp32.total_bytes <= base.total_bytes
