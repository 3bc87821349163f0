"""MPE tables (torchrec_cce/methods/mpe.py), the MPE hook and the packed serving export.

References are computed independently (numpy / plain torch per bag) from the table's tensors.
"""

import os
import tempfile
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from multiprocess import run_multiprocess
from torchrec_cce import (
    CCEEmbeddingBagCollection,
    MPEConfig,
    MPESchedule,
    compression_for_budget,
    memory_report,
    mpe_penalty,
)
from torchrec_cce.methods.mpe import RETRAIN, SEARCH, WARMUP, MPETable, select_bits
from torchrec_cce.mpe import mpe_summary
from torchrec_cce.methods.mpe.export import (
    MPEServingTable,
    export_mpe,
    install_serving_tables,
    load_mpe,
    packed_bytes,
    save_mpe,
    serving_bytes,
)

V, DIM = 600, 8


def zipf_counts(n: int = V, seed: int = 0, ordered: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.sort(rng.zipf(1.2, n).clip(max=10 ** 6))[::-1].astype(np.int64)
    if not ordered:
        counts = counts[rng.permutation(n)]
    return counts.copy()


def make_tables(pooling: PoolingType = PoolingType.SUM) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="big", embedding_dim=DIM, num_embeddings=V,
                           feature_names=["a", "b"], pooling=pooling),
        EmbeddingBagConfig(name="small", embedding_dim=DIM, num_embeddings=20,
                           feature_names=["c"]),
    ]


def make_ebc(config: MPEConfig, pooling: PoolingType = PoolingType.SUM,
             weighted: bool = False, device: Optional[torch.device] = None
             ) -> CCEEmbeddingBagCollection:
    torch.manual_seed(0)
    return CCEEmbeddingBagCollection(make_tables(pooling), {"big": config}, is_weighted=weighted,
                                     device=device)


def kjt(seed: int, batch: int = 6, weighted: bool = False, max_len: int = 4
        ) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    sizes = {"a": V, "b": V, "c": 20}
    values, lengths = [], []
    for k, n in sizes.items():
        lens = torch.randint(0, max_len, (batch,), generator=g)
        lengths.append(lens)
        values.append(torch.randint(0, n, (int(lens.sum()),), generator=g))
    v = torch.cat(values)
    w = torch.rand(v.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=list(sizes), values=v,
                                               lengths=torch.cat(lengths), weights=w)


# ---- independent references ----
def ref_quant(w: torch.Tensor, alpha: float, beta: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 0:
        return torch.zeros_like(w)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.round(torch.clamp((w - beta) / alpha, lo, hi)) * alpha + beta


def ref_groups(t: MPETable, counts: np.ndarray) -> np.ndarray:
    gs = -(-V // t.num_groups)
    order = np.argsort(-counts, kind="stable")
    ranks = np.empty(V, dtype=np.int64)
    ranks[order] = np.arange(V)
    if (counts[1:-1] >= counts[2:]).all():
        return np.arange(V) // gs
    return ranks // gs


def ref_rows(t: MPETable, ids: torch.Tensor) -> torch.Tensor:
    """Rows as the table should see them, from its parameters (search mix or frozen width)."""
    W = t.weight.detach()[ids]
    alpha = (t.steps().detach().abs() + 1e-10)
    beta = t.offsets().detach()
    groups = t.group_ids(ids)
    out = torch.zeros_like(W)
    for r in range(ids.numel()):
        g = int(groups[r])
        if int(t.stage) == SEARCH:
            p = torch.softmax(t.logits.detach()[g] / t.tau, dim=0)
            for i, b in enumerate(t.bits):
                out[r] += p[i] * ref_quant(W[r], float(alpha[i]), beta, b)
        else:
            b = int(t.selected[g])
            i = t.bits.index(b)
            out[r] = ref_quant(W[r], float(alpha[i]), beta, b)
    return out


def ref_pooled(t: MPETable, features: KeyedJaggedTensor, feature: str,
               mean: bool) -> torch.Tensor:
    jt = features.to_dict()[feature]
    ids, offs = jt.values(), jt.offsets()
    w = jt.weights_or_none()
    rows = ref_rows(t, ids)
    out = torch.zeros(offs.numel() - 1, DIM)
    for bag in range(offs.numel() - 1):
        s, e = int(offs[bag]), int(offs[bag + 1])
        for j in range(s, e):
            out[bag] += rows[j] * (w[j] if w is not None else 1.0)
        if mean and e > s:
            out[bag] /= e - s
    return out


# ---- config, groups ----
def test_config_validation_names_the_table() -> None:
    t = make_tables()[0]
    with pytest.raises(ValueError, match="'big'.*groups"):
        MPEConfig(groups=V + 1).validate(t)
    with pytest.raises(ValueError, match="'big'.*bits"):
        MPEConfig(bits=(0, 9)).validate(t)
    with pytest.raises(ValueError, match="'big'.*counts"):
        MPEConfig(counts=np.ones(5)).validate(t)
    with pytest.raises(ValueError, match="'big'.*tau"):
        MPEConfig(tau=0.0).validate(t)
    MPEConfig(bits=(0, 4, 8, 16)).validate(t)


def test_compression_for_budget_mpe() -> None:
    tables = make_tables()
    out = compression_for_budget(tables, "mpe", max_params_per_table=1000,
                                 mpe=MPEConfig(groups=4096, lam=1e-3))
    assert set(out) == {"big"} and out["big"].groups == V and out["big"].lam == 1e-3


@pytest.mark.parametrize("ordered", [True, False])
def test_frequency_groups_and_weights(ordered: bool) -> None:
    counts = zipf_counts(ordered=ordered)
    ebc = make_ebc(MPEConfig(groups=16, counts=counts))
    t = ebc.tables["big"]
    expected = ref_groups(t, counts)
    assert torch.equal(t.group_ids(torch.arange(V)), torch.from_numpy(expected))
    assert hasattr(t, "group_of") != ordered  # contiguous ranges store no per-id state
    totals = np.maximum(np.bincount(expected, weights=counts, minlength=16), 1)
    assert np.allclose(t.group_weight.numpy(), totals / totals.min())
    assert t.group_weight[0] > t.group_weight[-1]  # group 0 = most frequent ids
    assert int(t.stage) == SEARCH


def test_preprocessed_oov_id_keeps_contiguous_groups() -> None:
    counts = zipf_counts()
    counts[0] = 0  # the data's OOV id 0 with no training rows, ids 1.. descending
    t = make_ebc(MPEConfig(groups=16, counts=counts)).tables["big"]
    assert not hasattr(t, "group_of")
    assert torch.equal(t.group_ids(torch.arange(V)), torch.arange(V) // 38)


# ---- forward ----
@pytest.mark.parametrize("pooling,weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False),
                                              (PoolingType.SUM, True)])
@pytest.mark.parametrize("stage", ["search", "retrain"])
def test_forward_equals_reference(pooling: PoolingType, weighted: bool, stage: str) -> None:
    ebc = make_ebc(MPEConfig(groups=8, counts=zipf_counts()), pooling, weighted)
    t = ebc.tables["big"]
    with torch.no_grad():
        t.logits.copy_(torch.randn(t.logits.shape) * 3e-3)
        t.offsets().copy_(torch.randn(DIM) * 1e-3)
        if stage == "retrain":
            t.select()
            t.selected[:2] = 0  # some pruned groups too
            t.selected[2] = 1
            t.weight.add_(torch.randn(V, DIM) * 0.05)
    features = kjt(1, weighted=weighted)
    out = ebc(features).to_dict()
    for f in ("a", "b"):
        ref = ref_pooled(t, features, f, pooling == PoolingType.MEAN)
        assert torch.allclose(out[f], ref, atol=1e-6), f
    # The uncompressed table is untouched.
    jt = features.to_dict()["c"]
    ref_c = torch.nn.functional.embedding_bag(
        jt.values(), ebc.codebooks.embedding_bags["small"].weight, jt.offsets(),
        mode="sum", include_last_offset=True, per_sample_weights=jt.weights_or_none())
    assert torch.allclose(out["c"], ref_c, atol=1e-6)


def test_empty_bags_and_out_of_range_ids() -> None:
    ebc = make_ebc(MPEConfig(groups=8, counts=zipf_counts()))
    empty = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"], values=torch.tensor([3]),
                                                lengths=torch.tensor([0, 0, 0, 0, 1, 0]))
    out = ebc(empty).to_dict()
    assert torch.equal(out["a"], torch.zeros(2, DIM)) and torch.equal(out["b"], torch.zeros(2, DIM))
    bad = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"],
                                              values=torch.tensor([V, 1, 1]),
                                              lengths=torch.tensor([1, 0, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match="'big'.*outside"):
        ebc(bad)


def test_penalty_value() -> None:
    counts = zipf_counts()
    ebc = make_ebc(MPEConfig(groups=8, counts=counts, lam=0.25, tau=0.5))
    t = ebc.tables["big"]
    with torch.no_grad():
        t.logits.copy_(torch.randn(t.logits.shape))
    p = torch.softmax(t.logits.detach() / 0.5, dim=1).numpy()
    groups = ref_groups(t, counts)
    totals = np.maximum(np.bincount(groups, weights=counts, minlength=8), 1)
    weight = totals / totals.min()
    expected = 0.25 * ((p * np.array(t.bits)).sum(1) / weight).sum()
    assert np.isclose(mpe_penalty(ebc).item(), expected, rtol=1e-5)
    t.select()
    assert mpe_penalty(ebc).item() == 0.0


# ---- selection ----
def test_selection_rule_on_hand_made_logits() -> None:
    bits = (0, 1, 2, 3, 4, 5, 6)  # threshold 1 / 14 = 0.0714
    probs = torch.tensor([
        [0.50, 0.30, 0.10, 0.04, 0.03, 0.02, 0.01],   # 2: largest with p >= 1/14
        [0.70, 0.02, 0.02, 0.02, 0.02, 0.02, 0.20],   # 6, though 0 is most likely
        [0.93, 0.01, 0.01, 0.01, 0.01, 0.02, 0.01],   # 0: pruned
        [0.06, 0.06, 0.06, 0.06, 0.06, 0.08, 0.62],   # 6
        [0.07, 0.07, 0.07, 0.07, 0.08, 0.07, 0.57],   # 6 (0.07 < 1/14 are not eligible)
        [0.10, 0.10, 0.10, 0.50, 0.10, 0.07, 0.03],   # 4
    ])
    assert select_bits(probs, bits).tolist() == [2, 6, 0, 6, 6, 4]
    # The same rule through the table: logits = tau * log p.
    ebc = make_ebc(MPEConfig(groups=6, counts=zipf_counts(), tau=0.01))
    t = ebc.tables["big"]
    with torch.no_grad():
        t.logits.copy_(0.01 * probs.log())
    assert t.select().tolist() == [2, 6, 0, 6, 6, 4]
    # Candidates in any order, 8/16 allowed: the largest eligible *width* wins.
    assert select_bits(torch.tensor([[0.3, 0.4, 0.3]]), (16, 0, 8)).tolist() == [16]
    assert select_bits(torch.tensor([[0.17, 0.5, 0.33]]), (16, 0, 8)).tolist() == [16]
    assert select_bits(torch.tensor([[0.16, 0.5, 0.34]]), (16, 0, 8)).tolist() == [8]
    assert select_bits(torch.tensor([[0.05, 0.5, 0.45]]), (16, 0, 8)).tolist() == [8]


# ---- search on a toy problem ----
def _toy_run(lam: float, steps: int = 300) -> MPETable:
    """Fit fixed random targets of ids drawn by frequency (Zipf 1.5); returns the MPE table.

    tau = 0.1 and Adam lr 1e-3 (a short run: with the paper's tau = 3e-3 the logits of a
    300-step toy collapse to one width within a few steps, whatever the penalty)."""
    torch.manual_seed(0)
    n = 400
    counts = (1e5 / np.arange(1, n + 1) ** 1.5).astype(np.int64) + 1
    table = EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=n,
                               feature_names=["x"])
    ebc = CCEEmbeddingBagCollection([table], {"t": MPEConfig(groups=4, counts=counts, lam=lam,
                                                                tau=0.1)})
    t = ebc.tables["t"]
    target = torch.randn(n, DIM, generator=torch.Generator().manual_seed(1)) * 0.05
    probs = torch.from_numpy(counts / counts.sum())
    g = torch.Generator().manual_seed(2)
    opt = torch.optim.Adam(ebc.parameters(), lr=1e-3)
    for _ in range(steps):
        ids = torch.multinomial(probs, 256, replacement=True, generator=g)
        f = KeyedJaggedTensor.from_lengths_sync(keys=["x"], values=ids,
                                                lengths=torch.ones(256, dtype=torch.int64))
        loss = ((ebc(f).values() - target[ids]) ** 2).sum(1).mean() + mpe_penalty(ebc)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return t


def _expected_bits(t: MPETable) -> torch.Tensor:
    bits = torch.tensor(t.bits, dtype=torch.float32)
    return (t.probabilities().detach() * bits).sum(1)


def test_memory_penalty_moves_rare_groups_to_fewer_bits() -> None:
    free = _expected_bits(_toy_run(lam=0.0))
    t = _toy_run(lam=0.05)
    pushed = _expected_bits(t)
    # Group weights span orders of magnitude (group 0 = most frequent ids).
    assert t.group_weight[0] > 100 * t.group_weight[3]
    # Direction: the penalty lowers the expected width of the rarest groups...
    assert pushed[3] < free[3] - 1.0 and pushed[2] < free[2] - 1.0
    # ...size: rare groups lose more bits than the most frequent one, which keeps most.
    assert (free[3] - pushed[3]) > (free[0] - pushed[0]) + 1.0
    assert pushed[0] > pushed[3] + 1.0
    # The selected widths follow: rare groups get no more bits than frequent ones.
    sel = select_bits(t.probabilities().detach(), t.bits)
    assert sel[3] <= sel[0] and sel[3] < max(t.bits)


# ---- retrain ----
def test_retrain_restarts_weights_and_freezes_widths() -> None:
    ebc = make_ebc(MPEConfig(groups=8, counts=zipf_counts(), lam=1e-3))
    t = ebc.tables["big"]
    initial = t.weight.detach().clone()
    opt = torch.optim.Adam(ebc.parameters(), lr=1e-2)
    schedule = MPESchedule(search_steps=5)
    for step in range(1, 11):
        loss = (ebc(kjt(step)).values() ** 2).sum() - ebc(kjt(step)).values().sum() \
            + mpe_penalty(ebc)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 5:
            assert not torch.equal(t.weight.detach(), initial)  # the search trained them
            expected = select_bits(t.probabilities().detach(), t.bits)
        events = schedule.step(ebc, step, optimizers=[opt])
        if step == 5:
            assert events["big"]["event"] == "selected"
            assert torch.equal(t.weight.detach(), initial)       # restarted
            assert torch.equal(t.selected, expected)             # the rule's widths
            assert int(t.stage) == RETRAIN
            state = opt.state[t.weight]
            assert float(state["exp_avg"].abs().sum()) == 0 and float(state["step"]) == 0
            frozen = t.selected.clone()
        else:
            assert events is None
    assert torch.equal(t.selected, frozen)                  # widths frozen while retraining
    assert not torch.equal(t.weight.detach(), initial)      # and the weights train again
    # Changing the logits no longer changes the output.
    t.eval()
    before = ebc(kjt(99)).values()
    with torch.no_grad():
        t.logits.add_(torch.randn(t.logits.shape))
    assert torch.equal(before, ebc(kjt(99)).values())


def test_warmup_counts_observed_ids_then_searches() -> None:
    ebc = make_ebc(MPEConfig(groups=8))
    t = ebc.tables["big"]
    assert int(t.stage) == WARMUP
    with pytest.raises(ValueError, match="no per-id counts"):
        MPESchedule(search_steps=3).step(ebc, 1)
    # Warm-up forward uses unquantised rows.
    f = kjt(0)
    jt = f.to_dict()["a"]
    ref = torch.nn.functional.embedding_bag(jt.values(), t.weight.detach(), jt.offsets(),
                                            mode="sum", include_last_offset=True)
    assert torch.allclose(ebc(f).to_dict()["a"], ref, atol=1e-6)
    schedule = MPESchedule(search_steps=3, warmup_steps=2)
    seen = torch.zeros(V, dtype=torch.int64)
    for step in range(1, 3):
        f = kjt(step, max_len=30)
        for k in ("a", "b"):
            seen += torch.bincount(f.to_dict()[k].values(), minlength=V)
        ebc(f)
        ev = schedule.step(ebc, step)
    assert torch.equal(t.seen_counts, seen + torch.bincount(kjt(0).to_dict()["a"].values(),
                                                            minlength=V)
                       + torch.bincount(kjt(0).to_dict()["b"].values(), minlength=V))
    assert ev == {"big": {"event": "groups_built"}} and int(t.stage) == SEARCH
    assert torch.equal(t.group_ids(torch.arange(V)),
                       torch.from_numpy(ref_groups(t, t.seen_counts.numpy())))
    assert schedule.step(ebc, 5)["big"]["event"] == "selected"


# ---- export ----
def serving_bound(ebc: CCEEmbeddingBagCollection, features: KeyedJaggedTensor) -> torch.Tensor:
    """The documented bound of the torchrec layout, per output element: ``(n + 3) * 2^-23 *
    sum_j |w_j| (|c_j alpha| + |beta|)`` over each bag of ``n`` ids (fp32 summation order;
    fbgemm's fp16 scale 1 and bias -2^(b-1) are exact)."""
    t = ebc.tables["big"]
    beta = t.offsets().detach()
    rows = (t.quantized_rows(torch.arange(V)).detach() - beta).abs() + beta.abs()
    out = []
    for f in ("a", "b"):
        jt = features[f]
        w = jt.weights() if ebc._is_weighted else torch.ones(jt.values().numel())
        terms = F_embedding_bag(jt.values(), rows, jt.offsets(), w.abs())
        n = jt.lengths().to(torch.float32).unsqueeze(1)
        out.append((n + 3) * 2.0 ** -23 * terms)
    out.append(torch.zeros(out[0].shape[0], DIM))  # "c": a full table, the same lookup
    return torch.cat(out, dim=1)


def F_embedding_bag(ids, rows, offsets, w):  # noqa: ANN001, ANN201, N802
    return torch.nn.functional.embedding_bag(ids, rows, offsets, mode="sum",
                                             per_sample_weights=w, include_last_offset=True)


@pytest.mark.parametrize("layout", ["torchrec", "packed"])
@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("pooling,weighted", [(PoolingType.SUM, True), (PoolingType.MEAN, False)])
def test_export_round_trip_equals_training(layout: str, ordered: bool, pooling: PoolingType,
                                           weighted: bool) -> None:
    """Packed layout: bit-exact. torchrec layout (fbgemm INT2/4/8 rows in TorchRec's quantised
    EBC, the other widths packed): within the documented fp32 summation bound."""
    ebc = make_ebc(MPEConfig(groups=8, bits=(0, 1, 2, 3, 4, 5, 6, 8, 16),
                             counts=zipf_counts(ordered=ordered)), pooling, weighted)
    t = ebc.tables["big"]
    opt = torch.optim.Adam(ebc.parameters(), lr=1e-2)
    for step in range(1, 7):
        loss = (ebc(kjt(step, weighted=weighted)).values() - 0.1).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 3:
            t.select(optimizers=[opt])
            t.selected.copy_(torch.tensor([16, 8, 6, 5, 4, 2, 1, 0]))  # every kind, one pruned
    ebc.eval()
    features = [kjt(100 + i, batch=16, weighted=weighted, max_len=6) for i in range(3)]
    expected = [ebc(f).values().detach() for f in features]
    bounds = [serving_bound(ebc, f) for f in features]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mpe.pt")
        sizes = save_mpe(ebc, path, layout=layout)
        loaded = load_mpe(path)
        assert os.path.getsize(path) > sizes["big"]
    state = export_mpe(ebc, layout=layout)["big"]
    # Serving bytes: exact, from an independent formula (fbgemm rows: + 4 B fp16 scale/bias).
    group_sizes = np.bincount(ref_groups(t, zipf_counts(ordered=ordered)), minlength=8)
    widths = [16, 8, 6, 5, 4, 2, 1, 0]
    fbgemm = {2, 4, 8} if layout == "torchrec" else set()
    rows = sum(int(n) * (-(-DIM * b // 8) + 4 * (b in fbgemm)) for n, b in zip(group_sizes, widths))
    header = 3 * 8 + len(t.bits) * (1 + 4) + DIM * 4 + 8
    id_map = 0 if ordered else 4 * V
    assert packed_bytes(state) == serving_bytes(t, layout) == sizes["big"] == rows + header + id_map
    assert "codes_0" not in state and ("row_of" in state) != ordered
    for b, n in zip(widths[:-1], group_sizes[:-1]):
        key = f"rows_int{b}" if b in fbgemm else f"codes_{b}"
        assert tuple(state[key].shape) == (n, -(-DIM * b // 8) + 4 * (b in fbgemm)), key
    report = memory_report(ebc)["big"]
    assert report["serving_bytes"] == serving_bytes(t) == report["compressed_bytes"]
    # Every stored tensor: weight, logits, alpha, beta, grad scales (fp32), stage (int64),
    # selected widths (int64 per group), group weights (fp32), the int16 group index if kept.
    assert report["training_bytes"] == ((V * DIM + 8 * 9 + 9 + DIM + 9) * 4 + 8 + 8 * 8 + 8 * 4
                                        + (0 if ordered else 2 * V))
    assert report["full_bytes"] == V * DIM * 4
    install_serving_tables(ebc, loaded)
    serving = ebc.tables["big"]
    assert isinstance(serving, MPEServingTable)
    if layout == "torchrec":
        # The fbgemm widths are looked up by TorchRec's quantised EBC, whose TBE holds exactly
        # the exported rows (serving bytes = stored bytes of the served form).
        from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

        assert isinstance(serving.quantized, QuantEBC) and serving.fbgemm_widths == [2, 4, 8]
        held = [w for m in serving.quantized._emb_modules
                for w, _ in m.split_embedding_weights(split_scale_shifts=False)]
        assert [tuple(w.shape) for w in held] == [tuple(state[f"rows_int{b}"].shape)
                                                  for b in (2, 4, 8)]
        assert all(torch.equal(w, state[f"rows_int{b}"]) for w, b in zip(held, (2, 4, 8)))
        for f, e, bound in zip(features, expected, bounds):
            got = ebc(f).values()
            diff = (got - e).abs()
            assert bool((diff <= bound).all()), float((diff - bound).max())
            assert not torch.equal(bound, torch.zeros_like(bound))
    else:
        assert serving.quantized is None
        for f, e in zip(features, expected):
            assert torch.equal(ebc(f).values(), e)
    # Decoded rows (fbgemm rows decoded from their bytes) are the training's rows exactly;
    # pruned ids read as 0.
    ids = torch.arange(V)
    assert torch.equal(serving.rows(ids), t.quantized_rows(ids).detach())
    pruned = torch.from_numpy(np.flatnonzero(ref_groups(t, zipf_counts(ordered=ordered)) == 7))
    assert torch.equal(serving.rows(pruned[:5]), torch.zeros(5, DIM))


def test_fbgemm_widths_and_layout_bytes() -> None:
    """Which widths ride fbgemm rows, and the row bytes both ways at dim 16 (the choice in the
    export's docstring: 3 bits as INT4 would cost 12 B a row vs 6 B packed)."""
    from torchrec_cce.methods.mpe.export import served_by_fbgemm, stored_row_bytes

    assert [b for b in (1, 2, 3, 4, 5, 6, 7, 8, 16) if served_by_fbgemm(b, "torchrec")] == [2, 4, 8]
    assert not any(served_by_fbgemm(b, "packed") for b in (2, 4, 8))
    assert [stored_row_bytes(16, b, "torchrec") for b in (1, 2, 3, 4, 5, 6, 8)] == [2, 8, 6, 12, 10, 12, 20]
    assert [stored_row_bytes(16, b, "packed") for b in (2, 4, 8)] == [4, 8, 16]
    with pytest.raises(ValueError, match="layout must be one of"):
        stored_row_bytes(16, 4, "int4")


def test_summary_and_serving_far_below_full_after_penalised_search() -> None:
    t = _toy_run(lam=0.05, steps=150)
    s = mpe_summary(torch.nn.ModuleList([t]))["t"]
    widths = select_bits(t.probabilities().detach(), t.bits)
    sizes = t.group_sizes()
    assert s["stage"] == "search"
    assert np.isclose(s["mean_bits"], float((widths * sizes).sum() / sizes.sum()))
    assert serving_bytes(t) < t.num_embeddings * DIM * 4 / 5


# ---- distributed ----
from dist_state import PooledValues as _Values  # noqa: E402


def _dmp_worker(rank: int, world: int) -> Dict[str, torch.Tensor]:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder

    config = MPEConfig(groups=8, counts=zipf_counts(), lam=1e-2)
    sharder = CCEEmbeddingBagCollectionSharder()
    module = make_ebc(config, PoolingType.MEAN, device=torch.device("meta"))
    names = [c.name for c in module.codebook_table_configs()]
    assert names == ["small"]  # the MPE table adds no codebook
    from torchrec_cce.distributed import plan_memory
    plan = ShardingPlan({"ebc": construct_module_sharding_plan(
        module, {n: table_wise(rank=1) for n in names}, sharder=sharder, local_size=world,
        world_size=world, device_type="cpu")})
    wrapped = _Values(module)
    plan_rows = plan_memory(plan, wrapped, world)
    dmp = DistributedModelParallel(wrapped, env=ShardingEnv.from_process_group(
        dist.GroupMember.WORLD), plan=plan, sharders=[sharder], device=torch.device("cpu"))
    ref = make_ebc(config, PoolingType.MEAN)
    # Same state as the reference (the full table is sharded to rank 1).
    for key, value in dmp.state_dict().items():
        src = ref.state_dict()[key.replace("ebc.", "", 1)]
        if hasattr(value, "local_shards"):
            for shard in value.local_shards():
                o = shard.metadata.shard_offsets
                n = shard.metadata.shard_sizes
                shard.tensor.copy_(src[o[0]:o[0] + n[0], o[1]:o[1] + n[1]])
        else:
            value.copy_(src)
    t = dmp.module.ebc.tables["big"]
    # A dense optimizer on every MPE parameter (the master rows, split by id range, get dense
    # gradients: no in-backward optimizer).
    opt = torch.optim.SGD([p for n, p in dmp.named_parameters() if "tables.big" in n], lr=0.5)
    ref_opt = torch.optim.SGD(ref.tables["big"].parameters(), lr=0.5)
    out = {"initial_weight": t.weight.detach().clone(),
           "plan_big": torch.tensor(plan_rows["big"]["bytes_per_rank"]),
           "plan_small": torch.tensor(plan_rows["small"]["bytes_per_rank"])}
    # Search step: forward equals unsharded; DDP-averaged gradients equal the reference's.
    f = [kjt(10 + r, batch=6) for r in range(world)]
    pooled = dmp(f[rank])
    out["forward"] = pooled.detach()
    out["ref_forward"] = ref(f[rank]).values().detach()
    loss = (pooled - 0.1).pow(2).sum() + mpe_penalty(dmp)
    opt.zero_grad()
    loss.backward()
    opt.step()
    ref_loss = sum((ref(x).values() - 0.1).pow(2).sum() for x in f) / world + mpe_penalty(ref)
    ref_opt.zero_grad()
    ref_loss.backward()
    ref_opt.step()
    for k in ("logits", "weight", "alpha", "beta"):
        out[k] = getattr(t, k).detach().clone()
        out[f"ref_{k}"] = getattr(ref.tables["big"], k).detach().clone()
    out["ref_weight"] = out["ref_weight"][t.id_lo: t.id_hi]  # this rank's id range
    # Selection under DMP: every rank selects the same widths; retrain forward equals ref.
    MPESchedule(search_steps=1).step(dmp, 1, optimizers=[opt])
    MPESchedule(search_steps=1).step(ref, 1, optimizers=[ref_opt])
    out["selected"], out["ref_selected"] = t.selected.clone(), ref.tables["big"].selected.clone()
    out["retrain_forward"] = dmp(f[rank]).detach()
    out["ref_retrain_forward"] = ref(f[rank]).values().detach()
    rep = memory_report(dmp)["big"]
    out["serving_bytes"] = torch.tensor(rep["serving_bytes"])
    out["ref_serving_bytes"] = torch.tensor(memory_report(ref)["big"]["serving_bytes"])
    return out


def test_mpe_table_under_dmp_two_processes() -> None:
    results = run_multiprocess(_dmp_worker, 2, timeout=600)
    for r in results:
        assert torch.allclose(r["forward"], r["ref_forward"], atol=1e-6)
        for k in ("logits", "weight", "alpha", "beta"):
            assert torch.allclose(r[k], r[f"ref_{k}"], atol=1e-6, rtol=1e-4), k
        assert torch.equal(r["selected"], r["ref_selected"])
        assert torch.allclose(r["retrain_forward"], r["ref_retrain_forward"], atol=1e-6)
        assert int(r["serving_bytes"]) == int(r["ref_serving_bytes"])
    assert not torch.equal(results[0]["weight"], results[0]["initial_weight"])  # it trained
    assert [tuple(r["weight"].shape) for r in results] == [(V // 2, DIM)] * 2  # id ranges
    # The plan's memory table: each rank's master rows plus the replicated state (logits,
    # steps, offsets, grad scales; stage, selected widths, group weights); the full table on
    # rank 1.
    state = (V // 2 * DIM + 8 * 7 + 7 + DIM + 7) * 4 + 8 + 8 * 8 + 8 * 4
    assert results[0]["plan_big"].tolist() == [state, state]
    assert results[0]["plan_small"].tolist() == [0, 20 * DIM * 4]


def test_selection_resets_row_wise_optimizer_state() -> None:
    from torchrec.optim import RowWiseAdagrad

    ebc = make_ebc(MPEConfig(groups=8, counts=zipf_counts()))
    t = ebc.tables["big"]
    opt = RowWiseAdagrad([t.weight], lr=0.1)
    ebc(kjt(0)).values().sum().backward()
    opt.step()
    state = opt.state[t.weight]
    assert any(v.abs().sum() > 0 for v in state.values() if isinstance(v, torch.Tensor))
    t.select(optimizers=[opt])
    assert all(float(v.abs().sum()) == 0 for v in state.values() if isinstance(v, torch.Tensor))
