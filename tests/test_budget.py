"""The byte-budget planner (torchrec_cce/budget.py): exact byte accounting, fitting, allocation.

Every plan is built into a real (meta-device) CCEEmbeddingBagCollection and its bytes are read
back with memory_report, so the planner's arithmetic is checked against the stored tensors;
``train.py --embedding-budget-mb`` is run in-process and its metrics JSON checked the same way.
"""

import dataclasses
import json
import math
import random
import zlib

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import DataType

from torchrec_cce import (
    CCEConfig,
    CCEEmbeddingBagCollection,
    CEConfig,
    FullConfig,
    HashingTrickConfig,
    MEmComConfig,
    QRConfig,
    memory_report,
    plan_compression,
)
from torchrec_cce.budget import PLAN_METHODS, config_bytes
from torchrec_cce.train import defaults


def tbl(name, V, dim=16, fp16=False):
    return EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=V,
                              feature_names=[f"f_{name}"],
                              data_type=DataType.FP16 if fp16 else DataType.FP32)


def built_bytes(tables, compression):
    ebc = CCEEmbeddingBagCollection(tables, compression, device=torch.device("meta"))
    return {n: r["compressed_bytes"] for n, r in memory_report(ebc).items()}


def zipf_counts(V, exponent, scale=1.0):
    return scale * 1e6 * np.arange(1, V + 1, dtype=np.float64) ** -exponent


def test_config_bytes_equals_memory_report_for_random_configs():
    rng = random.Random(0)
    for _ in range(60):
        V = rng.randint(50, 200_000)
        dim = rng.choice([4, 8, 16, 32])
        t = tbl("t", V, dim, fp16=rng.random() < 0.3)
        kind = rng.choice(["cce", "ce", "hashing", "qr", "memcom", "full", "full16"])
        rows = rng.randint(1, max(1, V // 2))
        if kind == "cce":
            cfg = CCEConfig(rows=rows, chunks=rng.choice([c for c in (1, 2, 4, 8) if dim % c == 0]),
                            assigned_ids=rng.choice([None, rng.randint(0, 2 * V)]))
        elif kind == "ce":
            cfg = CEConfig(rows=rows, chunks=rng.choice([1, 2, 4]))
        elif kind == "hashing":
            cfg = HashingTrickConfig(rows=rows)
        elif kind == "qr":
            cfg = QRConfig(collisions=rng.randint(int(V ** 0.5) + 1, V - 1),
                           operation=rng.choice(["mult", "add", "concat"]))
        elif kind == "memcom":
            cfg = MEmComConfig(rows=max(1, rows // 2))
        elif kind == "full16":
            cfg = FullConfig(codebook_dtype=torch.float16)
        else:
            cfg = None
        if kind in ("cce", "ce", "hashing", "qr") and rng.random() < 0.4:
            cfg = dataclasses.replace(cfg, codebook_dtype=torch.float16)
        comp = {} if cfg is None else {"t": cfg}
        assert config_bytes(t, cfg) == built_bytes([t], comp)["t"], cfg


def random_tables(rng, n):
    out, counts = [], {}
    for i in range(n):
        V = int(10 ** rng.uniform(1, 6))
        dim = rng.choice([4, 8, 16, 32])
        t = tbl(f"t{i}", V, dim, fp16=rng.random() < 0.2)
        out.append(t)
        if rng.random() < 0.7:
            c = zipf_counts(V, rng.uniform(0.5, 1.5), scale=rng.uniform(0.1, 10))
            if rng.random() < 0.3:
                np.random.default_rng(i).shuffle(c)  # not frequency-ordered
            counts[t.name] = c
        else:
            counts[t.name] = float(rng.uniform(1, 100))
    return out, counts


@pytest.mark.parametrize("methods", [None] + [[m] for m in PLAN_METHODS])
def test_plans_fit_the_budget_and_match_memory_report(methods):
    rng = random.Random(zlib.crc32(str(methods).encode()))  # str hashes change per process
    fitted = 0
    for trial in range(12):
        tables, counts = random_tables(rng, rng.randint(1, 7))
        full = sum(config_bytes(t, None) for t in tables)
        budget = int(full * 10 ** rng.uniform(-3, 0))
        use_counts = counts if trial % 3 else None
        try:
            plan = plan_compression(tables, budget, counts=use_counts, methods=methods)
        except ValueError as e:  # retry just above the minimum the error names
            assert "cannot hold even the smallest" in str(e)
            need = int(str(e).split("at least ")[1].split(" bytes")[0])
            assert need > budget
            if need > full:
                continue
            budget = int(need + rng.random() * (full - need))
            plan = plan_compression(tables, budget, counts=use_counts, methods=methods)
        fitted += 1
        assert plan.total_bytes <= budget
        if methods == ["mpe"]:  # a serving bound (test_mpe_plans_bound_the_served_bytes_exactly)
            assert all(config_bytes(next(t for t in tables if t.name == n), p.config) == p.bytes
                       for n, p in plan.tables.items())
        else:
            assert built_bytes(tables, plan.compression) == {
                n: p.bytes for n, p in plan.tables.items()}
        for n, p in plan.tables.items():
            assert p.bytes <= p.full_bytes
            if p.method != "full":
                assert p.method == (methods[0] if methods else "cce") or methods is None
        json.dumps(plan.to_dict())
    assert fitted >= 6


def _mpe_serving_bytes_at(table, cfg, widths):
    """Build the MPE table (CPU), select ``widths`` (per group, indices into cfg.bits) and
    return the export's exact serving bytes."""
    from torchrec_cce.methods.mpe.export import export_table, packed_bytes

    ebc = CCEEmbeddingBagCollection([table], {table.name: cfg})
    m = ebc.tables[table.name]
    m.selected.copy_(widths)
    return packed_bytes(export_table(m))


def test_mpe_plans_bound_the_served_bytes_exactly():
    """MPE is planned by its serving bound: with every group at its widest candidate the
    exported table is exactly the planned bytes; any learned selection is at most that."""
    rng = random.Random(5)
    fitted = 0
    for trial in range(10):
        tables, counts = [], {}
        for i in range(rng.randint(1, 3)):
            V = rng.randint(20, 3000)
            t = tbl(f"t{i}", V, rng.choice([4, 8, 16]))
            tables.append(t)
            c = zipf_counts(V, 1.0)
            if trial % 2:
                np.random.default_rng(i).shuffle(c)  # not frequency-ordered: row_of is stored
            counts[t.name] = c
        full = sum(config_bytes(t, None) for t in tables)
        try:
            plan = plan_compression(tables, full * 10 ** rng.uniform(-1.7, -0.4), counts=counts,
                                    methods=["mpe"])
        except ValueError as e:
            assert "cannot hold even the smallest configs (mpe)" in str(e)
            continue
        fitted += 1
        assert plan.total_bytes <= plan.byte_budget
        for t in tables:
            p = plan.tables[t.name]
            if p.method == "full":
                continue
            cfg = p.config
            assert p.method == "mpe" and p.precision == f"mpe<={max(cfg.bits)}bit"
            groups = cfg.groups
            widest = torch.full((groups,), cfg.bits.index(max(cfg.bits)), dtype=torch.int64)
            assert _mpe_serving_bytes_at(t, cfg, widest) == p.bytes
            random_sel = torch.randint(0, len(cfg.bits), (groups,),
                                       generator=torch.Generator().manual_seed(trial))
            assert _mpe_serving_bytes_at(t, cfg, random_sel) <= p.bytes
    assert fitted >= 5


def test_fp16_cce_plans_count_half_the_codebook_bytes():
    t = tbl("t", 100_000)
    counts = {"t": zipf_counts(100_000, 1.0)}
    budget = config_bytes(t, None) // 32
    p32 = plan_compression([t], budget, counts=counts, methods=["cce"]).tables["t"]
    p16 = plan_compression([t], budget, counts=counts, methods=["cce"],
                           codebook_dtype=torch.float16).tables["t"]
    assert p16.config.codebook_dtype == torch.float16 and p16.precision == "fp16"
    assert p32.precision == "fp32"
    assert p16.bytes <= budget and p16.rows > p32.rows
    assert built_bytes([t], {"t": p16.config})["t"] == p16.bytes


@pytest.mark.parametrize("method", ["full", "hashing", "ce", "qr", "cce"])
def test_fp16_plans_of_every_method_fit_and_report_their_precision(method):
    """codebook_dtype=torch.float16 stores every table of the plan at float16: compressed
    tables' codebooks and tables kept full (FullConfig); bytes as built, precision per table."""
    from torchrec_cce import FullConfig

    tables = [tbl("big", 50_000), tbl("mid", 3_000), tbl("tiny", 10)]
    counts = {t.name: zipf_counts(t.num_embeddings, 1.0) for t in tables}
    full = sum(config_bytes(t, None) for t in tables)
    fracs = (2,) if method == "full" else (2, 8, 32)
    for frac in fracs:
        plan = plan_compression(tables, full // frac, counts=counts, methods=[method],
                                codebook_dtype=torch.float16)
        assert plan.total_bytes <= full // frac
        assert built_bytes(tables, plan.compression) == {n: p.bytes for n, p in plan.tables.items()}
        for n, p in plan.tables.items():
            assert p.precision == "fp16", (n, p)
            assert getattr(p.config, "codebook_dtype", None) == torch.float16
            if p.method == "full":
                assert isinstance(p.config, FullConfig) and p.bytes * 2 == p.full_bytes
    # the full table at float16 is exactly half: feasible at 1/2, not below
    plan = plan_compression(tables, full // 2, methods=["full"], codebook_dtype=torch.float16)
    assert plan.total_bytes == full // 2 and all(p.method == "full" for p in plan.tables.values())
    with pytest.raises(ValueError, match="cannot hold even the smallest"):
        plan_compression(tables, full // 2 - 1, methods=["full"], codebook_dtype=torch.float16)


def test_auto_rule_is_the_documented_per_table_ladder():
    """methods=None: every table at float16 (AUTO_DTYPE); a table whose share of the budget
    holds its float16 full table is full; a table given QR is the unique-pair form and a
    table given CE could not hold QR's smallest form at its bytes plus what it left unused;
    the plan fits and its bytes are the built module's. Checked on random table sets."""
    from torchrec_cce import budget as B

    rng = random.Random(11)
    seen = set()
    for trial in range(40):
        tables, counts = random_tables(rng, rng.randint(1, 6))
        tables = [dataclasses.replace(t, data_type=DataType.FP32) for t in tables]
        full = sum(config_bytes(t, None) for t in tables)
        budget = int(full * 10 ** rng.uniform(-2.7, 0))
        use_counts = counts if trial % 3 else None
        try:
            plan = plan_compression(tables, budget, counts=use_counts)
        except ValueError as e:
            assert "cannot hold even the smallest configs (ce at fp16)" in str(e)
            need = int(str(e).split("at least ")[1].split(" bytes")[0])
            assert need > budget and need == sum(
                min(t.embedding_dim * 2, config_bytes(t, FullConfig(torch.float16)))
                for t in tables)
            continue
        assert plan.total_bytes <= budget
        assert built_bytes(tables, plan.compression) == {n: p.bytes for n, p in plan.tables.items()}
        for t in tables:
            p = plan.tables[t.name]
            seen.add(p.method)
            assert p.method in ("full",) + B.AUTO_METHODS
            if p.method == "full":
                assert p.bytes in (config_bytes(t, None), config_bytes(t, FullConfig(torch.float16)))
                continue
            assert p.precision == "fp16"
            full16 = config_bytes(t, FullConfig(torch.float16))
            ratio = dict(B.AUTO_LADDER)
            qr_min = B._fit("qr", t, 1 << 62, 4, 0.25, "mult", torch.float16)
            smallest_qr = config_bytes(t, B.QRConfig(max(2, math.isqrt(t.num_embeddings - 1) + 1),
                                                     "mult", codebook_dtype=torch.float16))
            if p.method == "qr" and qr_min is not None and p.bytes < 2 * smallest_qr:
                continue  # a table floored at QR's unique pairs (DISTINCT_FLOOR_SHARE)
            if p.method != "cce":  # a share that reached CCE's ratio would have taken CCE
                assert p.bytes < ratio["cce"] * full16 or B._fit(
                    "cce", t, p.bytes, 4 if t.embedding_dim % 4 == 0 else 1, 0.25, "mult",
                    torch.float16) is None, (t, p)
            if p.method == "cce":
                assert p.bytes > 0.9 * ratio["cce"] * full16, (t, p)
            elif p.method == "qr":
                assert p.config.collisions ** 2 >= t.num_embeddings
                assert p.bytes > 0.9 * ratio["qr"] * full16, (t, p)
            elif p.bytes >= ratio["qr"] * full16:  # CE above QR's ratio: QR did not fit
                assert qr_min is None or smallest_qr > p.bytes, (t, p)
    assert {"full", "cce", "qr", "ce"} <= seen


def test_auto_plan_keeps_the_ids_of_small_tables_apart():
    """methods=None on Frappe's shapes (a 4,083-id and a 904-id table beside eight tables of
    3-226 ids) at 1/16 of the bytes: the perplexity split alone gives the small tables one CE
    row (every id the same vector); the planner keeps the smallest tables full (every id its
    own row) while the bytes added stay within DISTINCT_FLOOR_SHARE of the budget, smallest
    first; methods=["ce"] likewise."""
    from torchrec_cce import budget as B

    sizes = {"user": 904, "item": 4083, "daytime": 8, "weekday": 8, "isweekend": 3,
             "homework": 4, "cost": 3, "weather": 10, "country": 77, "city": 226}
    tables = [tbl(n, V) for n, V in sizes.items()]
    rng = np.random.default_rng(0)
    counts = {t.name: rng.zipf(1.3, t.num_embeddings).astype(np.int64) for t in tables}
    full = sum(config_bytes(t, None) for t in tables)
    for frac in (16, 64, 256):
        plan = plan_compression(tables, full // frac, counts=counts)
        assert plan.total_bytes <= full // frac
        cost = {t.name: config_bytes(t, FullConfig(torch.float16)) for t in tables}
        apart = [n for n, p in plan.tables.items() if p.method == "full"]
        collapsed = [n for n, p in plan.tables.items() if p.method == "ce" and p.rows == 1]
        # smallest first: no collapsed table is cheaper to keep apart than a floored one
        floored = [n for n in apart if plan.tables[n].bytes <= cost[n]]
        if floored and collapsed:
            assert min(cost[n] for n in collapsed) >= max(cost[n] for n in floored)
        # the floors add at most DISTINCT_FLOOR_SHARE of the budget over CE's one row
        added = sum(cost[n] - 2 * 16 for n in floored)
        assert added <= B.DISTINCT_FLOOR_SHARE * (full // frac), (frac, added)
        if frac == 16:  # every small table keeps its ids apart
            assert set(apart) >= {"daytime", "weekday", "isweekend", "homework", "cost",
                                  "weather"}, plan.format()
        if frac == 256:  # the two cheapest (3 ids, full) still fit in a tenth
            assert {"isweekend", "cost"} <= set(apart), plan.format()
        # one method sized to the budget: the same tables kept full (the cheapest form that
        # keeps ids apart for CE), within the same share of the budget
        ce = plan_compression(tables, full // frac, counts=counts, methods=["ce"],
                              codebook_dtype=torch.float16)
        kept = [n for n, p in ce.tables.items() if p.method == "full"]
        added = sum(ce.tables[n].bytes - 2 * 16 for n in kept)
        assert added <= B.DISTINCT_FLOOR_SHARE * (full // frac), (frac, added)
        if frac == 16:
            assert set(kept) >= {"daytime", "weekday", "isweekend", "homework", "cost",
                                 "weather"}, ce.format()
    # without the floors, the same split collapses them (what the floors fix)
    old = B.DISTINCT_FLOOR_SHARE
    try:
        B.DISTINCT_FLOOR_SHARE = 0.0
        plan = plan_compression(tables, full // 16, counts=counts)
        assert plan.tables["daytime"].method == "ce" and plan.tables["daytime"].rows == 1
        ce = plan_compression(tables, full // 16, counts=counts, methods=["ce"])
        assert ce.tables["daytime"].method == "ce" and ce.tables["daytime"].rows == 1
    finally:
        B.DISTINCT_FLOOR_SHARE = old


def test_proportional_allocation_gives_each_table_its_share(monkeypatch):
    from torchrec_cce import budget as B

    monkeypatch.setattr(B, "DISTINCT_FLOOR_SHARE", 0.0)  # the split alone (no small-table floors)
    tables = [tbl("big", 200_000), tbl("mid", 20_000), tbl("small", 2_000)]
    full = {t.name: config_bytes(t, None) for t in tables}
    total = sum(full.values())
    for frac in (1 / 8, 1 / 64):
        plan = plan_compression(tables, total * frac, methods=["ce"], allocation="proportional")
        assert plan.total_bytes <= total * frac
        assert plan.total_bytes > 0.97 * total * frac  # the leftover of the grid is spent
        for n, p in plan.tables.items():
            share = total * frac * full[n] / total
            # its largest candidate within the share, upgraded by at most one grid step
            assert 0.8 * share < p.bytes <= 1.1 * share, (n, p.bytes, share)
    with pytest.raises(ValueError, match="allocation must be"):
        plan_compression(tables, total / 8, methods=["ce"], allocation="nope")


def test_proportional_allocation_pins_tables_below_their_minimum():
    """Water-filling: a table whose smallest config exceeds its share gets that config and the
    other tables split the rest in proportion (QR's minimum is 2*ceil(sqrt V) rows)."""
    tables = [tbl("big", 1_000_000), tbl("mid", 40_000), tbl("small", 900)]
    full = {t.name: config_bytes(t, None) for t in tables}
    budget = sum(full.values()) // 256
    plan = plan_compression(tables, budget, methods=["qr"], allocation="proportional")
    assert plan.total_bytes <= budget
    share_mid = budget * full["mid"] / sum(full.values())
    assert plan.tables["mid"].bytes > share_mid  # pinned at QR's minimum, above its share
    # the others split what is left in proportion to their full bytes
    rest = budget - plan.tables["mid"].bytes - plan.tables["small"].bytes
    assert plan.tables["big"].bytes > 0.85 * rest


def test_budget_above_full_keeps_every_table_full():
    tables = [tbl("a", 1000), tbl("b", 50_000, 8)]
    full = sum(config_bytes(t, None) for t in tables)
    plan = plan_compression(tables, full)
    assert all(p.method == "full" for p in plan.tables.values()) and plan.compression == {}
    # half the bytes: every table full at float16; in between: float16 first, then the
    # heaviest tables back at their own precision while the bytes last
    half = plan_compression(tables, full // 2)
    assert all(p.method == "full" and p.precision == "fp16" for p in half.tables.values())
    assert half.total_bytes == full // 2
    mid = plan_compression(tables, full * 3 // 4)
    assert {n: p.precision for n, p in mid.tables.items()} == {"a": "fp32", "b": "fp16"}


def test_higher_frequency_tables_get_more_bytes():
    V = 200_000
    tables = [tbl(f"t{i}", V) for i in range(3)]
    full = sum(config_bytes(t, None) for t in tables)
    for exponent in (0.8, 1.1):
        for frac in (1 / 8, 1 / 32, 1 / 128):
            # Same id distribution, 1x / 3x / 10x the training occurrences.
            counts = {f"t{i}": zipf_counts(V, exponent, s) for i, s in enumerate((1, 3, 10))}
            for methods in (None, ["cce"], ["hashing"], ["mpe"]):
                if methods == ["mpe"] and frac < 1 / 16:  # MPE needs >= 1 bit per value
                    continue
                plan = plan_compression(tables, full * frac, counts=counts, methods=methods)
                b = [plan.tables[f"t{i}"].bytes for i in range(3)]
                if methods == ["mpe"]:  # whole bit widths: a coarse grid, so ties are possible
                    assert b[0] <= b[1] <= b[2] and b[0] < b[2], (exponent, frac, methods, b)
                else:
                    assert b[0] < b[1] < b[2], (exponent, frac, methods, b)
    # A flatter table of the same size and mass needs more rows for the same covered mass.
    counts = {"t0": zipf_counts(V, 1.4), "t1": zipf_counts(V, 0.7)}
    counts["t1"] *= counts["t0"].sum() / counts["t1"].sum()
    plan = plan_compression(tables[:2], full / 3 / 16, counts=counts, methods=["hashing"])
    assert plan.tables["t1"].bytes > plan.tables["t0"].bytes


def test_small_tables_stay_full_and_features_sum_into_tables():
    tables = [tbl("big", 1_000_000), tbl("tiny", 30),
              EmbeddingBagConfig(name="multi", embedding_dim=16, num_embeddings=100_000,
                                 feature_names=["m1", "m2"])]
    full = sum(config_bytes(t, None) for t in tables)
    counts = {"big": zipf_counts(1_000_000, 1.0), "tiny": zipf_counts(30, 1.0),
              "m1": zipf_counts(100_000, 1.0), "m2": zipf_counts(100_000, 1.0)}
    value = plan_compression(tables, full / 16, counts=counts, methods=["cce"],
                             allocation="value")
    assert value.tables["tiny"].method == "full"  # the value allocation keeps it full
    assert value.tables["big"].method == "cce"
    # the perplexity split: the tiny table is far below its share, but it is the cheapest to
    # keep apart, so its full table is its floor (DISTINCT_FLOOR_SHARE)
    plan = plan_compression(tables, full / 16, counts=counts, methods=["cce"])
    assert plan.tables["tiny"].method == "full"
    assert plan.tables["big"].method == "cce" and plan.tables["multi"].method == "cce"
    auto = plan_compression(tables, full / 16, counts=counts)  # the rule without methods
    assert auto.tables["big"].method == "qr" and auto.tables["big"].precision == "fp16"
    # mass shares: the two-feature table carries twice the occurrences of "big"
    assert plan.tables["multi"].mass_share == pytest.approx(
        2 * counts["m1"].sum() / (counts["big"].sum() + counts["tiny"].sum() + 2 * counts["m1"].sum()))


def test_cce_plan_covers_the_most_frequent_prefix():
    V = 500_000
    t = tbl("t", V)
    counts = {"t": zipf_counts(V, 1.1)}
    plan = plan_compression([t], config_bytes(t, None) / 64, counts=counts, methods=["cce"])
    p = plan.tables["t"]
    cfg = p.config
    assert isinstance(cfg, CCEConfig) and 0 < cfg.assigned_ids < V and p.assigned_ids == cfg.assigned_ids
    c = counts["t"]
    assert p.covered_mass == pytest.approx(c[: cfg.assigned_ids].sum() / c.sum())
    # about half the bytes go to p (assignment_share=0.5), the rest to the two codebooks
    rep = memory_report(CCEEmbeddingBagCollection([t], plan.compression, device=torch.device("meta")))
    assert 0.45 < rep["t"]["assignment_bytes"] / rep["t"]["compressed_bytes"] < 0.55
    # chunks as a budget choice
    for chunks in (1, 2, 8):
        plan_c = plan_compression([t], config_bytes(t, None) / 64, counts=counts,
                                  methods=["cce"], chunks=chunks)
        assert plan_c.tables["t"].chunks == chunks
        assert plan_c.total_bytes <= config_bytes(t, None) / 64


def test_infeasible_budget_names_tables_and_minimum():
    tables = [tbl("huge", 10_000_000), tbl("mid", 100_000)]
    with pytest.raises(ValueError) as e:
        plan_compression(tables, 1000, methods=["qr"])
    msg = str(e.value)
    assert "'huge'" in msg and "'mid'" in msg and "at least" in msg
    need = int(msg.split("at least ")[1].split(" bytes")[0])
    # the named minimum is exactly feasible
    plan = plan_compression(tables, need, methods=["qr"])
    assert plan.total_bytes == need
    with pytest.raises(ValueError, match="cannot hold"):
        plan_compression(tables, need - 1, methods=["qr"])
    with pytest.raises(ValueError, match="unknown methods"):
        plan_compression(tables, 10**9, methods=["nope"])
    with pytest.raises(ValueError, match="counts has no entry"):
        plan_compression(tables, 10**9, counts={"huge": 1.0})


# ---------------------------------------------------------------- train.py --embedding-budget-mb
TRAIN = ("--data", "synthetic", "--synthetic-train-batches", "8", "--synthetic-val-batches", "2",
         "--synthetic-test-batches", "2", "--batch-size", "128", "--no-progress")


def train_run(*argv):
    from test_train_protocol import run

    return run(*TRAIN, *argv)


def check_train_plan(m, budget_mib):
    plan = m["embedding_plan"]
    assert plan is not None and plan["byte_budget"] == int(budget_mib * 2**20)
    assert m["embedding_bytes"] == plan["total_bytes"] <= budget_mib * 2**20
    for name, row in plan["tables"].items():  # what memory_report measured == what was planned
        assert m["embedding_tables"][name]["compressed_bytes"] == row["bytes"], name
        assert m["embedding_tables"][name]["method"] == row["method"], name
    assert all(np.isfinite(v) for _, v in m["train_loss_curve"])
    return plan


@pytest.mark.timeout(900)
@pytest.mark.parametrize("chunks,dim", [(1, 16), (8, 32)])
def test_train_without_method_lets_the_planner_choose(chunks, dim):
    from torchrec_cce import budget as B

    m = train_run("--embedding-budget-mb", "0.2", "--chunks", str(chunks), "--embedding-dim",
                  str(dim), "--dense-arch", f"64,{dim}")
    plan = check_train_plan(m, 0.2)
    methods = {r["method"] for r in plan["tables"].values()}
    assert methods <= {"full", *B.AUTO_METHODS}, methods
    assert len(methods) >= 2
    # float16, except tables kept whole at their own precision with bytes to spare
    assert all(r["precision"] == "fp16" or r["method"] == "full"
               for r in plan["tables"].values())
    assert any(r["precision"] == "fp16" for r in plan["tables"].values())
    assert all(r["chunks"] == chunks for r in plan["tables"].values()
               if r["method"] in ("cce", "ce"))
    assert m["method"] in ("mixed", *B.AUTO_METHODS)
    assert "compressed to fit 0.2 MiB" in m["stdout"]
    # a CCE plan gets the default re-clustering schedule without any flag
    m = train_run("--embedding-budget-mb", "0.2", "--method", "cce", "--chunks", str(chunks),
                  "--embedding-dim", str(dim), "--dense-arch", f"64,{dim}", "--epochs", "1")
    check_train_plan(m, 0.2)
    # 1 epoch of 8 steps: the fractions of epoch 1 only (half of one epoch has no epoch end)
    expected = sorted({max(1, round(float(f) * 8))
                       for f in defaults.DEFAULT_RECLUSTER_AT.split(",") if f})
    assert m["cce_settings"]["recluster_steps"] == expected
    assert [r["step"] for r in m["reclusterings"]] == expected
    n = defaults.DEFAULT_RECLUSTER_EPOCHS
    assert defaults.default_recluster_epochs(50) == n == defaults.default_recluster_epochs(n + 1)
    assert defaults.default_recluster_epochs(1) == 0  # never after the last epoch's end
    # --method cce stores its codebooks (and the tables kept full) at float16 by default
    assert all(r["precision"] == "fp16" for r in m["embedding_plan"]["tables"].values())


@pytest.mark.timeout(900)
def test_train_with_method_sizes_that_method_to_the_budget():
    m = train_run("--embedding-budget-mb", "0.3", "--method", "hashing")
    plan = check_train_plan(m, 0.3)
    assert {r["method"] for r in plan["tables"].values()} <= {"hashing", "full"}
    assert m["method"] == "hashing"


def test_train_budget_flag_errors():
    from test_train_protocol import cli_error

    assert "two budgets; pass one" in cli_error(
        *TRAIN, "--embedding-budget-mb", "1", "--max-params-per-table", "100")
    assert "must be positive, got -1" in cli_error(*TRAIN, "--embedding-budget-mb", "-1")



# ---------------------------------------------------------------- candidate plans (validation)
def distinct(plans):
    """Each plan's per-table rows, duplicates dropped, first occurrence first."""
    keys = []
    for p in plans:
        if tuple(p.tables.values()) not in keys:
            keys.append(tuple(p.tables.values()))
    return keys


def test_plan_candidates_start_with_the_rule_and_are_distinct_fitting_plans():
    from torchrec_cce import budget as B

    tables = [tbl("big", 40_000), tbl("mid", 4_000), tbl("small", 200), tbl("tiny", 8)]
    counts = {t.name: np.arange(t.num_embeddings, 0, -1, dtype=np.float64) for t in tables}
    full = sum(B.config_bytes(t, None) for t in tables)
    for fraction in (4, 8, 16, 64):
        budget = full // fraction
        plans = B.plan_candidates(tables, budget, counts=counts)
        rule = plan_compression(tables, budget, counts=counts)
        assert tuple(plans[0].tables.values()) == tuple(rule.tables.values())
        assert 1 <= len(plans) <= (len(B.CANDIDATE_LADDERS) + len(B.CANDIDATE_METHODS)
                                   + len(B.CANDIDATE_TIERED_LADDERS))
        # the ladders' plans, then the single-method plans, then the tiered ladders' plans,
        # duplicates dropped, in that order
        offered = []
        for ladder in B.CANDIDATE_LADDERS:
            p = plan_compression(tables, budget, counts=counts, ladder=ladder)
            assert {r.method for r in p.tables.values()} <= {"full", *(m for m, _ in ladder)}
            offered.append(p)
        for method in B.CANDIDATE_METHODS:
            p = plan_compression(tables, budget, counts=counts, methods=[method],
                                 codebook_dtype=torch.float16)
            assert {r.method for r in p.tables.values()} <= {"full", method}
            offered.append(p)
        for ladder in B.CANDIDATE_TIERED_LADDERS:
            p = B.tier_plan(plan_compression(tables, budget, counts=counts, ladder=ladder),
                            tables, counts=counts)
            assert any(r.hot_ids for r in p.tables.values())
            offered.append(p)
        assert all(p.total_bytes <= budget for p in offered)
        expected = distinct(offered)
        assert distinct(plans) == expected
        # the CE-only candidate is the plan of --method ce --codebook-dtype float16
        ce_fp16 = plan_compression(tables, budget, counts=counts, methods=["ce"],
                                   codebook_dtype=torch.float16)
        assert tuple(ce_fp16.tables.values()) in expected
        assert ce_fp16.tables["big"].method == "ce"
    # all-CCE (CANDIDATE_METHODS) at 1/64: CCE on 'small' too, where the CCE-first ladder has CE
    all_cce = plan_compression(tables, full // 64, counts=counts, methods=["cce"],
                               codebook_dtype=torch.float16)
    assert [all_cce.tables[n].method for n in ("big", "mid", "small")] == ["cce"] * 3
    assert plan_compression(tables, full // 64, counts=counts,
                            ladder=B.CANDIDATE_LADDERS[2]).tables["small"].method == "ce"
    assert tuple(all_cce.tables.values()) in [tuple(p.tables.values())
                                              for p in B.plan_candidates(tables, full // 64,
                                                                         counts=counts)]
    # a budget CCE's smallest configs do not fit: the ladders' plans only, no error
    small = full // 10_000
    with pytest.raises(B.BudgetTooSmallError, match="cannot hold even the smallest"):
        plan_compression(tables, small, counts=counts, methods=["cce"], codebook_dtype=torch.float16)
    ladder_plans = distinct([plan_compression(tables, small, counts=counts, ladder=ladder)
                             for ladder in B.CANDIDATE_LADDERS]
                            + [B.tier_plan(plan_compression(tables, small, counts=counts,
                                                            ladder=ladder), tables, counts=counts)
                               for ladder in B.CANDIDATE_TIERED_LADDERS])
    assert distinct(B.plan_candidates(tables, small, counts=counts)) == ladder_plans
    # QR first puts QR on 'big' at 1/4, where the rule puts CCE
    qr_first = plan_compression(tables, full // 4, counts=counts, ladder=B.CANDIDATE_LADDERS[1])
    assert qr_first.tables["big"].method == "qr"
    assert plan_compression(tables, full // 4, counts=counts).tables["big"].method == "cce"


def test_ladder_errors_are_clear():
    tables = [tbl("big", 40_000)]
    with pytest.raises(ValueError, match="last one a floor"):
        plan_compression(tables, 10**5, ladder=(("qr", 0.0), ("cce", 0.0)))
    with pytest.raises(ValueError, match="must be among"):
        plan_compression(tables, 10**5, ladder=(("nope", 0.0), ("ce", 0.0)))
    with pytest.raises(ValueError, match="leave it out"):
        plan_compression(tables, 10**5, methods=["ce"], ladder=(("ce", 0.0),))
    from torchrec_cce import plan_candidates

    with pytest.raises(ValueError, match="leave methods out"):
        plan_candidates(tables, 10**5, methods=["ce"])


@pytest.mark.timeout(900)
def test_train_plan_select_validation_keeps_the_lowest_validation_loss():
    m = train_run("--embedding-budget-mb", "0.1", "--plan-select", "validation", "--epochs", "2")
    sel = m["plan_selection"]
    cands = sel["candidates"]
    assert len(cands) >= 2, m["stdout"]
    vals = [c["val_logloss"] for c in cands]
    assert sel["chosen"] == int(np.argmin(vals))
    chosen = cands[sel["chosen"]]
    # the result is the chosen run's, whole: metrics, plan and bytes
    assert m["val_logloss"] == chosen["val_logloss"] == min(vals)
    assert m["test_logloss"] == chosen["test_logloss"]
    assert m["embedding_plan"] == chosen["plan"]
    check_train_plan(m, 0.1)
    plans = [c["plan"]["tables"] for c in cands]
    assert all(p != q for i, p in enumerate(plans) for q in plans[i + 1:])
    # the tiered CCE candidate (CANDIDATE_TIERED_LADDERS) trains, its cold CCE re-clustered
    tiered_cce = [c for c in cands
                  if any(t["method"] == "cce+hot" for t in c["plan"]["tables"].values())]
    assert tiered_cce, [[t["method"] for t in p.values()] for p in plans]
    assert np.isfinite(tiered_cce[0]["val_logloss"]) and tiered_cce[0]["reclusterings"] > 0
    assert tiered_cce[0]["plan"]["total_bytes"] <= 0.1 * 2**20
    # candidate 0 is the rule's plan: the same run as without --plan-select
    rule = train_run("--embedding-budget-mb", "0.1", "--epochs", "2")
    assert rule["embedding_plan"] == cands[0]["plan"]
    assert rule["val_logloss"] == pytest.approx(cands[0]["val_logloss"], abs=1e-6)
    assert m["wall_seconds"] >= sum(c["wall_seconds"] for c in cands) * 0.99
    assert "plan selection (lowest val log loss)" in m["stdout"]


def test_train_plan_select_flag_errors():
    for extra in (["--plan-select", "validation"],
                  ["--plan-select", "validation", "--embedding-budget-mb", "1", "--method", "qr"],
                  ["--plan-select", "validation", "--embedding-budget-mb", "1",
                   "--checkpoint-dir", "/tmp/x"]):
        from test_train_protocol import cli_error

        assert "--plan-select validation" in cli_error(*TRAIN, *extra)
