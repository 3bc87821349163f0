"""Property-based (hypothesis) tests of every method's forward on arbitrary KJTs.

Each generated batch either gives exactly the reference computation of tests/conftest.py
(plain indexing of the module's own codebook weights through the documented hashes) or the
documented clear exception; never a crash inside fbgemm, a NaN or an out-of-bounds read.

Cases: empty batches, empty bags, single-id batches, huge bags, negative ids and ids up to
2^63-1 (valid for hashed methods; the documented ValueError for full tables), weighted KJTs with
zero/negative weights (valid) and NaN/inf weights (ValueError naming the feature), keys in any
order, missing or extra keys (KeyError), int32 and int64 ids and lengths, lengths that do not
sum to the values (ValueError). Methods: full, CCE, CE, hashing, QR (mult/add/concat), MEmCom and
MPE in its search and retrain stages. The sharded module (2 processes, gloo; every rank with its
own batch size, empty batches included, and its own id/length dtypes) is checked against the
reference and the unsharded module on hypothesis-drawn cases run in one spawned job (see the
sharded section).
"""

import functools
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from conftest import ref_forward
from multiprocess import run_multiprocess
from torchrec_cce import (
    CCEConfig,
    CCEEmbeddingBagCollection,
    CEConfig,
    HashingTrickConfig,
    MEmComConfig,
    MPEConfig,
    QRConfig,
)
from torchrec_cce.methods.mpe import RETRAIN, SEARCH
from torchrec_cce.methods.mpe.export import MPEServingTable, export_table, install_serving_tables

V, V_SIDE = 40, 30
METHODS = {
    "full": None,
    "cce": CCEConfig(rows=5, chunks=2),
    "ce": CEConfig(rows=7, chunks=2),
    "hashing": HashingTrickConfig(rows=6),
    "qr_mult": QRConfig(collisions=7, operation="mult"),
    "qr_add": QRConfig(collisions=7, operation="add"),
    "qr_concat": QRConfig(collisions=7, operation="concat"),
    "memcom": MEmComConfig(rows=5),
    # MPE in its two trained stages. Search: frequency-ordered counts (groups = id ranges), a
    # temperature that keeps the width mixture non-degenerate. Retrain: shuffled counts (a per-id
    # group index), widths set to cover pruning and several code ranges.
    "mpe_search": MPEConfig(groups=4, bits=(0, 1, 2, 3, 4, 8), tau=1.0,
                            counts=[100 - 2 * i for i in range(V)]),
    "mpe_retrain": MPEConfig(groups=4, bits=(0, 1, 2, 3, 4, 8), tau=1.0,
                             counts=[(7 * i) % 23 for i in range(V)]),
    # The retrained table exported (torchrec layout: 2/4/8-bit rows in TorchRec's quantised
    # EBC, the rest packed) and served; checked against the trained table's reference.
    "mpe_served": MPEConfig(groups=4, bits=(0, 1, 2, 3, 4, 8), tau=1.0,
                            counts=[(7 * i) % 23 for i in range(V)]),
}
IN_RANGE_ONLY = {"full", "mpe_search", "mpe_retrain", "mpe_served"}  # documented error otherwise
MPE_RETRAIN_WIDTHS = [0, 3, 8, 1]
MPE_SERVED_WIDTHS = [4, 2, 0, 8]
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
# Enough examples to cover every method x pooling x weighting several times, small enough for CI.
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def make_tables(pooling: PoolingType) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=V, feature_names=["f"],
                           pooling=pooling),
        EmbeddingBagConfig(name="u", embedding_dim=2, num_embeddings=V_SIDE, feature_names=["g"]),
    ]


@functools.lru_cache(maxsize=None)
def module(method: str, pooling: PoolingType, weighted: bool) -> CCEEmbeddingBagCollection:
    """One module per (method, pooling, weighting), with non-trivial learned state."""
    torch.manual_seed(0)
    cfg = METHODS[method]
    ebc = CCEEmbeddingBagCollection(make_tables(pooling), {"t": cfg} if cfg else {},
                                    is_weighted=weighted)
    ebc.eval()  # no re-clustering sample: forward is a pure function of the batch
    with torch.no_grad():
        m = ebc.tables["t"]
        if method == "cce":  # a learned-looking p and a later hash generation
            m.write_assignment(torch.arange(V), torch.randint(0, cfg.rows, (V, cfg.chunks)))
            m.h_generation.fill_(2)
        if method == "memcom":
            m.id_weight.uniform_(-2, 2)
        if method.startswith("mpe"):
            randomise_mpe(m)
        if method == "mpe_served":
            m.selected.copy_(torch.tensor(MPE_SERVED_WIDTHS))
            ebc.trained_mpe_tables = {"t": m}
            install_serving_tables(ebc, {"t": MPEServingTable(export_table(m, layout="torchrec"), "t")})
            assert ebc.tables["t"].quantized is not None
    return ebc


def randomise_mpe(m) -> None:  # noqa: ANN001
    """Learned-looking MPE state: mixed logits and a non-zero offset; in the retrain variant,
    selection has run (weights restarted) and the widths cover pruning and 1/3/8 bits."""
    with torch.no_grad():
        m.logits.uniform_(-2, 2)
        m.beta.uniform_(-0.02, 0.02)
        m.steps().mul_(torch.linspace(0.5, 1.5, m.alpha.numel()))
        if m.config is METHODS["mpe_retrain"] or m.config is METHODS["mpe_served"]:
            m.select()
            m.selected.copy_(torch.tensor(MPE_RETRAIN_WIDTHS))
            m.weight.add_(torch.randn_like(m.weight) * 0.01)  # retrained a little
            assert int(m.stage) == RETRAIN
        else:
            assert int(m.stage) == SEARCH


def build_kjt(bags: Dict[str, List[List[int]]], weights: Optional[Dict[str, List[List[float]]]],
              order: List[str], id_dtype: torch.dtype, len_dtype: torch.dtype) -> KeyedJaggedTensor:
    values = [x for k in order for bag in bags[k] for x in bag]
    lengths = [len(bag) for k in order for bag in bags[k]]
    w = None
    if weights is not None:
        w = torch.tensor([x for k in order for bag in weights[k] for x in bag], dtype=torch.float32)
    return KeyedJaggedTensor(keys=order, values=torch.tensor(values, dtype=id_dtype),
                             lengths=torch.tensor(lengths, dtype=len_dtype), weights=w)


def id_strategy(method: str, id_dtype: torch.dtype, vocab: int) -> st.SearchStrategy[int]:
    lo, hi = (INT32_MIN, INT32_MAX) if id_dtype == torch.int32 else (INT64_MIN, INT64_MAX)
    in_range = st.integers(0, vocab - 1)
    if method in IN_RANGE_ONLY:
        return in_range
    edges = st.sampled_from([-1, vocab, vocab + 1, lo, hi, lo + 1, hi - 1])
    return st.one_of(in_range, in_range, st.integers(lo, hi), edges)


@st.composite
def batches(draw):  # noqa: ANN201 - hypothesis composite
    method = draw(st.sampled_from(sorted(METHODS)))
    pooling = draw(st.sampled_from([PoolingType.SUM, PoolingType.MEAN]))
    weighted = draw(st.booleans())
    id_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    len_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    batch_size = draw(st.sampled_from([0, 1, 1, 2, 3, 5]))
    bag_len = st.one_of(st.integers(0, 4), st.integers(0, 4), st.just(0), st.integers(200, 400))
    ids = {"f": id_strategy(method, id_dtype, V), "g": st.integers(0, V_SIDE - 1)}
    bags = {k: [draw(st.lists(ids[k], min_size=n, max_size=n))
                for n in [draw(bag_len) for _ in range(batch_size)]] for k in ("f", "g")}
    weights = None
    if weighted:
        w = st.one_of(st.floats(-3, 3, allow_nan=False, width=32), st.just(0.0))
        weights = {k: [[draw(w) for _ in bag] for bag in bags[k]] for k in bags}
    order = draw(st.permutations(["f", "g"]))
    return method, pooling, weighted, bags, weights, list(order), id_dtype, len_dtype


@FUZZ
@given(batches())
def test_forward_equals_reference(case) -> None:
    method, pooling, weighted, bags, weights, order, id_dtype, len_dtype = case
    ebc = module(method, pooling, weighted)
    out = ebc(build_kjt(bags, weights, order, id_dtype, len_dtype))
    assert out.keys() == ["f", "g"]  # module order, whatever the KJT's order
    batch_size = len(bags["f"])
    assert tuple(out.values().shape) == (batch_size, 6)
    assert torch.isfinite(out.values()).all()
    if batch_size == 0:
        return
    expected = ref_forward(ebc, bags, weights)
    got = out.to_dict()
    for k in ("f", "g"):
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-4)


@FUZZ
@given(st.sampled_from(sorted(METHODS)), st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       st.sampled_from(["f", "g"]), st.integers(0, 7), st.integers(1, 4))
def test_non_finite_weight_names_the_feature(method: str, bad: float, feature: str, position: int,
                                             batch_size: int) -> None:
    ebc = module(method, PoolingType.SUM, True)
    bags = {"f": [[1, 2]] * batch_size, "g": [[3, 4]] * batch_size}
    weights = {k: [[1.0, 1.0] for _ in range(batch_size)] for k in bags}
    flat = position % (2 * batch_size)
    weights[feature][flat // 2][flat % 2] = bad
    with pytest.raises(ValueError, match=f"feature '{feature}'.*not finite"):
        ebc(build_kjt(bags, weights, ["f", "g"], torch.int64, torch.int64))


@FUZZ
@given(st.sampled_from(sorted(IN_RANGE_ONLY)),
       st.sampled_from([-1, V, V + 7, INT64_MAX, INT64_MIN]), st.integers(0, 3))
def test_full_and_mpe_tables_reject_out_of_range_ids(method: str, bad: int, position: int) -> None:
    ebc = module(method, PoolingType.SUM, False)
    ids = [0, 1, 2, 3]
    ids[position] = bad
    with pytest.raises(ValueError, match=r"table 't'.*outside \[0, 40\)"):
        ebc(build_kjt({"f": [ids], "g": [[0]]}, None, ["f", "g"], torch.int64, torch.int64))


@FUZZ
@given(st.sampled_from(sorted(METHODS)), st.sampled_from(["missing", "extra"]), st.integers(0, 3))
def test_missing_keys_raise_and_extra_keys_are_ignored(method: str, kind: str,
                                                       batch_size: int) -> None:
    """Like TorchRec's EBC: a served feature the KJT lacks raises naming it; a key no table
    serves is ignored (the output equals the one without it)."""
    ebc = module(method, PoolingType.SUM, False)
    bags = {"f": [[1]] * batch_size, "g": [[2]] * batch_size}
    if kind == "missing":
        del bags["g"]
        with pytest.raises(KeyError, match=r"lacks features \['g'\]"):
            ebc(build_kjt(bags, None, list(bags), torch.int64, torch.int64))
        return
    expected = ebc(build_kjt(bags, None, list(bags), torch.int64, torch.int64))
    bags["h"] = [[3]] * batch_size
    got = ebc(build_kjt(bags, None, list(bags), torch.int64, torch.int64))
    assert got.keys() == expected.keys()
    assert torch.equal(got.values(), expected.values())


@FUZZ
@given(st.sampled_from(sorted(METHODS)), st.integers(1, 4), st.sampled_from([-2, -1, 1, 3]))
def test_lengths_not_matching_values_raise(method: str, batch_size: int, delta: int) -> None:
    ebc = module(method, PoolingType.SUM, False)
    lengths = torch.ones(2 * batch_size, dtype=torch.int64)
    n = 2 * batch_size + delta
    if n < 0:
        return
    kjt = KeyedJaggedTensor(keys=["f", "g"], values=torch.zeros(n, dtype=torch.int64),
                            lengths=lengths)
    with pytest.raises(ValueError, match="lengths .* sum to"):
        ebc(kjt)


def test_negative_length_raises() -> None:
    ebc = module("cce", PoolingType.SUM, False)
    kjt = KeyedJaggedTensor(keys=["f", "g"], values=torch.zeros(2, dtype=torch.int64),
                            lengths=torch.tensor([2, -1, 1, 0]))
    with pytest.raises(ValueError, match="feature 'f': KJT lengths must be >= 0"):
        ebc(kjt)


def test_float_ids_raise() -> None:
    ebc = module("hashing", PoolingType.SUM, False)
    kjt = KeyedJaggedTensor(keys=["f", "g"], values=torch.zeros(2), lengths=torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids must be int32 or int64"):
        ebc(kjt)


def test_empty_batch_has_gradient_free_empty_output() -> None:
    """A batch of no examples gives an empty KeyedTensor with the logical keys and widths
    (stock TorchRec's EBC raises IndexError on it)."""
    for method in METHODS:
        ebc = module(method, PoolingType.MEAN, False)
        kjt = KeyedJaggedTensor(keys=["g", "f"], values=torch.zeros(0, dtype=torch.int64),
                                lengths=torch.zeros(0, dtype=torch.int64))
        out = ebc(kjt)
        assert out.keys() == ["f", "g"] and out.length_per_key() == [4, 2]
        assert tuple(out.values().shape) == (0, 6)


# ---------------------------------------------------------------- sharded (2 processes)
# A 2-process gloo job per hypothesis example would cost seconds each, so the examples are drawn
# by hypothesis in the parent (a @given function that only records what it is given, derandomised
# so CI draws the same cases every run) and ONE spawned job runs them all: each rank takes its own
# batch of every case (its own batch size, empty batches included, and its own id/length dtypes),
# and compares the sharded output with the independent reference (tests/conftest.py) and with
# the unsharded module. Hypothesis cannot shrink across the process boundary, so a failure is
# reported with the full failing case (the batches are small enough to read).
SHARDED_METHODS = sorted(m for m in METHODS if m != "mpe_served")  # serving is unsharded
SHARDED_EXAMPLES = 60  # per weighting: 2 x 60 cases, each two per-rank batches


def sharded_tables() -> List[EmbeddingBagConfig]:
    """One table per shardable method (MEAN and SUM pooling alternate); dim 8 so every codebook
    has a multiple of 4 columns, as fbgemm's sharded kernels require."""
    return [EmbeddingBagConfig(name=f"t_{m}", embedding_dim=8, num_embeddings=V,
                               feature_names=[f"f_{m}"],
                               pooling=PoolingType.MEAN if i % 2 else PoolingType.SUM)
            for i, m in enumerate(SHARDED_METHODS)]


@st.composite
def rank_batches(draw, weighted: bool):  # noqa: ANN001, ANN201 - hypothesis composite
    """One rank's batch for every sharded table: ``(bags, weights, key order, id dtype,
    length dtype)``, drawn from the same distribution as the unsharded property."""
    batch_size = draw(st.sampled_from([0, 1, 1, 2, 3, 5]))
    bag_len = st.one_of(st.integers(0, 4), st.integers(0, 4), st.just(0), st.integers(200, 300))
    id_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    bags = {f"f_{m}": [draw(st.lists(id_strategy(m, id_dtype, V), min_size=n, max_size=n))
                       for n in [draw(bag_len) for _ in range(batch_size)]]
            for m in SHARDED_METHODS}
    weights = None
    if weighted:
        w = st.one_of(st.floats(-3, 3, allow_nan=False, width=32), st.just(0.0))
        weights = {k: [[draw(w) for _ in bag] for bag in bags[k]] for k in bags}
    order = list(draw(st.permutations(sorted(bags))))
    return bags, weights, order, id_dtype, draw(st.sampled_from([torch.int64, torch.int32]))


def draw_sharded_cases(weighted: bool, world: int = 2) -> List[Tuple]:
    """``SHARDED_EXAMPLES`` hypothesis examples, each a tuple of one batch per rank."""
    cases: List[Tuple] = []

    @settings(max_examples=SHARDED_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.tuples(*[rank_batches(weighted)] * world))
    def record(case: Tuple) -> None:
        cases.append(case)

    record()
    return cases


def dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _sharded_rank(rank: int, world: int, weighted: bool, cases: List[Tuple]) -> Dict[str, object]:
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder
    from torchrec_cce.distributed.tensors import scatter_full

    compression = {f"t_{m}": METHODS[m] for m in SHARDED_METHODS if METHODS[m] is not None}
    torch.manual_seed(0)
    ref = CCEEmbeddingBagCollection(sharded_tables(), compression, is_weighted=weighted)
    ref.eval()
    with torch.no_grad():
        m = ref.tables["t_cce"]
        m.write_assignment(torch.arange(V), torch.randint(0, METHODS["cce"].rows,
                                                          (V, METHODS["cce"].chunks)))
        m.h_generation.fill_(1)
        ref.tables["t_memcom"].id_weight.uniform_(-2, 2)  # per-id weights split by id range
        randomise_mpe(ref.tables["t_mpe_search"])
        randomise_mpe(ref.tables["t_mpe_retrain"])
    # id-range sharded p (replicate_assignment_below=0), codebooks table-wise over both ranks
    sharder = CCEEmbeddingBagCollectionSharder(replicate_assignment_below=0)
    meta = CCEEmbeddingBagCollection(sharded_tables(), compression, is_weighted=weighted,
                                     device=torch.device("meta"))
    names = [c.name for c in meta.codebook_table_configs()]
    plan = ShardingPlan({"": construct_module_sharding_plan(
        meta, {n: table_wise(rank=i % world, compute_kernel="fused") for i, n in enumerate(names)},
        sharder=sharder, local_size=world, world_size=world, device_type="cpu")})
    dmp = DistributedModelParallel(meta, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=plan, sharders=[sharder], device=torch.device("cpu"))
    full = ref.state_dict()
    for key, value in dmp.state_dict().items():
        scatter_full(value, full[key])
    dmp.eval()
    failures, checked = [], 0
    for index, case in enumerate(cases):
        bags, weights, order, id_dtype, len_dtype = case[rank]
        if id_dtype == torch.int32 and not all(INT32_MIN <= x <= INT32_MAX for b in bags.values()
                                               for bag in b for x in bag):
            id_dtype = torch.int64  # (the strategy draws int32-range ids for int32 batches)
        kjt = build_kjt(bags, weights, order, id_dtype, len_dtype)
        got = dmp(kjt).wait()
        unsharded = ref(kjt)
        batch_size = len(next(iter(bags.values())))
        expected = torch.zeros(0, 8 * len(SHARDED_METHODS))
        if batch_size:
            reference = ref_forward(ref, bags, weights)
            expected = torch.cat([reference[f"f_{m}"] for m in SHARDED_METHODS], dim=1)
        what = (f"case {index} rank {rank}: batch {batch_size}, ids {dtype_name(id_dtype)}, "
                f"lengths {dtype_name(len_dtype)}, order {order}")
        if got.keys() != [f"f_{m}" for m in SHARDED_METHODS] or got.keys() != unsharded.keys():
            failures.append(f"{what}: keys {got.keys()}")
        elif tuple(got.values().shape) != tuple(expected.shape):
            failures.append(f"{what}: shape {tuple(got.values().shape)} != {tuple(expected.shape)}")
        elif not torch.isfinite(got.values()).all():
            failures.append(f"{what}: non-finite output; bags {bags} weights {weights}")
        elif not (torch.allclose(got.values(), expected, rtol=1e-4, atol=1e-4)
                  and torch.allclose(got.values(), unsharded.values(), rtol=1e-5, atol=1e-6)):
            diff = (got.values() - expected).abs()
            col = int(diff.max(dim=0).values.argmax()) // 8
            failures.append(f"{what}: table t_{SHARDED_METHODS[col]} max diff {diff.max():.3g} "
                            f"(vs unsharded {(got.values() - unsharded.values()).abs().max():.3g});"
                            f" bags {bags} weights {weights}")
        checked += 1
    return {"failures": failures, "checked": checked}


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("weighted", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sharded_forward_equals_reference_on_hypothesis_batches(weighted: bool) -> None:
    cases = draw_sharded_cases(weighted)
    assert len(cases) == SHARDED_EXAMPLES
    results = run_multiprocess(_sharded_rank, 2, weighted, cases, timeout=1200)
    assert [r["failures"] for r in results] == [[], []]
    assert [r["checked"] for r in results] == [SHARDED_EXAMPLES, SHARDED_EXAMPLES]
