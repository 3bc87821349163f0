"""DLRM with compressed embedding tables: the one training script every launcher runs.

    torchx run launch/components.py:dlrm -j 1x2 -- --data synthetic --method cce --epochs 1
    torchrun --nproc_per_node 2 examples/dlrm/train.py --data synthetic --method cce
    python -m torchrec_cce.data.preprocess --format csv --input my.csv ... --out my_data
    python examples/dlrm/train.py --data preprocessed --data-dir my_data --method full --epochs 5

Flags: ``examples/dlrm/flags.py`` (``--help``). Reads RANK / WORLD_SIZE / LOCAL_RANK (torchrun,
TorchX); a plain ``python`` run is a world of one. Backend: ``$TORCHREC_CCE_BACKEND``, else NCCL with CUDA, else gloo.

Pipeline: data (torchrec_cce.data.sources) -> TorchRec DLRM over a CCEEmbeddingBagCollection
-> planner with the CCE storage reservation + DMP with the CCE sharder (torchrec_cce.train) ->
sparse optimizer in backward + dense optimizer with warm-up -> TrainPipelineSparseDist;
re-clustering and MPE's stages run as hooks after the steps.

Protocol (train.evaluation): the validation split is evaluated at the end of every epoch (and
every ``--eval-every`` steps); each evaluation also evaluates the test split on the same model
state, and the reported ``test_logloss``/``test_auc`` are those of the evaluation with the
lowest validation log loss (``best_epoch``/``best_step``). ``--patience N`` stops after N
evaluations without a new best. The learning rates warm up linearly over ``--warmup-steps``.
"""

import argparse
import itertools
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))  # the repo's torchrec_cce
if HERE not in sys.path:  # flags.py beside this file, also when run via runpy or imported
    sys.path.insert(0, HERE)

from torchrec_cce import CCEEmbeddingBagCollection, with_id_bias  # noqa: E402
from torchrec_cce.checkpoint import guard_loss  # noqa: E402
from torchrec_cce.data.sources import load_data, table_configs, table_counts  # noqa: E402
from torchrec_cce.train import (  # noqa: E402
    MigrationHook, MPEDLRMTrain, MPEHook, Optimizers, Protocol, ReclusterHook,
    apply_sparse_optimizer, default_warmup_steps, dense_optimizer, evaluate_val_test, in_step, init_distributed,
    make_pipeline, regularize_pooled, shard, training_hooks)
from torchrec_cce.train.checkpoint import (  # noqa: E402
    checkpoint_manager, inject_fault, load_checkpoint, save_checkpoint)
from torchrec_cce.train.defaults import (  # noqa: E402
    apply_cce_settings, cce_settings, has_cce, id_bias_ids, make_compression,
    planned_compression, recluster_fractions, replicate_below, serving_dtype)
from torchrec_cce.train.plan_select import select_plan  # noqa: E402
from torchrec_cce.train.report import (  # noqa: E402
    plot_loss, print_summary, quiet_known_warnings, run_metrics, write_metrics)

# ---------------------------------------------------------------- config: flags.py
from flags import parse_args  # noqa: E402  (the flag table and its checks)


# ---------------------------------------------------------------- model
def build_model(args: argparse.Namespace, data: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """TorchRec's DLRM (or DLRM_DCN) over a CCEEmbeddingBagCollection built on the meta device
    (DMP materialises it), with the compression of --method or of the budget planner."""
    dim = args.embedding_dim
    tables = table_configs(data, dim)
    counts = table_counts(data, tables)
    plan, candidates, cap = None, 1, None
    if args.embedding_budget_mb is not None:  # the byte-budget planner (torchrec_cce.budget)
        compression, plan, candidates, args.method = planned_compression(
            tables, args, counts, args.plan_candidate)
    else:
        compression, cap = make_compression(tables, args, counts)
    compression = apply_cce_settings(compression, args)
    ebc = CCEEmbeddingBagCollection(tables, compression, device=torch.device("meta"))
    dense = [int(x) for x in args.dense_arch.split(",")]
    over = [int(x) for x in args.over_arch.split(",")]
    if dense[-1] != dim:
        raise ValueError(f"--dense-arch must end with the embedding dim {dim}, got {dense}")
    common = dict(embedding_bag_collection=ebc, dense_in_features=data.dense_in,
                  dense_arch_layer_sizes=dense, over_arch_layer_sizes=over,
                  dense_device=torch.device("cpu"))
    dlrm = (DLRM_DCN(**common, dcn_num_layers=args.dcn_layers, dcn_low_rank_dim=args.dcn_low_rank)
            if args.dcn else DLRM(**common))
    regularize_pooled(dlrm, gain=args.embedding_gain, l2=args.embedding_l2,
                      dropout=args.embedding_dropout)
    id_bias = id_bias_ids(tables, args, counts)  # --id-bias: a per-id first-order term
    dlrm = with_id_bias(dlrm, tables, id_bias)
    model = MPEDLRMTrain(dlrm) if args.method == "mpe" else DLRMTrain(dlrm)
    return model, {"max_params_per_table": cap, "compressed_tables": len(compression),
                   "has_cce": has_cce(compression),
                   # an all-MPE collection has no codebook EBC: no sparse-dist pipeline
                   "all_mpe": args.method == "mpe" and len(compression) == len(tables),
                   "tables": {t.name: t.num_embeddings for t in tables}, "plan": plan,
                   "plan_candidates": candidates, "table_configs": tables,
                   "compression": compression, "counts": counts, "id_bias": id_bias}


# ---------------------------------------------------------------- one training run
def train_run(args: argparse.Namespace, rank: int, world: int, device: torch.device
              ) -> Tuple[Dict[str, Any], Tuple[Any, Any]]:
    """Train one model; returns its metrics and (loss curve, re-clusterings) for the plot."""
    start = time.perf_counter()

    def say(text: str) -> None:
        if rank == 0:
            tqdm.write(text)

    # -- setup: data, model, sharding, optimizers, pipeline, hooks, checkpoint
    torch.manual_seed(args.seed)
    data = load_data(args, rank, world)
    model, budget = build_model(args, data)
    if args.warmup_steps is None:  # scaled to the run's length
        steps = args.epochs * (data.steps_per_epoch or 1)
        args.warmup_steps = default_warmup_steps(min(steps, args.max_steps or steps))
    apply_sparse_optimizer(model.model.sparse_arch, args.sparse_optimizer, args.lr)
    dmp, plan_table = shard(model, world, device, args.batch_size,
                            whole_rows=args.serving_dtype is not None,
                            replicate_assignment_below=replicate_below(args))
    optim = Optimizers(dmp, dense_optimizer(args.dense_optimizer, args.dense_lr),
                       dense_lr=args.dense_lr, sparse_lr=args.lr, warmup_steps=args.warmup_steps)
    pipeline = make_pipeline(dmp, optim.dense, device, sparse_dist=not budget["all_mpe"])
    cs = cce_settings(args)
    hooks = training_hooks(dmp, data.steps_per_epoch or 1, recluster_at=recluster_fractions(cs),
                           recluster_every_epoch=cs["recluster_every_epoch"],
                           kmeans_iters=cs["kmeans_iters"], mpe_search_steps=args.mpe_search_steps,
                           mpe_warmup_steps=args.mpe_warmup_steps,
                           optimizers=[optim.dense])  # re-clustering (CCE tables), MPE's stages
    recluster, mpe = hooks.of_type(ReclusterHook), hooks.of_type(MPEHook)
    migration = hooks.of_type(MigrationHook)  # online hot tiers (--hot-set online)
    protocol = Protocol(args.patience)
    checkpoints = checkpoint_manager(args, budget["max_params_per_table"], budget["tables"], say)
    progress = {"step": 0, "epoch": 0, "step_in_epoch": 0}
    resumed_from = last_checkpoint = None
    if args.resume:  # the newest usable checkpoint, if there is one
        resumed = load_checkpoint(checkpoints, dmp, optim.combined, protocol)
        if resumed is not None:
            progress, resumed_from, last_checkpoint = resumed
    writer = bar = None
    if args.tensorboard_dir and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(args.tensorboard_dir)
    limit = (f"<= {budget['max_params_per_table']} params" if budget["plan"] is None
             else f"fit {args.embedding_budget_mb} MiB:\n{budget['plan'].format()}")
    say(f"world {world} on {device}; method {args.method}; {len(budget['tables'])} tables, "
        f"{budget['compressed_tables']} compressed to {limit}\n{plan_table}")
    for note in data.notes:
        say(note)
    losses: List[Tuple[int, float]] = []
    samples, eval_seconds = 0, 0.0

    def evaluation(epoch: int) -> None:
        nonlocal eval_seconds
        if hasattr(pipeline, "detach"):
            pipeline.detach()  # the modules' own forward; progress() re-attaches
        t0 = time.perf_counter()
        record = {"epoch": epoch, "step": progress["step"], **evaluate_val_test(
            dmp, data.val, data.test, device, serving_dtype(args))}
        best = protocol.add(record)
        eval_seconds += time.perf_counter() - t0
        for k in ("val_logloss", "val_auc", "test_logloss", "test_auc") if writer else ():
            writer.add_scalar(k.replace("_", "/", 1), record[k], record["step"])
        say(f"eval epoch {epoch} step {record['step']}: val log loss {record['val_logloss']:.4f} "
            f"AUC {record['val_auc']:.4f}{'  (best)' if best else ''}")

    def checkpoint() -> None:
        nonlocal last_checkpoint
        last_checkpoint = save_checkpoint(checkpoints, dmp, optim.combined, progress,
                                          protocol) or last_checkpoint

    def report_collisions() -> None:
        line = data.collisions.report()  # collective
        if line:
            say(line)

    def train_steps(batches: Any) -> int:
        """Train until ``batches`` run out; the pipeline is drained and reset at the end."""
        nonlocal samples
        n = 0
        while True:
            optim.before_step(progress["step"] + 1)  # warm-up
            try:
                loss, _, labels = pipeline.progress(batches)
            except StopIteration:
                break
            n += 1
            step = progress["step"] = progress["step"] + 1
            progress["step_in_epoch"] += 1
            guard_loss(loss, step, dmp, last_checkpoint)  # NaN/inf: stop, nothing saved
            inject_fault(step, rank, world)
            samples += labels.numel() * world
            losses.append((step, float(loss)))
            if writer:
                writer.add_scalar("train/loss", losses[-1][1], step)
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
                bar.update(1)
            if data.collisions is not None and step == 100 and progress["epoch"] == 0:
                report_collisions()
            for line in hooks.after_step(step):  # re-clustering, MPE stages
                say(line)
        pipeline.reset()
        return n

    # -- the loop: epochs of segments that end at evaluation and checkpoint steps
    t0 = time.perf_counter()
    every = [n for n in (args.eval_every, args.checkpoint_every) if n]
    keep_going = not protocol.should_stop
    for epoch in range(progress["epoch"], args.epochs):
        if not keep_going or (args.max_steps is not None and progress["step"] >= args.max_steps):
            break
        steps_left = None if args.max_steps is None else args.max_steps - progress["step"]
        done = progress["step_in_epoch"]  # > 0: resumed mid-epoch, these batches are trained
        source = data.train(epoch)
        batches = in_step(itertools.islice(source, done, None) if done else source, steps_left)
        bar = tqdm(total=data.steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}",
                   leave=False, disable=rank != 0 or args.no_progress, dynamic_ncols=True)
        bar = None if bar.disable else bar
        while True:
            segment = min((n - progress["step"] % n for n in every), default=None)
            ran = train_steps(itertools.islice(batches, segment) if segment else batches)
            if segment is None or ran < segment:
                break  # this epoch's data (or --max-steps) ran out
            step = progress["step"]
            if args.eval_every and step % args.eval_every == 0:
                evaluation(epoch + 1)
                if protocol.should_stop:
                    break
            if (args.checkpoint_every and step % args.checkpoint_every == 0
                    and progress["step_in_epoch"] != data.steps_per_epoch):  # (epoch end follows)
                checkpoint()
        if bar is not None:
            bar.close()
            bar = None
        if data.collisions is not None:  # the first epoch's check (or a resumed run's first)
            report_collisions()
            data.collisions.stop()
        hit_max = args.max_steps is not None and progress["step"] >= args.max_steps
        if not (hit_max and progress["step_in_epoch"] != data.steps_per_epoch):
            # the epoch's data ran out (--max-steps mid-epoch keeps the position for a resume)
            progress.update(epoch=epoch + 1, step_in_epoch=0)
        if protocol.last_step() != progress["step"]:
            evaluation(epoch + 1)
        checkpoint()
        keep_going = not (protocol.should_stop or hit_max)
    train_seconds = time.perf_counter() - t0
    if protocol.last_step() != progress["step"] or not protocol.evaluations:
        evaluation(progress["epoch"])  # e.g. resumed past the last epoch
    if hasattr(pipeline, "detach"):
        pipeline.detach()  # leave the modules' own forward for the caller

    # -- report
    collisions = data.collisions
    metrics = run_metrics(
        model=dmp, protocol=protocol, method=args.method, world=world, progress=progress,
        samples=samples, train_seconds=train_seconds, recluster_seconds=recluster.seconds
        if recluster else 0.0, eval_seconds=eval_seconds, start=start,
        table_configs=budget["table_configs"], compression=budget["compression"],
        counts=budget["counts"],
        plan=budget["plan"], plan_candidates=budget["plan_candidates"],
        serving_dtype=serving_dtype(args), losses=losses,
        reclusterings=recluster.log if recluster else [],
        mpe=mpe.log if mpe else [], migrations=migration.log if migration else [],
        colliding_features=[n for n, c in zip(collisions.names, collisions.reported) if c]
        if collisions is not None else [],
        bayes_logloss=data.bayes_logloss, resumed_from=resumed_from,
        last_checkpoint=last_checkpoint, args=vars(args),
        cce_settings=dict(cs, recluster_steps=recluster.schedule.at_steps)
        if budget["has_cce"] else None)
    if writer:
        writer.close()
    return metrics, (losses, metrics["reclusterings"])


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    quiet_known_warnings()
    rank, world, device = init_distributed()
    try:
        if args.plan_select == "validation":  # one run per candidate plan, lowest val loss kept
            def candidate(i: int, overrides: Optional[Dict[str, Any]] = None
                          ) -> Tuple[Dict[str, Any], Tuple[Any, Any]]:
                run_args = argparse.Namespace(**{**vars(args), "plan_candidate": i,
                                                 **(overrides or {})})
                if args.tensorboard_dir:
                    run_args.tensorboard_dir = os.path.join(args.tensorboard_dir, "".join(
                        [f"candidate{i}", *(f"_{k}{v}" for k, v in (overrides or {}).items())]))
                return train_run(run_args, rank, world, device)

            log = (lambda text: print(text, flush=True)) if rank == 0 else (lambda text: None)
            metrics, curves = select_plan(  # then the best plan with --plan-select-id-bias
                candidate, log, variants=[{"id_bias": s} for s in args.plan_select_id_bias],
                train_variant=candidate)
        else:
            metrics, curves = train_run(args, rank, world, device)
        if rank == 0:
            print_summary(metrics)
            if args.metrics_json:
                write_metrics(metrics, args.metrics_json)
            if args.loss_curve_png:
                plot_loss(*curves, metrics, args.loss_curve_png)
        return metrics
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
