"""TorchRec contracts of the sharded collection: real processes (gloo, world size 2).

* a feature served by several tables and KJT keys no table serves, sharded == unsharded
  (CCE with its assignment split by id range, MEmCom's per-id weights and MPE's master rows
  split by id range, a full and a hashed table);
* DistributedModelParallel given only TorchRec's default sharders refuses at construction and
  names ``CCEEmbeddingBagCollectionSharder``;
* TorchRec's own sharding test (``torchrec.distributed.test_utils.test_sharding``: planner,
  DMP, one SGD step, sharded predictions == unsharded) on its TestSparseNN with compressed
  collections (tests/torchrec_harness.py).

All in one spawn of two processes: starting them costs most of the time.
"""

from typing import List

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import (
    construct_module_sharding_plan,
    get_default_sharders,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import PoolingType

from multiprocess import run_multiprocess
from torchrec_harness import run_torchrec_sharding_oracle
from torchrec_cce import (CCEConfig, CCEEmbeddingBagCollection, HashingTrickConfig, MEmComConfig,
                          MPEConfig)
from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder
from torchrec_cce.distributed.tensors import scatter_full

V = 200


def tables() -> List[EmbeddingBagConfig]:
    """f1 in a (CCE) and e (MPE), f2 in a and b (full, MEAN), f3 in c (MEmCom) and d (hashing)."""
    return [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=V, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=V, feature_names=["f2"],
                           pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=V, feature_names=["f3"]),
        EmbeddingBagConfig(name="d", embedding_dim=4, num_embeddings=V, feature_names=["f3"]),
        EmbeddingBagConfig(name="e", embedding_dim=8, num_embeddings=V, feature_names=["f1"]),
    ]


COMPRESSION = {"a": CCEConfig(rows=8, chunks=2), "c": MEmComConfig(rows=8),
               "d": HashingTrickConfig(rows=16),
               "e": MPEConfig(groups=2, counts=list(range(V, 0, -1)))}


def reference() -> CCEEmbeddingBagCollection:
    torch.manual_seed(0)
    ref = CCEEmbeddingBagCollection(tables(), COMPRESSION)
    with torch.no_grad():  # non-trivial per-id state, so that fetching it by id range is tested
        ids = torch.arange(0, V, 3)
        ref.tables["a"].write_assignment(ids, torch.full((ids.numel(), 2), 5))
        ref.tables["c"].id_weight.copy_(torch.linspace(0.5, 1.5, V).unsqueeze(1))
    return ref


def batch(seed: int, batch_size: int = 6) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    keys = ["zz", "f3", "f1", "f2"]  # "zz": served by no table
    lengths = torch.randint(0, 4, (len(keys) * batch_size,), generator=g)
    values = torch.randint(0, V, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)


def _default_sharders_only() -> str:
    """The message of DMP given TorchRec's default sharders only (ours forgotten)."""
    module = CCEEmbeddingBagCollection(tables()[:4], {"a": CCEConfig(rows=8, chunks=2)},
                                       device=torch.device("meta"))
    wrapped = torch.nn.ModuleDict({"ebc": module})
    try:
        DistributedModelParallel(wrapped, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                 sharders=get_default_sharders(), device=torch.device("cpu"))
    except TypeError as e:
        return str(e)
    return "no error"


def _sharded(rank: int, world: int):
    run_torchrec_sharding_oracle(rank, world)  # raises if TorchRec's oracle disagrees
    message = _default_sharders_only()
    ref = reference()
    sharder = CCEEmbeddingBagCollectionSharder(replicate_assignment_below=0)
    module = CCEEmbeddingBagCollection(tables(), COMPRESSION, device=torch.device("meta"))
    names = [c.name for c in module.codebook_table_configs()]
    plan = ShardingPlan({"": construct_module_sharding_plan(
        module, {n: table_wise(rank=i % world) for i, n in enumerate(names)}, sharder=sharder,
        local_size=world, world_size=world, device_type="cpu")})
    dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=plan, sharders=[sharder], device=torch.device("cpu"))
    for key, value in dmp.state_dict().items():
        scatter_full(value, ref.state_dict()[key])
    kjt = batch(10 + rank)
    out = dmp(kjt).wait()
    expected = ref(kjt)
    return message, (out.keys(), expected.keys(), out.length_per_key(),
                     expected.length_per_key(), (out.values() - expected.values()).abs().max().item())


def test_sharded_contracts() -> None:
    """(TorchRec's oracle raised in the children if its check failed.)"""
    for message, (keys, ref_keys, lengths, ref_lengths, err) in run_multiprocess(_sharded, 2):
        # DMP given only TorchRec's default sharders refuses at construction, naming ours
        assert "CCEEmbeddingBagCollectionSharder" in message, message
        assert "sharders=[CCEEmbeddingBagCollectionSharder(), *get_default_sharders()]" in message
        assert "from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder" in message
        # shared features and an extra key: sharded == unsharded
        assert keys == ref_keys == ["f1@a", "f2@a", "f2@b", "f3@c", "f3@d", "f1@e"]
        assert lengths == ref_lengths
        assert err < 1e-6, err
