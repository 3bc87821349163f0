"""Warm start (``torchrec_cce.compress_trained``): a compressed collection built from a trained
stock ``EmbeddingBagCollection``.

Checked against independent reference computations on planted-cluster rows: uncompressed rows
copied exactly; CCE's codebooks are the k-means quantisation of the trained chunks (``p`` the
nearest centroid of every id, ``B`` the mean residual per bucket of the current hash) and its
reconstruction error is far below the hashed init's and a least-squares hashing fit of the same
parameters; hashing / CE / QR-concat rows are the exact least-squares fit (``lstsq`` on the
one-hot design), QR-add reaches it by alternating least squares; QR-mult and MEmCom improve on
their bucket-mean start; MPE masters are the trained rows. Bad input raises naming the table.
A stock model trained under DistributedModelParallel (world size 2) is warm-started through
``load_unsharded`` (the sharded module itself is refused, naming that way).
"""

from typing import Dict

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from multiprocess import run_multiprocess

from torchrec_cce import (
    CCEConfig,
    CCEEmbeddingBagCollection,
    CEConfig,
    HashingTrickConfig,
    MEmComConfig,
    MPEConfig,
    QRConfig,
    compress_trained,
    load_unsharded,
)
from torchrec_cce.methods import codebook_table_name

V, DIM, CLUSTERS = 600, 16, 12


def planted_rows(seed: int = 0) -> torch.Tensor:
    """Rows around ``CLUSTERS`` centres per 4-column chunk (independent per chunk)."""
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for _ in range(4):
        centres = torch.randn(CLUSTERS, DIM // 4, generator=g)
        label = torch.randint(0, CLUSTERS, (V,), generator=g)
        chunks.append(centres[label] + 0.05 * torch.randn(V, DIM // 4, generator=g))
    return torch.cat(chunks, dim=1)


def trained_ebc(tables=("t_full", "t_c"), seed: int = 0) -> EmbeddingBagCollection:
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=t, embedding_dim=DIM, num_embeddings=V, feature_names=[f"f_{t}"])
        for t in tables])
    with torch.no_grad():
        for i, t in enumerate(tables):
            ebc.embedding_bags[t].weight.copy_(planted_rows(seed + i))
    return ebc


def every_id(collection, table: str) -> torch.Tensor:
    """``[V, dim]``: the collection's vector of every id of ``table`` (one id per bag)."""
    feats = collection.feature_names()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=feats, values=torch.cat([torch.arange(V) for _ in feats]),
        lengths=torch.ones(V * len(feats), dtype=torch.int64))
    return collection(kjt)[f"f_{table}"].detach()


def codebook(collection, table: str, suffix: str) -> torch.Tensor:
    return collection.codebooks.embedding_bags[codebook_table_name(table, suffix)].weight.detach()


def sq_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).sum())


def one_hot_lstsq(E: torch.Tensor, *assignments) -> torch.Tensor:
    """The least-squares reconstruction of ``E`` by ``sum_k Table_k[assignment_k(x)]``."""
    X = torch.cat([torch.nn.functional.one_hot(a, int(a.max()) + 1).double()
                   for a in assignments], dim=1)
    sol = torch.linalg.lstsq(X, E.double(), driver="gelsd").solution
    return X @ sol


@pytest.mark.parametrize("init", [{}, {"init": "qr", "keep_remainder": True}],
                         ids=["hash", "qr_keep_remainder"])
def test_cce_is_the_kmeans_quantisation_and_full_rows_are_copied(init):
    src = trained_ebc()
    E = src.embedding_bags["t_c"].weight.detach()
    config = CCEConfig(rows=16, chunks=4, seed=3, **init)
    out = compress_trained(src, {"t_c": config})

    # uncompressed: exact copy
    assert torch.equal(codebook(out, "t_full", ""), src.embedding_bags["t_full"].weight)
    assert torch.equal(every_id(out, "t_full"), src.embedding_bags["t_full"].weight.detach())

    m = out.tables["t_c"]
    ids = torch.arange(V)
    p, h = m.lookup_assignment(ids), m.bucket(ids)
    assert int(m.h_generation) == 1  # a fresh hash, as after re-clustering
    if init:  # ... except that keep_remainder keeps the QR remainder as h
        assert torch.equal(h, m.qr_pair(ids)[1])
    assert 0 <= int(p.min()) and int(p.max()) < config.rows
    A, B = m.stack_ab(lambda s: codebook(out, "t_c", s))
    A, B = A.view(4, config.rows, -1), B.view(4, config.rows, -1)
    recon = []
    for i in range(4):
        x = E[:, 4 * i: 4 * i + 4]
        dist = torch.cdist(x.double(), A[i].double()) ** 2
        chosen = dist.gather(1, p[:, i:i + 1]).squeeze(1)
        assert torch.all(chosen <= dist.min(1).values + 1e-5)  # p = nearest centroid
        resid = (x - A[i][p[:, i]]).double()
        ref_B = torch.zeros(config.rows, 4, dtype=torch.float64).index_add_(0, h[:, i], resid)
        n = torch.bincount(h[:, i], minlength=config.rows).double().unsqueeze(1)
        ref_B = torch.where(n > 0, ref_B / n.clamp(min=1), torch.zeros_like(ref_B))
        torch.testing.assert_close(B[i].double(), ref_B, atol=1e-6, rtol=1e-5)
        recon.append(A[i][p[:, i]] + B[i][h[:, i]])
    got = every_id(out, "t_c")
    torch.testing.assert_close(got, torch.cat(recon, 1), atol=1e-6, rtol=1e-6)

    # the clusters were planted: k-means finds them; the hashed init and a least-squares
    # hashing fit of the same parameters (2 * rows rows of full width) are far off
    err = sq_err(got, E)
    fresh = CCEEmbeddingBagCollection(src.embedding_bag_configs(), {"t_c": config})
    hashing = compress_trained(src, {"t_c": HashingTrickConfig(rows=2 * config.rows)})
    assert err < 0.01 * sq_err(every_id(fresh, "t_c"), E)
    assert err < 0.05 * sq_err(every_id(hashing, "t_c"), E)
    assert err < 0.02 * sq_err(E, torch.zeros_like(E))


def test_cce_float16_codebooks_and_counts_weighting():
    src = trained_ebc(tables=("t_c",))
    E = src.embedding_bags["t_c"].weight.detach()
    counts = torch.zeros(V)
    counts[:300] = torch.arange(300, 0, -1).float()  # ids >= 300 never seen
    out = compress_trained(src, {"t_c": CCEConfig(rows=16, chunks=4,
                                                  codebook_dtype=torch.float16)},
                           id_counts={"t_c": counts})
    assert codebook(out, "t_c", "cce").dtype == torch.float16
    assert out.tables["t_c"].reservoir.seen == 0  # the warm start's sample is not training's
    got = every_id(out, "t_c")
    assert sq_err(got, E) < 0.02 * sq_err(E, torch.zeros_like(E))


@pytest.mark.parametrize("config,design", [
    (HashingTrickConfig(rows=64, seed=1), "hash"),
    (CEConfig(rows=32, chunks=4, seed=2), "ce"),
    (QRConfig(collisions=25, operation="concat"), "qr_concat"),
    (QRConfig(collisions=25, operation="add"), "qr_add"),
])
def test_least_squares_methods_match_lstsq(config, design):
    src = trained_ebc(tables=("t_c",))
    E = src.embedding_bags["t_c"].weight.detach()
    out = compress_trained(src, {"t_c": config}, als_iters=50)
    m, ids = out.tables["t_c"], torch.arange(V)
    got = every_id(out, "t_c")
    if design == "hash":
        ref = one_hot_lstsq(E, m.remap(ids)[0])
    elif design == "ce":
        streams = m.remap(ids)
        ref = torch.cat([one_hot_lstsq(E[:, 4 * i:4 * i + 4], s - i * m.rows)
                         for i, s in enumerate(streams)], 1)
    elif design == "qr_concat":
        q, r = m.remap(ids)
        ref = torch.cat([one_hot_lstsq(E[:, :8], q), one_hot_lstsq(E[:, 8:], r)], 1)
    else:  # add: jointly linear in (Q, R); ALS converges to the joint optimum
        q, r = m.remap(ids)
        ref = one_hot_lstsq(E, q, r)
    if design == "qr_add":
        assert sq_err(got, E) <= sq_err(ref, E) * (1 + 1e-3)
    else:
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [QRConfig(collisions=25, operation="mult"),
                                    MEmComConfig(rows=64, seed=1)])
def test_alternating_fits_improve_on_their_start(config):
    src = trained_ebc(tables=("t_c",))
    E = src.embedding_bags["t_c"].weight.detach()
    errs = [sq_err(every_id(compress_trained(src, {"t_c": config}, als_iters=k), "t_c"), E)
            for k in (0, 1, 10)]
    assert errs[1] < errs[0] and errs[2] <= errs[1] * (1 + 1e-6)
    if isinstance(config, MEmComConfig):  # w = <E, H> / |H|^2 at the end of every round
        out = compress_trained(src, {"t_c": config}, als_iters=3)
        m = out.tables["t_c"]
        H = codebook(out, "t_c", "memcom")[m.bucket(torch.arange(V))]
        w_ref = (E * H).sum(1) / (H * H).sum(1)
        assert not torch.allclose(m.id_weight.detach(), torch.ones(V, 1))
        # H was refit after w: w is optimal for the H of the previous round, so compare the
        # error of the refit w against the stored one
        assert sq_err(w_ref.unsqueeze(1) * H, E) <= sq_err(every_id(out, "t_c"), E) * (1 + 1e-4)


def test_mpe_masters_are_the_trained_rows():
    src = trained_ebc(tables=("t_c",))
    out = compress_trained(src, {"t_c": MPEConfig(groups=4, bits=(0, 2, 4, 8))})
    m = out.tables["t_c"]
    assert torch.equal(m.weight.detach(), src.embedding_bags["t_c"].weight.detach())
    mean_abs = float(src.embedding_bags["t_c"].weight.detach().abs().mean())
    torch.testing.assert_close(m.steps().detach(), torch.tensor(
        [2 * mean_abs / (2.0 ** (b - 1)) ** 0.5 for b in (0, 2, 4, 8)]))


def test_state_dict_of_a_model_and_table_configs():
    src = trained_ebc()
    model_sd: Dict[str, torch.Tensor] = {
        f"model.sparse_arch.embedding_bag_collection.{k}": v for k, v in src.state_dict().items()}
    model_sd["model.dense_arch.weight"] = torch.zeros(3)
    a = compress_trained(model_sd, {"t_c": CCEConfig(rows=16)}, tables=src.embedding_bag_configs())
    b = compress_trained(src, {"t_c": CCEConfig(rows=16)})
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k  # deterministic, source form irrelevant
    with pytest.raises(ValueError, match="pass `tables`"):
        compress_trained(model_sd, {"t_c": CCEConfig(rows=16)})


def test_bad_input_names_the_table():
    src = trained_ebc()
    cfgs = src.embedding_bag_configs()
    with pytest.raises(ValueError, match="unknown tables \\['t_x'\\]"):
        compress_trained(src, {"t_x": CCEConfig(rows=16)})
    wrong_dim = [EmbeddingBagConfig(name=c.name, embedding_dim=8, num_embeddings=V,
                                    feature_names=c.feature_names) for c in cfgs]
    with pytest.raises(ValueError, match="table 't_full'.*\\(600, 16\\).*\\[600, 8\\]"):
        compress_trained(src.state_dict(), {}, tables=wrong_dim)
    renamed = [EmbeddingBagConfig(name="t_other", embedding_dim=DIM, num_embeddings=V,
                                  feature_names=["f"])]
    with pytest.raises(KeyError, match="table 't_other'.*'t_c', 't_full'"):
        compress_trained(src.state_dict(), {}, tables=renamed)
    with pytest.raises(ValueError, match="id_counts\\['t_c'\\] must be 600"):
        compress_trained(src, {}, id_counts={"t_c": torch.ones(5)})
    bad = src.state_dict()
    bad["embedding_bags.t_c.weight"] = bad["embedding_bags.t_c.weight"].clone()
    bad["embedding_bags.t_c.weight"][3, 1] = float("nan")
    with pytest.raises(ValueError, match="table 't_c'.*NaN"):
        compress_trained(bad, {}, tables=cfgs)
    with pytest.raises(ValueError, match="pass `tables`"):
        compress_trained(src.state_dict(), {})


class StockModel(nn.Module):
    """A full model as a TorchRec user trains it: a stock EBC and a linear head."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=t, embedding_dim=DIM, num_embeddings=V,
                               feature_names=[f"f_{t}"]) for t in ("t_full", "t_c")],
            device=device)
        self.head = nn.Linear(2 * DIM, 1, device=device)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.ebc(kjt).values())


def stock_batch(seed: int, n: int = 32) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["f_t_full", "f_t_c"], values=torch.randint(0, V, (2 * n,), generator=g),
        lengths=torch.ones(2 * n, dtype=torch.int64))


def _train_stock_sharded(rank: int, world: int, directory: str) -> Dict[str, object]:
    """Train the stock model under DMP (TorchRec's default sharders), save it with DCP, and
    try to warm-start from the sharded module itself."""
    torch.manual_seed(0)
    model = StockModel(device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": 0.5})
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(
        dist.GroupMember.WORLD), device=torch.device("cpu"))
    for step in range(3):
        dmp(stock_batch(10 + 2 * step + rank)).sum().backward()
    dcp.save(dmp.state_dict(), checkpoint_id=directory)
    try:
        compress_trained(dmp.module.ebc, {"t_c": CCEConfig(rows=16)})
        refused = ""
    except TypeError as e:
        refused = str(e)
    with torch.no_grad():
        return {"pooled": dmp.module.ebc(stock_batch(5)).values(), "refused": refused}


@pytest.mark.timeout(900)
def test_warm_start_from_a_sharded_full_model(tmp_path) -> None:
    ranks = run_multiprocess(_train_stock_sharded, 2, str(tmp_path / "ckpt"), timeout=900)
    assert "ShardedEmbeddingBagCollection, not an EmbeddingBagCollection" in ranks[0]["refused"]
    assert "load_unsharded" in ranks[0]["refused"]
    full = load_unsharded(StockModel(), str(tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(full.ebc(stock_batch(5)).values(), ranks[0]["pooled"])
    out = compress_trained(full.ebc, {"t_c": CCEConfig(rows=16)})
    assert torch.equal(codebook(out, "t_full", ""), full.ebc.embedding_bags["t_full"].weight)
    E = full.ebc.embedding_bags["t_c"].weight.detach()
    assert sq_err(every_id(out, "t_c"), E) < sq_err(
        every_id(CCEEmbeddingBagCollection(full.ebc.embedding_bag_configs(),
                                           {"t_c": CCEConfig(rows=16)}), "t_c"), E)
