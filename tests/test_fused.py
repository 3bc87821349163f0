"""The fused remap op (``torch.ops.torchrec_cce.remap``) against the torch-ops reference path.

Both paths must give identical codebook KJTs (keys, values, lengths, offsets, weights), hence
bit-identical pooled outputs, gradients and optimizer updates, for every method, SUM/MEAN
pooling, weighted KJTs, empty and multi-hot bags, ids outside ``[0, V)``, unsharded and sharded
(2 gloo processes, CCE assignment split by id range). The hash must equal
``torchrec_cce.hashing`` bit for bit. Where the op cannot be built the modules fall back with
one notice line (tested in subprocesses that simulate a missing compiler).
"""

import copy
import os
import shutil
import subprocess
import sys
from typing import Dict, List

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from conftest import ref_pool
from multiprocess import run_multiprocess
from torchrec_cce import (
    CCEConfig,
    CCEEmbeddingBagCollection,
    CEConfig,
    HashingTrickConfig,
    MEmComConfig,
    QRConfig,
)
from torchrec_cce import ops
from torchrec_cce.hashing import derive_seed, hash_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_OP = ops.fused_available()
needs_op = pytest.mark.skipif(not HAVE_OP, reason="the fused op could not be built here "
                              "(no C++ compiler?): only the fallback tests apply")

METHODS = {
    "full": None,
    "hashing": HashingTrickConfig(rows=13, seed=1),
    "ce": CEConfig(rows=7, chunks=4, seed=2),
    "qr_mult": QRConfig(collisions=9, operation="mult"),
    "qr_add": QRConfig(collisions=9, operation="add"),
    "qr_concat": QRConfig(collisions=9, operation="concat"),
    "memcom": MEmComConfig(rows=11, seed=3),
    "cce": CCEConfig(rows=8, chunks=4, seed=4),
    "cce_c2": CCEConfig(rows=5, chunks=2, seed=5),
}
V = {"t0": 100, "t1": 60, "t2": 40}


def tables(pooling: PoolingType) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=V["t0"],
                           feature_names=["a", "b"], pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=V["t1"],
                           feature_names=["c"], pooling=pooling),
        # a full table alongside, SUM, so the mixed module is tested too
        EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=V["t2"],
                           feature_names=["d"]),
    ]


def build(method: str, pooling: PoolingType, weighted: bool, fused: bool,
          seed: int = 0) -> CCEEmbeddingBagCollection:
    torch.manual_seed(seed)
    cfg = METHODS[method]
    comp = {} if cfg is None else {"t0": cfg, "t1": METHODS["cce_c2"] if method == "cce" else cfg}
    ebc = CCEEmbeddingBagCollection(tables(pooling), comp, is_weighted=weighted,
                                    allow_larger=True, fused=fused)
    with torch.no_grad():
        for m in ebc.tables.values():
            if hasattr(m, "dense_assignment"):  # a learned-looking p and a later hash generation
                g = torch.Generator().manual_seed(7)
                n = m.assigned_ids
                m.write_assignment(torch.arange(n),
                                   torch.randint(0, m.rows, (n, m.chunks), generator=g))
                m.h_generation.fill_(3)
            if hasattr(m, "id_weight"):
                m.id_weight.copy_(torch.rand(m.id_weight.shape) + 0.5)
    return ebc


def pair(method: str, pooling: PoolingType, weighted: bool):
    fused = build(method, pooling, weighted, fused=True)
    ref = build(method, pooling, weighted, fused=False)
    ref.load_state_dict(fused.state_dict())
    assert fused.fused and not ref.fused
    return fused, ref


def random_kjt(seed: int, batch: int = 6, weighted: bool = False, out_of_range: bool = True,
               keys=("d", "c", "a", "b")) -> KeyedJaggedTensor:
    """Bags of 0-4 ids (empty and multi-hot), keys in a different order than the tables, ids
    of compressed tables partly outside [0, V) (negative, huge)."""
    g = torch.Generator().manual_seed(seed)
    size = {"a": V["t0"], "b": V["t0"], "c": V["t1"], "d": V["t2"]}
    values, lengths = [], []
    for k in keys:
        lens = torch.randint(0, 5, (batch,), generator=g)
        lens[0] = 0  # always one empty bag
        n = int(lens.sum())
        ids = torch.randint(0, size[k], (n,), generator=g)
        if out_of_range and k != "d":
            wild = torch.tensor([-1, -(2 ** 63), 2 ** 63 - 1, size[k], 2 ** 40, -77])
            pick = torch.rand(n, generator=g) < 0.3
            ids[pick] = wild[torch.randint(0, len(wild), (int(pick.sum()),), generator=g)]
        values.append(ids)
        lengths.append(lens)
    values = torch.cat(values)
    w = torch.rand(values.numel(), generator=g) + 0.1 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=values,
                                               lengths=torch.cat(lengths), weights=w)


def assert_same_kjt(x: KeyedJaggedTensor, y: KeyedJaggedTensor) -> None:
    assert x.keys() == y.keys()
    assert torch.equal(x.values(), y.values())
    assert torch.equal(x.lengths(), y.lengths())
    assert torch.equal(x.offsets(), y.offsets())
    assert x.length_per_key() == y.length_per_key()
    assert x.offset_per_key() == y.offset_per_key()
    assert (x.weights_or_none() is None) == (y.weights_or_none() is None)
    if x.weights_or_none() is not None:
        assert torch.equal(x.weights(), y.weights())


# ---------------------------------------------------------------- hashing
@needs_op
def test_op_hash_equals_hashing_module_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(-(2 ** 63), 2 ** 63 - 1, (5000,), generator=g),
                     torch.tensor([0, -1, 1, 2 ** 63 - 1, -(2 ** 63), 0xFFFFFFFF])])
    keys = [derive_seed(s, "t", i, "h") for s in range(3) for i in range(2)]
    rows = [1, 7, 4096, 2 ** 31 + 11, 2 ** 62 + 5, 3]
    spec = torch.tensor([ops.spec_row(0, "hash", r, key=k) for k, r in zip(keys, rows)])
    values, lengths, w = ops.remap(ids, torch.tensor([ids.numel()]), None, 1, spec)
    assert w is None and lengths.tolist() == [ids.numel()] * len(rows)
    expected = torch.cat([hash_ids(ids, k, r) for k, r in zip(keys, rows)])
    assert torch.equal(values, expected)


@needs_op
@pytest.mark.parametrize("rows,chunks", [(64, 2), (40000, 2), (5, 3), (1, 4), (1000, 4),
                                         (2 ** 16 + 3, 3), (2 ** 30 + 1, 2)])
def test_op_cce_pair_packed_offset_and_precomputed_assignment(rows, chunks):
    """p read from the packed words holding ids [lo, lo + L) (others: the hash fallback), or
    precomputed; h from the generation. Rows 2^k and not, entries that straddle int32 words
    (bits 3, 10, 17, 31), 0-bit entries (rows 1). Reference: packed.unpack of the same words."""
    from torchrec_cce.methods import packed
    from torchrec_cce.methods.cce import CCETable

    t = EmbeddingBagConfig(name="t", embedding_dim=12, num_embeddings=1000, feature_names=["f"])
    m = CCETable(t, CCEConfig(rows=rows, chunks=chunks, seed=9))
    m.h_generation.fill_(5)
    bits = packed.bits_for(rows)
    g = torch.Generator().manual_seed(rows)
    lo, count = 300, 250
    stored = torch.randint(0, rows, (count, chunks), generator=g)
    words = packed.pack(stored, bits)
    ids = torch.tensor([-5, 0, 299, 300, 301, 549, 550, 999, 1000, 2 ** 60, 420, -(2 ** 63)])
    local = ids - lo
    inside = ((local >= 0) & (local < count)).unsqueeze(1)
    p = torch.where(inside, packed.unpack(words, local.clamp(0, count - 1), chunks, bits),
                    m.hash_assignment(ids))
    h = m.bucket(ids)
    want = torch.cat([torch.stack([p[:, i], rows + h[:, i]], 1).reshape(-1) + 2 * i * rows
                      for i in range(chunks)])
    specs = m.stream_specs()
    from_words = torch.tensor([ops.spec_row(0, "cce_pair", rows, offset=s.offset, key=s.key,
                                            h_key=s.h_key, generation=0, assignment=0,
                                            assignment_lo=lo, assignment_count=count, bits=bits,
                                            chunks=chunks, column=s.column) for s in specs])
    pre = torch.tensor([ops.spec_row(0, "cce_pair", rows, offset=s.offset, key=s.key,
                                     h_key=s.h_key, generation=0, precomputed=0,
                                     column=s.column) for s in specs])
    lens = torch.tensor([3, 0, 9])
    got, out_lens, _ = ops.remap(ids, lens, None, 3, from_words, [m.h_generation], [words])
    assert torch.equal(got, want) and out_lens.tolist() == [6, 0, 18] * chunks
    got, _, _ = ops.remap(ids, lens, None, 3, pre, [m.h_generation], [], [p])
    assert torch.equal(got, want)
    if bits == 0:  # nothing stored (0 words): every covered id reads p = 0
        return
    # a words tensor too short for the layout is rejected, not read out of bounds
    with pytest.raises(RuntimeError, match="words|packed"):
        ops.remap(ids, lens, None, 3, from_words, [m.h_generation], [words[: len(words) // 2]])


# ---------------------------------------------------------------- unsharded: every method
@needs_op
@pytest.mark.parametrize("weighted", [False, True], ids=["unw", "w"])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN], ids=["SUM", "MEAN"])
@pytest.mark.parametrize("method", list(METHODS))
def test_fused_equals_reference(method, pooling, weighted):
    fused, ref = pair(method, pooling, weighted)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (fused, ref)]
    for step in range(3):
        kjt = random_kjt(step, weighted=weighted, out_of_range=method != "full")
        assert_same_kjt(fused.remap(kjt), ref.remap(kjt))
        outs = [m(kjt) for m in (fused, ref)]
        assert outs[0].keys() == outs[1].keys() == ["a", "b", "c", "d"]
        assert torch.equal(outs[0].values(), outs[1].values())
        target = torch.randn(outs[0].values().shape, generator=torch.Generator().manual_seed(step))
        for out, opt in zip(outs, opts):
            opt.zero_grad()
            ((out.values() - target) ** 2).sum().backward()
        for (n, p), (n2, q) in zip(fused.named_parameters(), ref.named_parameters()):
            assert n == n2
            if p.grad is None:
                assert q.grad is None
            else:
                assert torch.equal(p.grad, q.grad), n
        for opt in opts:
            opt.step()
        for (n, p), q in zip(fused.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), n
    if method == "memcom":  # the op's weight gradient reached the per-id weights
        assert float(fused.tables["t0"].id_weight.grad.abs().sum()) > 0
    # ... and both equal the independent per-id reference of conftest.py
    kjt = random_kjt(10, weighted=weighted, out_of_range=method != "full")
    got = fused(kjt).to_dict()
    per = kjt.to_dict()
    for t in fused.embedding_bag_configs():
        for f in t.feature_names:
            jt = per[f]
            bags = [b.tolist() for b in torch.split(jt.values(), jt.lengths().tolist())]
            ws = ([w.tolist() for w in torch.split(jt.weights(), jt.lengths().tolist())]
                  if weighted else [None] * len(bags))
            for row, (bag, w) in enumerate(zip(bags, ws)):
                torch.testing.assert_close(got[f][row], ref_pool(fused, t, bag, w).detach(),
                                           atol=1e-5, rtol=1e-5)


@needs_op
def test_fused_recluster_then_forward_matches_reference():
    """After re-clustering (new p, new hash generation) both paths still agree."""
    from torchrec_cce import recluster

    fused, ref = pair("cce", PoolingType.SUM, False)
    for m in (fused, ref):
        m.train()
        m(random_kjt(0))
        recluster(m, iters=2)
    assert int(fused.tables["t0"].h_generation) == 4
    kjt = random_kjt(1)
    assert_same_kjt(fused.remap(kjt), ref.remap(kjt))
    assert torch.equal(fused(kjt).values(), ref(kjt).values())


@needs_op
def test_fused_full_table_rejects_out_of_range_ids_like_reference():
    for fused in (True, False):
        ebc = build("full", PoolingType.SUM, False, fused=fused)
        with pytest.raises(ValueError, match="table 't2': id 40 is outside \\[0, 40\\)"):
            ebc(KeyedJaggedTensor.from_lengths_sync(
                keys=["a", "b", "c", "d"], values=torch.tensor([1, 2, 3, 40]),
                lengths=torch.tensor([1, 1, 1, 1])))


@needs_op
def test_precomputed_assignment_path_equals_packed():
    """A CCE table whose p the op cannot read itself (fused_assignment() is None, as for a
    sharded id range) goes through lookup_assignment and the op's precomputed input: same
    result as the packed read and as the reference."""
    fused, ref = pair("cce", PoolingType.SUM, True)
    pre = copy.deepcopy(fused)
    for m in pre.tables.values():
        if hasattr(m, "fused_assignment"):
            m.fused_assignment = lambda: None
    kjt = random_kjt(3, weighted=True)
    assert_same_kjt(pre.remap(kjt), ref.remap(kjt))
    assert_same_kjt(fused.remap(kjt), ref.remap(kjt))
    assert torch.equal(pre(kjt).values(), ref(kjt).values())
    plans = [v for v in fused._remap_cache.values() if hasattr(v, "assignment_tables")]
    assert plans and all(p.assignment_tables == ["t0", "t1"] for p in plans)
    plans = [v for v in pre._remap_cache.values() if hasattr(v, "assignment_tables")]
    assert plans and all(p.assignment_tables == [] for p in plans)


@needs_op
@pytest.mark.parametrize("weighted", [False, True], ids=["unw", "w"])
@pytest.mark.parametrize("rows,chunks,assigned", [
    (16, 4, None),        # 2^k rows, 4 bits: 16 bits per id, whole words every 2 ids
    (1000, 4, 37),        # 10 bits (straddles words), p stored for 37 of 100 ids
    (3, 2, 0),            # nothing stored: every id takes the hash fallback
    (2 ** 17 + 1, 2, 90),  # 18 bits
    (1, 2, None),         # 0 bits
])
def test_fused_packed_p_equals_reference(rows, chunks, assigned, weighted):
    """The op reads the packed p inside the kernel (frequency-bounded assigned_ids < V, ids
    outside [0, V), empty and multi-hot bags, weighted): KJT, pooled output, gradients and
    optimizer updates equal the reference path exactly."""
    cfg = CCEConfig(rows=rows, chunks=chunks, seed=11, assigned_ids=assigned)

    def make(fused):
        torch.manual_seed(0)
        ebc = CCEEmbeddingBagCollection(tables(PoolingType.SUM), {"t0": cfg, "t1": cfg},
                                        is_weighted=weighted, allow_larger=True, fused=fused)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in ebc.tables.values():
                if hasattr(m, "fused_assignment"):
                    ids = torch.arange(m.num_embeddings)
                    m.write_assignment(ids, torch.randint(0, rows, (ids.numel(), chunks),
                                                          generator=g))
                    m.h_generation.fill_(2)
        return ebc

    fused, ref = make(True), make(False)
    ref.load_state_dict(fused.state_dict())
    assert fused.fused and fused.tables["t0"].fused_assignment() is not None
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (fused, ref)]
    for step in range(2):
        kjt = random_kjt(20 + step, batch=9, weighted=weighted)
        assert_same_kjt(fused.remap(kjt), ref.remap(kjt))
        outs = [m(kjt).values() for m in (fused, ref)]
        assert torch.equal(outs[0], outs[1])
        for out, opt in zip(outs, opts):
            opt.zero_grad()
            (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        for (n, p), q in zip(fused.named_parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad), n
        for opt in opts:
            opt.step()
        for (n, p), q in zip(fused.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), n
    # the stored p really is used (not only the hash): a write changes the fused output
    if assigned != 0 and rows > 1:
        m = fused.tables["t0"]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "b", "c", "d"], values=torch.tensor([0, 1, 2, 3]),
            lengths=torch.tensor([1, 1, 1, 1]))
        before = fused.remap(kjt).values().clone()
        with torch.no_grad():
            p0 = m.lookup_assignment(torch.tensor([0]))
            m.write_assignment(torch.tensor([0]), (p0 + 1) % rows)
        after = fused.remap(kjt).values()
        assert not torch.equal(before, after)
        ref.tables["t0"].write_assignment(torch.tensor([0]), (p0 + 1) % rows)
        assert torch.equal(after, ref.remap(kjt).values())


# ---------------------------------------------------------------- sharded (2 processes)
def _sharded(rank: int, world: int, replicate_below: int):
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import SGD

    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder
    from torchrec_cce.distributed.tensors import scatter_full

    # fbgemm's fused TBE needs columns divisible by 4: chunks of 4 columns
    comp = {"t0": CCEConfig(rows=8, chunks=2, seed=4), "t1": QRConfig(collisions=9, operation="add")}
    ts = tables(PoolingType.MEAN)
    torch.manual_seed(0)
    ref = CCEEmbeddingBagCollection(copy.deepcopy(ts), comp, is_weighted=True, fused=False)
    with torch.no_grad():
        ref.tables["t0"].write_assignment(torch.arange(100), torch.randint(0, 8, (100, 2)))
        ref.tables["t0"].h_generation.fill_(2)
    full_state = ref.state_dict()
    outs, states = {}, {}
    for fused in (True, False):
        sharder = CCEEmbeddingBagCollectionSharder(replicate_assignment_below=replicate_below)
        module = CCEEmbeddingBagCollection(copy.deepcopy(ts), comp, is_weighted=True,
                                           device=torch.device("meta"), fused=fused)
        apply_optimizer_in_backward(SGD, module.parameters(), {"lr": 0.5})
        names = [c.name for c in module.codebook_table_configs()]
        plan = construct_module_sharding_plan(
            module, {n: table_wise(rank=i % world, compute_kernel="fused")
                     for i, n in enumerate(names)},
            sharder=sharder, local_size=world, world_size=world, device_type="cpu")
        dmp = DistributedModelParallel(
            module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
            plan=ShardingPlan({"": plan}), sharders=[sharder], device=torch.device("cpu"))
        for key, value in dmp.state_dict().items():
            scatter_full(value, full_state[key])
        sharded = dmp.module
        assert sharded.fused is fused
        assert (sharded.id_range("t0") is not None) == (replicate_below == 0)
        res = []
        for step in range(2):
            kjt = random_kjt(100 * rank + step, weighted=True)
            out = dmp(kjt).values()
            out.sum().backward()  # SGD in backward updates the codebooks
            res.append(out.detach())
        outs[fused] = res
        states[fused] = {k: v.local_shards()[0].tensor.clone() if hasattr(v, "local_shards")
                         else v.clone() for k, v in dmp.state_dict().items()
                         if "codebooks" in k and (not hasattr(v, "local_shards")
                                                  or v.local_shards())}
    # unsharded reference for the first step (before any update)
    ref_out = ref(random_kjt(100 * rank, weighted=True)).values().detach()
    return outs, states, ref_out


@needs_op
@pytest.mark.parametrize("replicate_below", [0, 1 << 30], ids=["id_range", "replicated"])
def test_sharded_fused_equals_reference(replicate_below):
    for outs, states, ref_out in run_multiprocess(_sharded, 2, replicate_below, timeout=900):
        for a, b in zip(outs[True], outs[False]):
            assert torch.equal(a, b)
        assert states[True].keys() == states[False].keys() and states[True]
        for k in states[True]:
            assert torch.equal(states[True][k], states[False][k]), k
        torch.testing.assert_close(outs[True][0], ref_out, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- fallback and selection
_CHILD = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_fused import build, random_kjt
from torchrec.modules.embedding_configs import PoolingType
ebc = build("cce", PoolingType.MEAN, True, fused={fused})
ebc.load_state_dict(torch.load({state!r}))
out = ebc(random_kjt(5, weighted=True)).values()
torch.save({{"fused": ebc.fused, "out": out.detach()}}, {result!r})
"""


def _run_child(tmp_path, env_update: Dict[str, str], fused) -> subprocess.CompletedProcess:
    ebc = build("cce", PoolingType.MEAN, True, fused=False)
    torch.save(ebc.state_dict(), tmp_path / "state.pt")
    code = _CHILD.format(tests=os.path.join(ROOT, "tests"), fused=fused,
                         state=str(tmp_path / "state.pt"), result=str(tmp_path / "out.pt"))
    env = {**os.environ, "PYTHONPATH": ROOT, **env_update}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)


def _notice_lines(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if "fused remap op could not be built" in line]


@pytest.mark.parametrize("how", ["forced", "no_compiler"])
def test_fallback_without_compiler_gives_one_notice_and_equal_outputs(tmp_path, how):
    if how == "forced":
        env = {"TORCHREC_CCE_FORCE_NO_FUSED": "1"}
    else:  # a fresh build directory and a compiler that does not exist
        env = {"CXX": str(tmp_path / "no-such-c++"), "CC": str(tmp_path / "no-such-cc"),
               "TORCHREC_CCE_BUILD_DIR": str(tmp_path / "build")}
    proc = _run_child(tmp_path, env, fused=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _notice_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "using the torch-ops reference path" in lines[0]
    child = torch.load(tmp_path / "out.pt")
    assert child["fused"] is False
    ebc = build("cce", PoolingType.MEAN, True, fused=HAVE_OP)
    ebc.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert torch.equal(child["out"], ebc(random_kjt(5, weighted=True)).values().detach())


@needs_op
def test_env_selects_reference_path_without_notice(tmp_path):
    proc = _run_child(tmp_path, {"TORCHREC_CCE_FUSED": "0"}, fused=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not _notice_lines(proc.stderr)
    assert torch.load(tmp_path / "out.pt")["fused"] is False
    proc = _run_child(tmp_path, {}, fused=None)  # default: fused
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(tmp_path / "out.pt")["fused"] is True


def test_build_script_builds_the_op():
    """scripts/bootstrap.sh runs ``python -m torchrec_cce.ops`` (the install-time build)."""
    with open(os.path.join(ROOT, "scripts", "bootstrap.sh")) as fh:
        assert "-m torchrec_cce.ops" in fh.read()
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine")
    assert HAVE_OP


# ---------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device here: the CUDA kernel (remap_cuda.cu) is compiled and "
                           "tested only where torch.cuda.is_available()")
@pytest.mark.parametrize("method", list(METHODS))
def test_cuda_fused_equals_cpu_reference(method):
    fused, ref = pair(method, PoolingType.MEAN, True)
    fused = fused.cuda()
    kjt = random_kjt(0, weighted=True, out_of_range=method != "full")
    got = fused.remap(kjt.to(torch.device("cuda")))
    assert_same_kjt(KeyedJaggedTensor(keys=got.keys(), values=got.values().cpu(),
                                      lengths=got.lengths().cpu(),
                                      weights=got.weights().cpu()), ref.remap(kjt))


# ---------------------------------------------------------------- CCE with init="qr"
@needs_op
@pytest.mark.parametrize("keep_remainder", [False, True], ids=["fresh_h", "keep_remainder"])
@pytest.mark.parametrize("generation", [0, 3])
@pytest.mark.parametrize("assigned", [None, 37])
@pytest.mark.parametrize("weighted", [False, True], ids=["unw", "w"])
def test_fused_qr_init_cce_equals_reference(keep_remainder, generation, assigned, weighted):
    """The op computes CCEConfig(init="qr")'s quotient/remainder pairs itself: KJT, pooled
    output, gradients and updates equal the torch reference path exactly, before the first
    re-clustering (generation 0: h is the remainder) and after (h a fresh hash unless kept),
    for covered, uncovered and out-of-range ids (reduced mod V)."""
    cfg = {"t0": CCEConfig(rows=11, chunks=4, seed=6, init="qr", keep_remainder=keep_remainder,
                           assigned_ids=assigned),
           "t1": CCEConfig(rows=8, chunks=2, seed=7, init="qr", keep_remainder=keep_remainder)}
    modules = []
    for fused in (True, False):
        torch.manual_seed(0)
        ebc = CCEEmbeddingBagCollection(tables(PoolingType.SUM), cfg, is_weighted=weighted,
                                        allow_larger=True, fused=fused)
        with torch.no_grad():
            for m in ebc.tables.values():
                if hasattr(m, "dense_assignment") and generation:
                    g = torch.Generator().manual_seed(7)
                    n = m.assigned_ids
                    m.write_assignment(torch.arange(n),
                                       torch.randint(0, m.rows, (n, m.chunks), generator=g))
                    m.h_generation.fill_(generation)
        modules.append(ebc)
    fused, ref = modules
    ref.load_state_dict(fused.state_dict())
    assert fused.fused and not ref.fused
    assert fused.tables["t0"].stream_specs() is not None
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (fused, ref)]
    for step in range(3):
        kjt = random_kjt(step, weighted=weighted)
        assert_same_kjt(fused.remap(kjt), ref.remap(kjt))
        outs = [m(kjt) for m in (fused, ref)]
        assert torch.equal(outs[0].values(), outs[1].values())
        for out, opt in zip(outs, opts):
            opt.zero_grad()
            (out.values() ** 2).sum().backward()
            opt.step()
        for (n, p), q in zip(fused.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), n
    # Before any re-clustering every in-range id of t0 has its own (p, h) pair per chunk.
    if generation == 0 and assigned is None:
        t0 = fused.tables["t0"]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "b", "c", "d"], values=torch.cat([torch.arange(V["t0"]),
                                                         torch.tensor([0, 0, 0])]),
            lengths=torch.tensor([V["t0"], 1, 1, 1]), weights=(
                torch.ones(V["t0"] + 3) if weighted else None))
        rows = fused.remap(kjt)["a__cce_c0"].values().reshape(-1, 2)
        assert len({tuple(r) for r in rows.tolist()}) == V["t0"]
        assert t0.rows ** 2 >= V["t0"]
