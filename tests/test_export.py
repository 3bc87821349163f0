"""Inference export (torchrec_cce/export.py).

* Sharded -> unsharded: a model trained under DistributedModelParallel (world size 2, gloo)
  loaded into an unsharded model in another process gives the sharded model's outputs exactly,
  from a plain DCP directory and from a CheckpointManager directory; then exported.
* Round trip, every codebook method (CCE, CE, QR add/mult/concat, hashing, MEmCom, full; SUM
  and MEAN pooling; weighted and unweighted; INT8 and INT4; the collection alone and inside
  TorchRec's DLRM): quantise -> ``torchrec.fx.symbolic_trace`` -> ``torch.jit.script`` gives
  the eager quantised model's outputs, within the documented bound of the float model's
  (``tests/test_serving.py``'s per-element bound); saved to a file and loaded, the same again.
  MPE is refused with a clear error (no codebook; its lookup is a Python call).
"""

import os
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

import test_serving as ts
from multiprocess import run_multiprocess
from torchrec_cce import (
    CCEConfig,
    CCEEmbeddingBagCollection,
    CEConfig,
    HashingTrickConfig,
    MEmComConfig,
    MPEConfig,
    QRConfig,
    recluster,
)
from torchrec_cce.checkpoint import CheckpointManager
from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder
from torchrec_cce.export import (
    export_for_inference,
    export_program,
    load_program,
    load_unsharded,
    quantize_model,
)
from torchrec_cce.serving import quantize_codebooks

SIZES = {"a": 1000, "b": 300, "c": 200, "d": 500, "e": 400, "f": 50}
DIM = 8


def tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=DIM, num_embeddings=n,
                               feature_names=[k]) for k, n in SIZES.items()]


def compression() -> Dict[str, object]:
    return {"t_a": CCEConfig(rows=8, chunks=2, seed=1), "t_b": HashingTrickConfig(rows=32),
            "t_c": QRConfig(collisions=10), "t_d": CEConfig(rows=16, chunks=2),
            "t_e": MEmComConfig(rows=16)}  # t_f stays full


class Model(nn.Module):
    """Every codebook method in ``ebc``; with ``mpe``, a second collection holding an MPE table
    (and a full one) on the same features."""

    def __init__(self, device: torch.device = torch.device("cpu"), mpe: bool = False) -> None:
        super().__init__()
        self.ebc = CCEEmbeddingBagCollection(tables(), compression(), device=device)
        self.mpe = CCEEmbeddingBagCollection(
            [EmbeddingBagConfig(name="t_m", embedding_dim=DIM, num_embeddings=SIZES["a"],
                                feature_names=["a"]),
             EmbeddingBagConfig(name="t_n", embedding_dim=DIM, num_embeddings=SIZES["b"],
                                feature_names=["b"])],
            {"t_m": MPEConfig(groups=2, bits=(0, 4, 8))}, device=device) if mpe else None
        self.head = nn.Linear((len(SIZES) + 2 * mpe) * DIM, 1, device=device)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = [self.ebc(kjt).values()] + ([self.mpe(kjt).values()] if self.mpe else [])
        return self.head(torch.cat(pooled, dim=1))


def batch(seed: int, n: int = 16) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 4, (n * len(SIZES),), generator=g)
    per_key = lengths.view(len(SIZES), n).sum(1)
    values = torch.cat([torch.randint(0, v, (int(k),), generator=g)
                        for v, k in zip(SIZES.values(), per_key)])
    return KeyedJaggedTensor.from_lengths_sync(keys=list(SIZES), values=values, lengths=lengths)


def _train_sharded(rank: int, world: int, directory: str) -> Dict[str, torch.Tensor]:
    """Train a few steps under DMP (CCE's p split by id range, MEmCom's per-id weights
    sharded), re-cluster, save with dcp.save and with CheckpointManager; return outputs."""
    torch.manual_seed(0)
    model = Model(device=torch.device("meta"), mpe=True)
    apply_optimizer_in_backward(RowWiseAdagrad, [p for n, p in model.named_parameters()
                                                 if p.dim() == 2 and "head" not in n],
                                {"lr": 0.1})
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        sharders=[CCEEmbeddingBagCollectionSharder(replicate_assignment_below=0)],
        device=torch.device("cpu"))
    dense = torch.optim.SGD([p for n, p in dmp.named_parameters() if "head" in n], lr=0.1)
    for step in range(4):
        dmp(batch(100 + 2 * step + rank)).sum().backward()
        dense.step()
        dense.zero_grad()
        if step == 1:
            recluster(dmp)
    dcp.save(dmp.state_dict(), checkpoint_id=os.path.join(directory, "plain"))
    CheckpointManager(os.path.join(directory, "managed")).save(4, dmp, None, {"step": 4})
    try:
        export_for_inference(dmp)
        refused = ""
    except TypeError as e:
        refused = str(e)
    dmp.eval()
    with torch.no_grad():
        return {"refused": refused, "probe": dmp(batch(7)).detach(),
                "pooled": dmp.module.ebc(batch(7)).values(),
                "assignment_words": torch.tensor(
                    dmp.module.ebc.tables["t_a"].assignment.numel())}


@pytest.mark.timeout(900)
def test_sharded_training_loads_into_an_unsharded_model(tmp_path) -> None:
    ranks = run_multiprocess(_train_sharded, 2, str(tmp_path), timeout=900)
    # The assignment really was split across the ranks (each stores part of p).
    full_words = Model().ebc.tables["t_a"].assignment.numel()
    assert all(int(r["assignment_words"]) < full_words for r in ranks)
    # Exporting the sharded model itself is refused, naming the way
    refused = ranks[0]["refused"]
    assert "module.ebc' is a sharded collection (ShardedCCEEmbeddingBagCollection)" in refused
    assert "load_unsharded" in refused
    for where in ("plain", "managed", os.path.join("managed", "step_4")):
        model = load_unsharded(Model(mpe=True), str(tmp_path / where)).eval()
        with torch.no_grad():
            out = model(batch(7))
        for r in ranks:  # every rank evaluated the same batch
            assert torch.equal(out, r["probe"]), where
    with torch.no_grad():  # (the load changed something: a fresh model differs)
        assert not torch.allclose(Model(mpe=True).eval()(batch(7)), ranks[0]["probe"])
    # ... and on to a served file (the codebook collection; MPE serves through torchrec_cce.mpe):
    # the scripted INT8 model equals the eager quantised one
    pooled = Pooled(model.ebc).eval()
    torch.jit.save(export_for_inference(pooled), str(tmp_path / "served.pt"))
    served = torch.jit.load(str(tmp_path / "served.pt"))
    with torch.no_grad():
        expected = quantize_model(pooled)(batch(7))
        assert torch.equal(served(batch(7)), expected)
        # The sharded MEmCom table is a fused TBE with per-sample weights (model-parallel since
        # the sharder leaves out data_parallel); it sums a weighted bag in another order than
        # nn.EmbeddingBag: equal to 1 float32 ulp, not bit for bit.
        torch.testing.assert_close(pooled(batch(7)), ranks[0]["pooled"], rtol=0, atol=5e-7)
        assert not torch.equal(expected, ranks[0]["pooled"])  # (quantised: not the float ones)


def test_load_unsharded_errors(tmp_path) -> None:

    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_unsharded(Model(), str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither a DCP checkpoint"):
        load_unsharded(Model(), str(tmp_path / "empty"))
    other = nn.Module()
    other.ebc = CCEEmbeddingBagCollection(tables(), {"t_a": CCEConfig(rows=4, chunks=2)})
    dcp.save(other.state_dict(), checkpoint_id=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="does not fit this model.*t_a__cce.weight: saved "
                       "\\(16, 4\\), model \\(32, 4\\)"):
        load_unsharded(Model(), str(tmp_path / "other"))


def test_quantize_model_quantises_every_collection_in_a_copy() -> None:
    torch.manual_seed(0)
    model = Model()
    served = quantize_model(model)
    assert isinstance(served.ebc.codebooks, QuantEBC) and not served.training
    assert not isinstance(model.ebc.codebooks, QuantEBC)  # the original is untouched
    kjt = batch(3)
    with torch.no_grad():
        expected = model.head(quantize_codebooks(model.ebc)(kjt).values())
        assert torch.equal(served(kjt), expected)
    with pytest.raises(ValueError, match="no CCEEmbeddingBagCollection"):
        quantize_model(nn.Linear(2, 2))


class Pooled(nn.Module):
    """The collection's pooled outputs as one tensor (what a model consumes)."""

    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(kjt).values()


def _split(values: torch.Tensor, keys: List[str], dim: int) -> Dict[str, torch.Tensor]:
    return {k: values[:, i * dim:(i + 1) * dim] for i, k in enumerate(keys)}


@pytest.mark.parametrize("dtype", [torch.int8, torch.quint4x2], ids=["int8", "int4"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_round_trip_every_method_within_the_bound(tmp_path, dtype, weighted) -> None:

    float_ebc = ts.trained_like()
    if weighted:
        float_ebc = CCEEmbeddingBagCollection(ts.tables(), ts.COMPRESSION, is_weighted=True)
        float_ebc.load_state_dict(ts.trained_like().state_dict())
    model = Pooled(float_ebc).eval()
    scripted = export_for_inference(model, dtype)
    assert isinstance(scripted, torch.jit.ScriptModule)
    path = str(tmp_path / "model.pt")
    torch.jit.save(scripted, path)
    loaded = torch.jit.load(path)
    eager_quantised = quantize_model(model, dtype)
    keys = float_ebc.feature_names()
    for seed in range(3):
        kjt = ts.batch(seed, weighted)
        with torch.no_grad():
            out = scripted(kjt)
            torch.testing.assert_close(out, eager_quantised(kjt), rtol=0, atol=1e-6)
            assert torch.equal(loaded(kjt), out)
            ref = _split(model(kjt), keys, ts.DIM)
        bound = ts._bounds(float_ebc, kjt, dtype)
        for key, value in _split(out, keys, ts.DIM).items():
            err = (value - ref[key]).abs()
            assert bool((err <= bound[key] + 1e-6).all()), (key, float(err.max()))


def test_round_trip_inside_torchrec_dlrm(tmp_path) -> None:
    torch.manual_seed(0)
    dlrm = DLRM(embedding_bag_collection=ts.trained_like(), dense_in_features=4,
                dense_arch_layer_sizes=[8, ts.DIM], over_arch_layer_sizes=[8, 1]).eval()
    scripted = export_for_inference(dlrm)
    torch.jit.save(scripted, str(tmp_path / "dlrm.pt"))
    loaded = torch.jit.load(str(tmp_path / "dlrm.pt"))
    dense = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    kjt = ts.batch(1, weighted=False)
    with torch.no_grad():
        expected = quantize_model(dlrm)(dense, kjt)
        torch.testing.assert_close(scripted(dense, kjt), expected, rtol=0, atol=1e-6)
        assert torch.equal(loaded(dense, kjt), scripted(dense, kjt))
        assert not torch.equal(expected, dlrm(dense, kjt))


def test_export_refuses_mpe_and_sharded_targets() -> None:

    ebc = CCEEmbeddingBagCollection(tables(), {"t_a": MPEConfig(groups=2, bits=(0, 4, 8))})
    for dtype in (torch.int8, None):
        with pytest.raises(ValueError, match="table 't_a' .* MPE table"):
            export_for_inference(Pooled(ebc), dtype)


def test_torch_export_round_trip(tmp_path) -> None:
    model = Pooled(ts.trained_like()).eval()
    kjt = ts.batch(0, weighted=False)
    program = export_program(model, (kjt,))
    path = str(tmp_path / "program.pt2")
    torch.export.save(program, path)
    loaded = load_program(path).module()
    # same shapes as the example, other ids: the ids are inputs, not constants
    sizes = [t.num_embeddings for t in ts.tables()]  # (the batch's keys are in table order)
    other = KeyedJaggedTensor(keys=kjt.keys(), lengths=kjt.lengths(), values=torch.cat(
        [(jt.values() * 7 + 3) % n for jt, n in zip(kjt.to_dict().values(), sizes)]))
    eager_quantised = quantize_model(model)
    with torch.no_grad():
        for x in (kjt, other):
            expected = eager_quantised(x)
            torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-6)
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)
        assert not torch.equal(eager_quantised(other), eager_quantised(kjt))
