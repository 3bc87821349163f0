"""The training policy a TorchRec script needs with compressed tables, one module per idea:

* :mod:`~torchrec_cce.train.distributed`: process group (``init_distributed``), ``in_step``;
* :mod:`~torchrec_cce.train.sharding`: planner + CCE storage reservation + DMP (``shard``),
  the train pipeline (``make_pipeline``);
* :mod:`~torchrec_cce.train.optimizers`: sparse rule in backward for every embedding row,
  dense optimizer, warm-up reaching fbgemm's fused optimizers (``Optimizers``);
* :mod:`~torchrec_cce.train.hooks`: re-clustering, MPE stages and hot-tier migration (``training_hooks``);
* :mod:`~torchrec_cce.train.pooled`: gain, L2 and dropout on the pooled embeddings
  (``regularize_pooled``);
* :mod:`~torchrec_cce.train.evaluation`: ``evaluate`` and the best-validation ``Protocol``;
* :mod:`~torchrec_cce.train.checkpoint`: checkpoint glue and the fault-injection test hook;
* :mod:`~torchrec_cce.train.plan_select`: choosing a budget plan on validation data;
* :mod:`~torchrec_cce.train.defaults`: the CCE defaults, compression from flags;
* :mod:`~torchrec_cce.train.report`: metrics dict, console summary, loss plot.
"""

from torchrec_cce.train.distributed import in_step, init_distributed
from torchrec_cce.train.evaluation import Protocol, evaluate, evaluate_val_test
from torchrec_cce.train.hooks import (
    Hooks,
    MPEDLRMTrain,
    MigrationHook,
    MPEHook,
    ReclusterHook,
    TrainingHook,
    training_hooks,
)
from torchrec_cce.train.optimizers import (
    Optimizers,
    apply_sparse_optimizer,
    default_warmup_steps,
    dense_optimizer,
    sparse_optimizer,
)
from torchrec_cce.train.pooled import PooledRegularizer, regularize_pooled
from torchrec_cce.train.sharding import make_pipeline, shard

__all__ = [
    "Hooks",
    "MPEDLRMTrain",
    "MigrationHook",
    "MPEHook",
    "Optimizers",
    "PooledRegularizer",
    "Protocol",
    "ReclusterHook",
    "TrainingHook",
    "apply_sparse_optimizer",
    "default_warmup_steps",
    "dense_optimizer",
    "evaluate",
    "evaluate_val_test",
    "in_step",
    "init_distributed",
    "make_pipeline",
    "regularize_pooled",
    "shard",
    "sparse_optimizer",
    "training_hooks",
]
