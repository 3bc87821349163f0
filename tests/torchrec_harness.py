"""TorchRec's own sharding oracle on compressed collections (run by test_ebc_contracts_dist.py).

``torchrec.distributed.test_utils.test_sharding.sharding_single_rank_test_single_process`` is
the harness TorchRec's sharding tests run: it builds ``model_class`` unsharded (global model)
and on meta, plans it with ``EmbeddingShardingPlanner`` and the given sharders, wraps it in
DMP, copies the global state in, takes one SGD step on both (fused EXACT_SGD in the sharded
codebooks, SGD elsewhere) and asserts that the sharded predictions after the step equal the
unsharded ones. Here ``model_class`` is TorchRec's ``TestSparseNN`` with both of its EBCs
replaced by ``CCEEmbeddingBagCollection``s (CCE, QR, hashing, CE and full tables).
"""

import sys
import types
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.test_utils.test_model import TestSparseNN


def _shim_missing_test_module() -> None:
    """The 1.8 wheel's test_utils/test_sharding.py imports ``torchrec.distributed.tests.
    test_sequence_model`` (not shipped) for 2D parallelism only: stand in a module whose sharder
    raises if anything uses it."""
    name = "torchrec.distributed.tests.test_sequence_model"
    if name in sys.modules:
        return
    try:
        __import__(name)
        return
    except ModuleNotFoundError:
        pass

    class TestEmbeddingCollectionSharder:  # noqa: D401 - placeholder
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("2D parallel test sharder: not shipped in the wheel")

    package = types.ModuleType("torchrec.distributed.tests")
    package.__path__ = []
    module = types.ModuleType(name)
    module.TestEmbeddingCollectionSharder = TestEmbeddingCollectionSharder
    sys.modules.setdefault("torchrec.distributed.tests", package)
    sys.modules[name] = module


_shim_missing_test_module()
from torchrec.distributed.test_utils.test_sharding import (  # noqa: E402
    sharding_single_rank_test_single_process,
)
from torchrec.distributed.types import ModuleSharder
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection, CEConfig, HashingTrickConfig, QRConfig
from torchrec_cce.distributed import CCEEmbeddingBagCollectionSharder


def compression(tables: List[EmbeddingBagConfig]) -> Dict[str, Any]:
    configs = [CCEConfig(rows=4, chunks=2), QRConfig(collisions=4, operation="add"),
               HashingTrickConfig(rows=7), CEConfig(rows=4, chunks=2), None]
    return {t.name: c for t, c in zip(tables, configs) if c is not None}


class CompressedTestSparseNN(TestSparseNN):
    """TorchRec's TestSparseNN with its two EBCs compressed."""

    def __init__(self, tables: List[EmbeddingBagConfig], num_float_features: int = 10,
                 weighted_tables: Optional[List[EmbeddingBagConfig]] = None,
                 embedding_groups: Optional[Dict[str, List[str]]] = None,
                 dense_device: Optional[torch.device] = None,
                 sparse_device: Optional[torch.device] = None, **kwargs: Any) -> None:
        super().__init__(tables=tables, num_float_features=num_float_features,
                         weighted_tables=weighted_tables, embedding_groups=embedding_groups,
                         dense_device=dense_device, sparse_device=sparse_device)
        self.sparse.ebc = CCEEmbeddingBagCollection(tables, compression(tables),
                                                    device=sparse_device)
        self.sparse.weighted_ebc = CCEEmbeddingBagCollection(
            weighted_tables, compression(weighted_tables[::-1]), is_weighted=True,
            device=sparse_device)


def tables() -> List[EmbeddingBagConfig]:
    """TorchRec's test tables (test_model_parallel.py's shapes)."""
    return [EmbeddingBagConfig(num_embeddings=(i + 1) * 10, embedding_dim=(i + 2) * 4,
                               name=f"table_{i}", feature_names=[f"feature_{i}"])
            for i in range(5)]


def weighted_tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(num_embeddings=(i + 1) * 10, embedding_dim=(i + 2) * 4,
                               name=f"weighted_table_{i}", feature_names=[f"weighted_feature_{i}"])
            for i in range(2)]


def run_torchrec_sharding_oracle(rank: int, world: int) -> None:
    """TorchRec's sharding test on :class:`CompressedTestSparseNN` in this (initialised) process
    group; raises (``torch.testing.assert_close``) if sharded and unsharded predictions differ."""
    fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}
    sharders: List[ModuleSharder[torch.nn.Module]] = [
        # data_parallel allowed: TorchRec's test tables give some codebooks widths that are
        # not a multiple of 4, which fbgemm's fused (model-parallel) kernel refuses.
        CCEEmbeddingBagCollectionSharder(ebc_sharder=EmbeddingBagCollectionSharder(
            fused_params=fused), allow_data_parallel=True)]
    sharding_single_rank_test_single_process(
        pg=dist.GroupMember.WORLD, device=torch.device("cpu"), rank=rank, world_size=world,
        model_class=CompressedTestSparseNN, embedding_groups={}, tables=tables(),
        weighted_tables=weighted_tables(), sharders=sharders, optim=EmbOptimType.EXACT_SGD)
