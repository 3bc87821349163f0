"""DLRM with compressed embedding tables: the one training script every launcher runs.

    torchx run launch/components.py:dlrm -j 1x2 -- --data synthetic --method cce --epochs 1
    torchrun --nproc_per_node 2 examples/dlrm/train.py --data synthetic --method cce
    python examples/dlrm/train.py --data criteo_tsv --train-path train.txt --method cce

Reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun, TorchX); a plain ``python`` run is a world of
one. Backend: ``$TORCHREC_CCE_BACKEND``, else NCCL with CUDA, else gloo.

Pipeline: data (torchrec_cce.data) -> TorchRec DLRM whose EBC is a CCEEmbeddingBagCollection ->
planner (with the CCE storage reservation) -> DistributedModelParallel with the CCE sharder ->
fused sparse optimizer (apply_optimizer_in_backward) + dense optimizer -> TrainPipelineSparseDist.
Re-clustering runs as a training-loop hook (ReclusterSchedule). Evaluation: torchmetrics AUROC
and mean BCE (log loss), synchronised across ranks.
"""

import argparse
import json
import math
import os
import socket
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torchmetrics
from torch import nn
from tqdm import tqdm

from torchrec import EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from torchrec_cce import (  # noqa: E402
    CCEEmbeddingBagCollection,
    compression_for_budget,
    memory_report,
    summarize,
)
from torchrec_cce.clustering.schedule import ReclusterSchedule  # noqa: E402
from torchrec_cce.configs import METHOD_NAMES  # noqa: E402
from torchrec_cce.data import (  # noqa: E402
    AvazuCsvDataset,
    CriteoNpyDataset,
    CriteoSyntheticDataset,
    CriteoTsvDataset,
)
from torchrec_cce.distributed import (  # noqa: E402
    CCEEmbeddingBagCollectionSharder,
    CCEStorageReservation,
    format_plan_memory,
    plan_memory,
)
from torchrec_cce.pipeline import redo_pending_input_dist  # noqa: E402

BACKEND_ENV = "TORCHREC_CCE_BACKEND"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=["synthetic", "criteo_tsv", "criteo_npy", "avazu_csv"],
                   default="synthetic")
    d.add_argument("--train-path", default=None,
                   help="file (tsv/csv) or comma-separated prefix list for npy: "
                        "'<dir>/day_0' -> day_0_{dense,sparse,labels}.npy")
    d.add_argument("--test-path", default=None)
    d.add_argument("--test-fraction", type=float, default=0.1,
                   help="without --test-path: every round(1/f)-th batch is held out for test")
    d.add_argument("--num-embeddings-per-feature", default=None,
                   help="comma-separated table sizes; ids are taken modulo these")
    d.add_argument("--max-ids-per-feature", type=int, default=10_000_000,
                   help="cap on default table sizes (the data's own cardinalities)")
    d.add_argument("--synthetic-scale", type=float, default=0.001,
                   help="synthetic cardinalities = Criteo Kaggle's x scale")
    d.add_argument("--synthetic-train-batches", type=int, default=None,
                   help="global train batches per epoch (synthetic)")
    d.add_argument("--synthetic-test-batches", type=int, default=None)
    m = p.add_argument_group("model")
    m.add_argument("--method", choices=list(METHOD_NAMES), default="cce")
    m.add_argument("--max-params-per-table", type=int, default=None,
                   help="the paper's cap: tables with num_embeddings*dim above it are compressed "
                        "to this many parameters (default: 1/16 of the largest table)")
    m.add_argument("--chunks", type=int, default=4)
    m.add_argument("--embedding-dim", type=int, default=16)
    m.add_argument("--dense-arch", default="64,16", help="dense MLP sizes (last = embedding dim)")
    m.add_argument("--over-arch", default="64,32,1")
    m.add_argument("--dcn", action="store_true", help="DLRM_DCN instead of DLRM")
    m.add_argument("--dcn-layers", type=int, default=2)
    m.add_argument("--dcn-low-rank", type=int, default=16)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=1024, help="per-rank batch size")
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--sparse-optimizer", choices=["rowwise_adagrad", "adagrad", "sgd"],
                   default="rowwise_adagrad")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--recluster-at", default="",
                   help="fractions of the first epoch, e.g. 0.25,0.5 (CCE only)")
    t.add_argument("--recluster-every-epoch", type=int, default=0,
                   help="also re-cluster at the end of each of the first N epochs")
    t.add_argument("--kmeans-iters", type=int, default=10)
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    o = p.add_argument_group("output")
    o.add_argument("--checkpoint-dir", default=None, help="DCP checkpoint written each epoch")
    o.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    o.add_argument("--metrics-json", default=None)
    o.add_argument("--tensorboard-dir", default=None)
    o.add_argument("--loss-curve-png", default=None)
    o.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    if args.recluster_at and args.method != "cce":
        p.error("--recluster-at only applies to --method cce")
    if args.data != "synthetic" and not args.train_path:
        p.error(f"--data {args.data} needs --train-path")
    return args


# ---------------------------------------------------------------- distributed set-up
def init_distributed() -> Tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank, world, device


# ---------------------------------------------------------------- data
class Data:
    """Train/test iterables for this rank, table sizes, and the data's Bayes floor if known."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int) -> None:
        sizes = ([int(x) for x in args.num_embeddings_per_feature.split(",")]
                 if args.num_embeddings_per_feature else None)
        self.bayes_logloss: Optional[float] = None
        self.steps_per_epoch: Optional[int] = None
        self.holdout_every = 0
        bs = args.batch_size
        if args.data == "synthetic":
            kw = dict(batch_size=bs, rank=rank, world_size=world, seed=args.seed,
                      scale=args.synthetic_scale, num_embeddings_per_feature=sizes)
            train_batches = args.synthetic_train_batches or 64 * world
            test_batches = args.synthetic_test_batches or 8 * world
            self.train = CriteoSyntheticDataset("train", num_batches=train_batches, **kw)
            self.test = CriteoSyntheticDataset("test", num_batches=test_batches, **kw)
            self.sizes = self.train.num_embeddings_per_feature
            self.steps_per_epoch = len(self.train)
            self.bayes_logloss = self.test.bayes_logloss()
            self.dense_in = 13
        elif args.data in ("criteo_tsv", "avazu_csv"):
            if sizes is None:
                cards = (CriteoTsvDataset if args.data == "criteo_tsv"
                         else AvazuCsvDataset)(args.train_path, bs).cardinalities
                sizes = [min(c or args.max_ids_per_feature, args.max_ids_per_feature)
                         for c in cards]
            cls = CriteoTsvDataset if args.data == "criteo_tsv" else AvazuCsvDataset
            extra = {} if args.data == "criteo_tsv" else {"constant_dense": True}
            self.train = cls(args.train_path, bs, rank=rank, world_size=world,
                             num_embeddings_per_feature=sizes, **extra)
            if args.test_path:
                self.test = cls(args.test_path, bs, rank=rank, world_size=world,
                                num_embeddings_per_feature=sizes, **extra)
            else:
                self.test = self.train
                self.holdout_every = max(2, round(1 / args.test_fraction))
            self.sizes = sizes
            self.dense_in = 13 if args.data == "criteo_tsv" else 1
            rows = _count_lines(args.train_path) - (args.data == "avazu_csv")
            self.steps_per_epoch = max(1, rows // (bs * world))
            if self.holdout_every:
                self.steps_per_epoch -= self.steps_per_epoch // self.holdout_every
        else:  # criteo_npy
            prefixes = args.train_path.split(",")
            paths = [[f"{x}_{kind}.npy" for x in prefixes] for kind in ("dense", "sparse", "labels")]
            sizes = sizes or [args.max_ids_per_feature] * 26
            self.train = CriteoNpyDataset(*paths, batch_size=bs, rank=rank, world_size=world,
                                          num_embeddings_per_feature=sizes, stage="train")
            test_prefixes = (args.test_path or args.train_path).split(",")
            tpaths = [[f"{x}_{kind}.npy" for x in test_prefixes]
                      for kind in ("dense", "sparse", "labels")]
            self.test = CriteoNpyDataset(*tpaths, batch_size=bs, rank=rank, world_size=world,
                                         num_embeddings_per_feature=sizes, stage="test")
            self.sizes = sizes
            self.dense_in = 13
            self.steps_per_epoch = len(self.train)

    def train_batches(self) -> Iterator[Batch]:
        for i, batch in enumerate(self.train):
            if not self.holdout_every or i % self.holdout_every:
                yield batch

    def test_batches(self) -> Iterator[Batch]:
        for i, batch in enumerate(self.test):
            if not self.holdout_every or i % self.holdout_every == 0:
                yield batch


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def in_step(batches: Iterator[Batch], stop_after: Optional[int] = None) -> Iterator[Batch]:
    """Yield while *every* rank still has a batch (ranks of a streamed file may differ by one;
    a rank running ahead would hang the collectives)."""
    it = iter(batches)
    n = 0
    while stop_after is None or n < stop_after:
        batch = next(it, None)
        flag = torch.tensor([0 if batch is None else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag) == 0:
            return
        n += 1
        yield batch


# ---------------------------------------------------------------- model
def build_model(args: argparse.Namespace, sizes: List[int], dense_in: int) -> Tuple[nn.Module, Dict]:
    dim = args.embedding_dim
    tables = [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=dim, num_embeddings=n,
                                 feature_names=[f"cat_{i}"]) for i, n in enumerate(sizes)]
    cap = args.max_params_per_table or max(16, max(sizes) * dim // 16)
    compression = compression_for_budget(tables, args.method, cap, chunks=args.chunks,
                                         seed=args.seed)
    ebc = CCEEmbeddingBagCollection(tables, compression, device=torch.device("meta"))
    dense = [int(x) for x in args.dense_arch.split(",")]
    over = [int(x) for x in args.over_arch.split(",")]
    if dense[-1] != dim:
        raise ValueError(f"--dense-arch must end with the embedding dim {dim}, got {dense}")
    if args.dcn:
        dlrm = DLRM_DCN(embedding_bag_collection=ebc, dense_in_features=dense_in,
                        dense_arch_layer_sizes=dense, over_arch_layer_sizes=over,
                        dcn_num_layers=args.dcn_layers, dcn_low_rank_dim=args.dcn_low_rank,
                        dense_device=torch.device("cpu"))
    else:
        dlrm = DLRM(embedding_bag_collection=ebc, dense_in_features=dense_in,
                    dense_arch_layer_sizes=dense, over_arch_layer_sizes=over,
                    dense_device=torch.device("cpu"))
    return DLRMTrain(dlrm), {"max_params_per_table": cap, "compressed_tables": len(compression)}


def sparse_optimizer(name: str) -> Tuple[type, Dict[str, Any]]:
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.optimizers import SGD

    if name == "rowwise_adagrad":
        return RowWiseAdagrad, {"eps": 1e-8}
    if name == "adagrad":
        return torch.optim.Adagrad, {"eps": 1e-8}
    return SGD, {}


def shard_model(model: nn.Module, args: argparse.Namespace, world: int, device: torch.device
                ) -> Tuple[nn.Module, str]:
    opt_cls, opt_kw = sparse_optimizer(args.sparse_optimizer)
    # Codebooks (2-D) get the fused sparse optimizer; MEmCom's 1-D per-id weights (split by id
    # range, not TBE tables) get torch's optimizer of the same rule (Adagrad = row-wise Adagrad
    # on one-element rows), also stepped in backward and checkpointed in dmp.fused_optimizer.
    sparse = list(model.model.sparse_arch.parameters())
    apply_optimizer_in_backward(opt_cls, [p for p in sparse if p.dim() == 2],
                                {"lr": args.lr, **opt_kw})
    per_id = [p for p in sparse if p.dim() == 1]
    if per_id:
        per_id_cls = torch.optim.SGD if args.sparse_optimizer == "sgd" else torch.optim.Adagrad
        apply_optimizer_in_backward(per_id_cls, per_id, {"lr": args.lr, **opt_kw})
    sharder = CCEEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder())
    topology = Topology(world_size=world, compute_device=device.type,
                        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=args.batch_size,
                                       storage_reservation=CCEStorageReservation())
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    table = format_plan_memory(plan_memory(plan, model, world))  # before DMP swaps modules
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   plan=plan, sharders=[sharder], device=device)
    return dmp, table


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(dmp: nn.Module, batches: Iterator[Batch], device: torch.device) -> Dict[str, float]:
    dmp.eval()
    auroc = torchmetrics.classification.BinaryAUROC().to(device)
    logloss = torchmetrics.MeanMetric().to(device)
    for batch in in_step(batches):
        batch = batch.to(device)
        _, (_, logits, labels) = dmp(batch)
        probs = torch.sigmoid(logits.float())
        auroc.update(probs, labels.int())
        logloss.update(nn.functional.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), reduction="none"))
    dmp.train()
    return {"test_auc": float(auroc.compute()), "test_logloss": float(logloss.compute())}


# ---------------------------------------------------------------- checkpoints
def checkpoint_state(dmp: nn.Module, optimizer: CombinedOptimizer, progress: Dict[str, int]
                     ) -> Dict[str, Any]:
    return {"model": dmp.state_dict(), "optim": optimizer.state_dict(),
            "progress": {k: torch.tensor(v) for k, v in progress.items()}}


def save_checkpoint(path: str, dmp: nn.Module, optimizer: CombinedOptimizer,
                    progress: Dict[str, int]) -> None:
    dcp.save(checkpoint_state(dmp, optimizer, progress), checkpoint_id=path)


def load_checkpoint(path: str, dmp: nn.Module, optimizer: CombinedOptimizer) -> Dict[str, int]:
    optimizer.init_state()
    state = checkpoint_state(dmp, optimizer, {"step": 0, "epoch": 0})
    dcp.load(state, checkpoint_id=path)
    dmp.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    return {k: int(v) for k, v in state["progress"].items()}


# ---------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    rank, world, device = init_distributed()
    try:
        return train(args, rank, world, device)
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> Dict[str, Any]:
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    data = Data(args, rank, world)
    model, budget = build_model(args, data.sizes, data.dense_in)
    dmp, plan_table = shard_model(model, args, world, device)
    dense_opt = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adagrad(params, lr=args.lr))
    fused = [dmp.fused_optimizer] if isinstance(dmp, DistributedModelParallel) else []
    optimizer = CombinedOptimizer(fused + [dense_opt])
    pipeline = (TrainPipelineSparseDist(dmp, dense_opt, device)
                if isinstance(dmp, DistributedModelParallel)
                else TrainPipelineBase(dmp, dense_opt, device))
    progress = {"step": 0, "epoch": 0}
    if args.resume:
        if not args.checkpoint_dir or not os.path.isdir(args.checkpoint_dir):
            raise FileNotFoundError(f"--resume needs an existing --checkpoint-dir, got "
                                    f"{args.checkpoint_dir!r}")
        progress = load_checkpoint(args.checkpoint_dir, dmp, optimizer)
    schedule = ReclusterSchedule.from_epochs(
        data.steps_per_epoch or 1,
        [float(x) for x in args.recluster_at.split(",") if x],
        every_epoch=args.recluster_every_epoch if args.method == "cce" else 0,
        iters=args.kmeans_iters)
    writer = None
    if args.tensorboard_dir and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(args.tensorboard_dir)
    if rank == 0:
        print(f"world {world} on {device}; method {args.method}; "
              f"{budget['compressed_tables']} tables compressed to <= "
              f"{budget['max_params_per_table']} params\n{plan_table}", flush=True)

    losses: List[Tuple[int, float]] = []
    recluster_log: List[Dict[str, Any]] = []
    samples, train_seconds, recluster_seconds = 0, 0.0, 0.0
    for epoch in range(progress["epoch"], args.epochs):
        steps_left = None if args.max_steps is None else args.max_steps - progress["step"]
        if steps_left is not None and steps_left <= 0:
            break
        it = in_step(data.train_batches(), steps_left)
        bar = tqdm(total=data.steps_per_epoch, desc=f"epoch {epoch}",
                   disable=rank != 0 or args.no_progress, dynamic_ncols=True)
        t0 = time.perf_counter()
        epoch_samples = 0
        while True:
            try:
                loss, _, labels = pipeline.progress(it)
            except StopIteration:
                break
            progress["step"] += 1
            epoch_samples += labels.numel() * world
            value = float(loss)
            losses.append((progress["step"], value))
            if writer:
                writer.add_scalar("train/loss", value, progress["step"])
            bar.set_postfix(loss=f"{value:.4f}", samples_per_s=f"{epoch_samples / max(1e-9, time.perf_counter() - t0 - recluster_seconds):.0f}")
            bar.update(1)
            if schedule.due(progress["step"]):
                t_rc = time.perf_counter()
                stats = schedule.step(dmp, progress["step"], optimizers=[dense_opt])
                redo_pending_input_dist(pipeline)
                recluster_seconds += time.perf_counter() - t_rc
                recluster_log.append({"step": progress["step"], "tables": stats})
                if rank == 0:
                    secs = sum(s["seconds"] for s in stats.values())
                    bar.write(f"re-clustered {len(stats)} tables at step {progress['step']} "
                              f"in {secs:.2f} s")
        bar.close()
        pipeline.reset()
        train_seconds += time.perf_counter() - t0
        samples += epoch_samples
        progress["epoch"] = epoch + 1
        if args.checkpoint_dir:
            save_checkpoint(args.checkpoint_dir, dmp, optimizer, progress)

    if isinstance(pipeline, TrainPipelineSparseDist):
        pipeline.detach()  # restore the modules' own forward for evaluation
    metrics: Dict[str, Any] = evaluate(dmp, data.test_batches(), device)
    report = memory_report(dmp)
    totals = summarize(report)
    metrics.update({
        # Throughput of training steps; re-clustering time is reported on its own.
        "train_samples_per_s": samples / max(1e-9, train_seconds - recluster_seconds),
        "recluster_seconds": recluster_seconds,
        "embedding_params": totals["params"],
        "embedding_bytes": totals["compressed_bytes"],
        "full_embedding_bytes": totals["full_bytes"],
        "full_embedding_params": totals["full_params"],
        "assignment_bytes": totals["assignment_bytes"],
        "compression_ratio_params": totals["param_ratio"],
        "compression_ratio_bytes": totals["byte_ratio"],
        "bayes_logloss": data.bayes_logloss,
        "world_size": world,
        "method": args.method,
        "steps": progress["step"],
        "epochs": progress["epoch"],
        "train_loss_curve": losses,
        "reclusterings": recluster_log,
        "wall_seconds": time.perf_counter() - start,
        "args": vars(args),
    })
    if writer:
        writer.add_scalar("test/logloss", metrics["test_logloss"], progress["step"])
        writer.add_scalar("test/auc", metrics["test_auc"], progress["step"])
        writer.close()
    if rank == 0:
        print_summary(metrics)
        if args.metrics_json:
            os.makedirs(os.path.dirname(os.path.abspath(args.metrics_json)), exist_ok=True)
            with open(args.metrics_json, "w") as f:
                json.dump(metrics, f, indent=1)
        if args.loss_curve_png:
            plot_loss(losses, recluster_log, metrics, args.loss_curve_png)
    return metrics


def print_summary(m: Dict[str, Any]) -> None:
    mib = 1 << 20
    floor = "n/a" if m["bayes_logloss"] is None else f"{m['bayes_logloss']:.4f}"
    print(
        f"\n== {m['method']} on {m['world_size']} ranks, {m['steps']} steps ==\n"
        f"test log loss      {m['test_logloss']:.4f}   (Bayes floor {floor})\n"
        f"test AUC           {m['test_auc']:.4f}\n"
        f"train throughput   {m['train_samples_per_s']:.0f} samples/s\n"
        f"embedding memory   {m['full_embedding_bytes'] / mib:.2f} MiB full -> "
        f"{m['embedding_bytes'] / mib:.2f} MiB compressed "
        f"(incl. {m['assignment_bytes'] / mib:.2f} MiB CCE assignment)\n"
        f"compression        {m['compression_ratio_params']:.1f}x parameters, "
        f"{m['compression_ratio_bytes']:.1f}x bytes\n"
        f"re-clusterings     {len(m['reclusterings'])} ({m['recluster_seconds']:.1f} s)\n"
        f"wall time          {m['wall_seconds']:.1f} s", flush=True)


def plot_loss(losses: List[Tuple[int, float]], reclusters: List[Dict[str, Any]],
              metrics: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    window = max(1, len(values) // 20)
    smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
              for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, alpha=0.3, label="train loss (per step)")
    ax.plot(steps, smooth, label=f"train loss (mean of {window})")
    if metrics.get("bayes_logloss") is not None:
        ax.axhline(metrics["bayes_logloss"], color="k", ls="--", label="Bayes floor (test)")
    ax.axhline(metrics["test_logloss"], color="C3", ls=":", label="test log loss")
    for r in reclusters:
        ax.axvline(r["step"], color="C2", alpha=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("BCE")
    ax.set_title(f"DLRM + {metrics['method']} ({metrics['compression_ratio_params']:.0f}x fewer "
                 f"embedding params); green: re-clustering")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
