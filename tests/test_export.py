"""Inference export (torchrec_cce/export.py): a model trained under DistributedModelParallel
(world size 2, gloo) loaded into an unsharded model in another process gives the sharded
model's outputs exactly, from a plain DCP directory and from a CheckpointManager directory;
bad targets raise clearly."""

import os
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from multiprocess import run_multiprocess
from torchrec_cce import (
    CCEConfig,
    CCEEmbeddingBagCollection,
    CEConfig,
    HashingTrickConfig,
    MEmComConfig,
    QRConfig,
)
from torchrec_cce.export import load_unsharded

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
    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        self.ebc = CCEEmbeddingBagCollection(tables(), compression(), device=device)
        self.head = nn.Linear(len(SIZES) * DIM, 1, device=device)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.ebc(kjt).values())


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
    import torch.distributed.checkpoint as dcp
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from torchrec_cce import recluster
    from torchrec_cce.checkpoint import CheckpointManager
    from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder

    torch.manual_seed(0)
    model = Model(device=torch.device("meta"))
    apply_optimizer_in_backward(RowWiseAdagrad, [p for p in model.ebc.parameters()
                                                 if p.dim() == 2], {"lr": 0.1})
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
    dmp.eval()
    with torch.no_grad():
        return {"probe": dmp(batch(7)).detach(), "assignment_words": torch.tensor(
            dmp.module.ebc.tables["t_a"].assignment.numel())}


@pytest.mark.timeout(900)
def test_sharded_training_loads_into_an_unsharded_model(tmp_path) -> None:
    ranks = run_multiprocess(_train_sharded, 2, str(tmp_path), timeout=900)
    # The assignment really was split across the ranks (each stores part of p).
    full_words = Model().ebc.tables["t_a"].assignment.numel()
    assert all(int(r["assignment_words"]) < full_words for r in ranks)
    for where in ("plain", "managed", os.path.join("managed", "step_4")):
        model = load_unsharded(Model(), str(tmp_path / where)).eval()
        with torch.no_grad():
            out = model(batch(7))
        for r in ranks:  # every rank evaluated the same batch
            assert torch.equal(out, r["probe"]), where
    fresh = Model().eval()
    with torch.no_grad():  # (the load changed something: a fresh model differs)
        assert not torch.allclose(fresh(batch(7)), ranks[0]["probe"])


def test_load_unsharded_errors(tmp_path) -> None:
    import torch.distributed.checkpoint as dcp

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
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

    from torchrec_cce.export import quantize_model
    from torchrec_cce.serving import quantize_codebooks

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
