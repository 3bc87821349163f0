"""benchmarks/plan_scale.py on tiny tables at world 8: the per-rank byte accounting against the
plan's shards and the library's plan_memory, the routing formula against the routing code run
on simulated ranks, and a 1/16 plan fitting a cap the full tables do not."""

import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection
from torchrec_cce.distributed import id_routing, plan_memory
from torchrec_cce.distributed.id_routing import IdRange, return_to_requesters, route_to_owners
from torchrec_cce.methods import CCETable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plan_scale  # noqa: E402

WORLD = 8
SMALL_REPLICATE = 1 << 10  # split every CCE assignment of >= 1 KiB by id range
TINY_ARCH = dict(dense_in_features=4, dense_arch_layer_sizes=[8, 16], over_arch_layer_sizes=[8, 1],
                 dcn_num_layers=1, dcn_low_rank_dim=4)


def _tables(scale: int = 1) -> List[EmbeddingBagConfig]:
    sizes = [200_000 * scale, 3_000 * scale, 90_000 * scale, 40, 1_500 * scale]
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=v,
                               feature_names=[f"f{i}"]) for i, v in enumerate(sizes)]


def _hot() -> Dict[str, int]:
    return {"f0": 3, "f1": 1, "f2": 2, "f3": 1, "f4": 5}


def _planned(method: str, hbm_cap: int):
    tables = _tables()
    compression, cplan = plan_scale.compression_for(method, tables)
    model = plan_scale.build_model(tables, compression, TINY_ARCH)
    sharder = plan_scale.CCEEmbeddingBagCollectionSharder(
        plan_scale.EmbeddingBagCollectionSharder(), replicate_assignment_below=SMALL_REPLICATE)
    planner = plan_scale.make_planner(model, sharder, WORLD, hbm_cap, 256, "greedy",
                                      SMALL_REPLICATE)
    return model, planner.plan(model, [sharder])


@pytest.mark.parametrize("method", ["full", "cce@16"])
def test_rank_bytes_match_the_plans_shards(method: str) -> None:
    model, plan = _planned(method, 1 << 30)
    got = plan_scale.rank_bytes(plan, model, WORLD, SMALL_REPLICATE)
    ebc = model.sparse_arch.embedding_bag_collection
    # Every codebook tensor is placed exactly once over the ranks, and so is every O(V) state.
    for name, (total, placed) in got["tensors"].items():
        assert placed == total, name
    codebook_total = sum(c.num_embeddings * c.embedding_dim * 4
                         for c in ebc.codebook_table_configs())
    assert sum(got["codebook"]) == codebook_total
    cce = [m for m in ebc.tables.values() if isinstance(m, CCETable)]
    assert (method == "cce@16") == bool(cce)
    # Split p once over the ranks, the hash generation (one int64) on every rank, and each
    # rank's share of the id reservoir (ceil(sample_capacity / WORLD) int64s).
    assert sum(got["ov"]) == sum(m.logical_assignment_bytes() + WORLD * 8
                                 + WORLD * 8 * -(-m.sample_capacity // WORLD) for m in cce)
    assert all(m.logical_assignment_bytes() >= SMALL_REPLICATE for m in cce)
    # Row-wise Adagrad: one fp32 per row of every shard (column splits keep a copy per shard).
    rows = 0
    for ps in plan.get_plan_for_module("sparse_arch.embedding_bag_collection").values():
        rows += sum(s.shard_sizes[0] for s in ps.sharding_spec.shards)
    assert sum(got["optimizer"]) == 4 * rows
    assert rows >= sum(c.num_embeddings for c in ebc.codebook_table_configs())
    # Per rank, codebook + O(V) is what the library's plan_memory reports for the plan.
    mem = plan_memory(plan, model, WORLD, SMALL_REPLICATE)
    for r in range(WORLD):
        assert got["codebook"][r] + got["ov"][r] == sum(row["bytes_per_rank"][r]
                                                        for row in mem.values())
        assert got["total"][r] == got["codebook"][r] + got["ov"][r] + got["optimizer"][r]


class _FakeDist:
    """Stands in for torch.distributed in id_routing on one simulated rank: records the split
    sizes of every all_to_all_single and answers each rank with what it sent (the routing's
    byte counts on the sender side do not depend on the answers)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.calls = []

    def get_world_size(self, group=None) -> int:  # noqa: ANN001
        return self.world

    def all_to_all_single(self, out, inp, output_split_sizes=None,  # noqa: ANN001
                          input_split_sizes=None, group=None) -> None:
        splits = input_split_sizes or [inp.shape[0] // self.world] * self.world
        row = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
        self.calls.append([n * row for n in splits])
        if out.numel() == inp.numel():
            out.copy_(inp.reshape(out.shape))


def _counted_routing(methods: List[CCETable], ids: List[List[torch.Tensor]], world: int,
                     monkeypatch: pytest.MonkeyPatch) -> float:
    """Mean over ranks of the off-rank bytes each rank's routing sends (counts, ids) and gets
    back (assignments: the owners' answer rows), run through id_routing's own code."""
    total = 0.0
    chunks = max(m.chunks for m in methods)
    for rank in range(world):
        fake = _FakeDist(world)
        monkeypatch.setattr(id_routing, "dist", fake)
        covered = [x[(x >= 0) & (x < m.assigned_ids)] for m, x in zip(methods, ids[rank])]
        ranges = [IdRange(m.assigned_ids, rank, world, align=m.id_alignment()) for m in methods]
        routed = route_to_owners(covered, ranges)
        answers = torch.zeros(routed.incoming.numel(), chunks, dtype=torch.int64)
        return_to_requesters(routed, answers)
        # counts, ids out, answers: the fake mirrors every exchange, so the answers this
        # rank sends as owner are the rows it gets back as requester (one per id it sent).
        counts, sent, back = fake.calls
        total += sum(b for q, b in enumerate(counts + sent + back) if q % world != rank)
    return total / world


@pytest.mark.parametrize("exact", [True, False])
def test_routing_formula_matches_counted_routing(exact: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    world, batch = 8, 64
    tables = [EmbeddingBagConfig(name="a", embedding_dim=16, num_embeddings=2_000,
                                 feature_names=["fa"]),
              EmbeddingBagConfig(name="b", embedding_dim=16, num_embeddings=5_000,
                                 feature_names=["fb", "fc"])]
    hot = {"fa": 2, "fb": 3, "fc": 1}
    compression = {"a": CCEConfig(rows=64, chunks=4),
                   "b": CCEConfig(rows=32, chunks=2, assigned_ids=3_000)}
    ebc = CCEEmbeddingBagCollection(tables, compression, device=torch.device("meta"))
    methods = [ebc.tables["a"], ebc.tables["b"], ebc.tables["b"]]  # requests: fa, fb, fc
    gen = torch.Generator().manual_seed(0)
    if exact:  # every id once per (rank, feature): off-rank shares average to exactly 1 - 1/W
        batch = 1
        hot = {"fa": 2_000, "fb": 5_000, "fc": 5_000}
        ids = [[torch.randperm(t.num_embeddings, generator=gen) for t in
                (tables[0], tables[1], tables[1])] for _ in range(world)]
    else:
        ids = [[torch.randint(0, t.num_embeddings, (batch * h,), generator=gen)
                for t, h in ((tables[0], hot["fa"]), (tables[1], hot["fb"]),
                             (tables[1], hot["fc"]))] for _ in range(world)]
    formula = plan_scale.routing_bytes(ebc, world, batch, hot, covered={"b": 3_000 / 5_000},
                                       replicate_below=1)
    counted = _counted_routing(methods, ids, world, monkeypatch)
    if exact:
        assert counted == pytest.approx(formula["total"], rel=1e-12)
    else:
        assert counted == pytest.approx(formula["total"], rel=0.05)
    assert formula["assign_back"] == 4 * formula["ids_out"]  # int64 answers of 4 chunks
    assert formula["counts"] == 8 * (world - 1)


def test_hot_owner_formula_matches_counted_routing_of_zipf_ids(
        monkeypatch: pytest.MonkeyPatch) -> None:
    world, batch, vocab = 8, 4_000, 5_000
    tables = [EmbeddingBagConfig(name="z", embedding_dim=16, num_embeddings=vocab,
                                 feature_names=["fz"])]
    ebc = CCEEmbeddingBagCollection(tables, {"z": CCEConfig(rows=64, chunks=4)},
                                    device=torch.device("meta"))
    m = ebc.tables["z"]
    gen = torch.Generator().manual_seed(1)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)  # Zipf(1), id 0 hottest
    received = 0  # ids rank 0 gets from the other ranks, counted in the routing's splits
    for rank in range(world):
        fake = _FakeDist(world)
        monkeypatch.setattr(id_routing, "dist", fake)
        ids = torch.multinomial(weights, batch * 2, replacement=True, generator=gen)
        route_to_owners([ids], [IdRange(m.assigned_ids, rank, world, align=m.id_alignment())])
        if rank != 0:
            received += fake.calls[1][0] // 8
    formula = plan_scale.hot_owner_bytes(ebc, world, batch, {"fz": 2}, replicate_below=1)
    assert 8 * received == pytest.approx(formula["ids_in"], rel=0.03)
    assert formula["assign_out"] == 4 * formula["ids_in"]
    mean = plan_scale.routing_bytes(ebc, world, batch, {"fz": 2}, replicate_below=1)
    assert formula["total"] > 2 * (mean["ids_out"] + mean["assign_back"])  # skew: rank 0 is hot


def test_compressed_plan_fits_a_cap_the_full_tables_do_not() -> None:
    # 10x the sizes: CCE's id reservoirs (at most 2^21 ids per table, split over the ranks)
    # would outweigh the tiny tables' own bytes
    tables = _tables(scale=10)
    full = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    cap = full // WORLD // 2  # even perfectly split, the full tables need twice the HBM
    no = plan_scale.plan_tables(tables, _hot(), "full", WORLD, hbm_cap=cap, batch_size=256,
                                proposer="greedy", replicate_below=SMALL_REPLICATE,
                                arch=TINY_ARCH)
    yes = plan_scale.plan_tables(tables, _hot(), "cce@16", WORLD, hbm_cap=cap, batch_size=256,
                                 proposer="greedy", replicate_below=SMALL_REPLICATE,
                                arch=TINY_ARCH)
    assert not no["fits"] and "PlannerError" in no["error"]
    assert yes["fits"] and yes["max_bytes"]["total"] <= cap
    assert yes["compressed_bytes"] <= full / 16
