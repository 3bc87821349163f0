"""Each method's one declaration of its per-id state (methods.base.PerIdState) against the
tensors the modules really hold: whole, split by id range, and as the planner counts them."""

import pytest
import torch
from torchrec import EmbeddingBagConfig

from torchrec_cce import CCEConfig, CEConfig, HashingTrickConfig, MEmComConfig, MPEConfig, QRConfig
from torchrec_cce.budget import config_bytes
from torchrec_cce.distributed.per_id_state import (
    load_state,
    state_bytes_per_rank,
    stored_id_range,
)
from torchrec_cce.methods import build_table

V, DIM = 1003, 8
TABLE = EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=V, feature_names=["f"])
CONFIGS = {
    "cce": CCEConfig(rows=24, chunks=2),
    "cce_partial": CCEConfig(rows=24, chunks=2, assigned_ids=500),
    "memcom": MEmComConfig(rows=16),
    "mpe": MPEConfig(groups=4, bits=(0, 2, 4)),
    "hashing": HashingTrickConfig(rows=32),
    "ce": CEConfig(rows=32, chunks=2),
    "qr": QRConfig(collisions=40),
    "full": None,
}


def _state_tensor_bytes(method) -> int:
    return sum(t.numel() * t.element_size() for t in method.state_dict().values())


@pytest.mark.parametrize("name", CONFIGS)
def test_declared_bytes_are_the_module_state(name: str) -> None:
    method = build_table(TABLE, CONFIGS[name])
    assert method.logical_state_bytes() == method.state_bytes() == _state_tensor_bytes(method)
    for s in method.per_id_state():
        t = getattr(method, s.name)
        assert t.shape[0] == s.entries(s.num_ids)
        assert s.total_bytes == t.numel() * t.element_size()
    if CONFIGS[name] is not None and name != "mpe":  # (the budget bounds MPE's serving bytes)
        codebooks = sum(cb.num_embeddings * cb.embedding_dim * 4 for cb in method.codebooks)
        assert config_bytes(TABLE, CONFIGS[name]) == codebooks + method.logical_state_bytes()


@pytest.mark.parametrize("name", ["cce", "cce_partial", "memcom", "mpe"])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_id_ranges_split_the_state_exactly(name: str, world: int) -> None:
    whole = build_table(TABLE, CONFIGS[name])
    per_rank = state_bytes_per_rank(whole, world, replicate_below=0)
    pieces = {s.name: [] for s in whole.per_id_state()}
    for rank in range(world):
        rng = stored_id_range(whole, rank, world, replicate_below=0)
        assert rng is not None and rng.lo % max(s.align for s in whole.per_id_state()) == 0
        part = build_table(TABLE, CONFIGS[name], id_range=(rng.lo, rng.hi))
        part.share_sample(world)  # as the sharder does: CCE keeps its share of the sample
        # What the planner reserves for the rank is what its table stores (and samples).
        assert per_rank[rank] == part.state_bytes() + part.sample_bytes()
        if name.startswith("cce"):  # each rank's share of the id reservoir: ceil(C / world)
            assert part.reservoir.capacity == -(-whole.sample_capacity // world)
            assert part.sample_bytes() == whole.sample_bytes(world) == 8 * part.reservoir.capacity
        for s in part.per_id_state():
            pieces[s.name].append(getattr(part, s.name))
            whole_t = getattr(whole, s.name)
            first = s.entries(rng.lo)
            local = getattr(part, s.name)
            # The rank's entries are the whole tensor's entries of its id range.
            torch.testing.assert_close(local, whole_t[first: first + local.shape[0]])
    for s in whole.per_id_state():
        torch.testing.assert_close(torch.cat(pieces[s.name]), getattr(whole, s.name))
    assert sum(per_rank) == (whole.logical_state_bytes()
                             + (world - 1) * whole.replicated_state_bytes()
                             + world * whole.sample_bytes(world))


def test_small_read_only_state_is_kept_whole_and_trainable_state_is_always_split() -> None:
    cce = build_table(TABLE, CONFIGS["cce"])
    total = sum(s.total_bytes for s in cce.per_id_state())
    assert stored_id_range(cce, 0, 2, replicate_below=total + 1) is None
    assert stored_id_range(cce, 0, 1, replicate_below=0) is None  # one rank: nothing to split
    assert stored_id_range(cce, 1, 2, replicate_below=total).lo > 0
    assert state_bytes_per_rank(cce, 3, replicate_below=total + 1) == [
        cce.state_bytes() + 8 * -(-cce.sample_capacity // 3)] * 3
    memcom = build_table(TABLE, CONFIGS["memcom"])
    rng = stored_id_range(memcom, 0, 1, replicate_below=1 << 40)
    assert (rng.lo, rng.hi) == (0, V)
    assert stored_id_range(build_table(TABLE, CONFIGS["qr"]), 0, 2) is None


def test_build_table_refuses_an_id_range_without_per_id_state() -> None:
    with pytest.raises(ValueError, match="table 't': QRConfig has no per-id state"):
        build_table(TABLE, CONFIGS["qr"], id_range=(0, 10))


def test_load_state_from_the_whole_tensor_and_a_wrong_shape() -> None:
    whole = build_table(TABLE, CONFIGS["memcom"])
    with torch.no_grad():
        whole.id_weight.copy_(torch.arange(V, dtype=torch.float32).unsqueeze(1))
    rng = stored_id_range(whole, 1, 3)
    part = build_table(TABLE, CONFIGS["memcom"], id_range=(rng.lo, rng.hi))
    (state,) = part.per_id_state()
    load_state(part.id_weight, whole.id_weight.detach(), state, rng, "tables.t.id_weight")
    torch.testing.assert_close(part.id_weight, whole.id_weight[rng.lo: rng.hi])
    with pytest.raises(ValueError, match="tables.t.id_weight: expected a ShardedTensor or the "
                                         "whole tensor of 1003 entries"):
        load_state(part.id_weight, whole.id_weight[:10], state, rng, "tables.t.id_weight")
