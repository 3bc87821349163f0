"""Warm start vs training from scratch at 1/16 of the embedding bytes (issue 21, item 3).

    .venv/bin/python benchmarks/warm_start.py                      # Frappe, seeds 0,1,2
    .venv/bin/python benchmarks/warm_start.py --datasets frappe,movielens
    .venv/bin/python benchmarks/warm_start.py --report-only        # re-tabulate the JSON

Per dataset and seed (DLRM, embedding dim 16, one process, a plain training loop):

* ``full_1ep``: the uncompressed model trained 1 epoch;
* ``ptq``: its tables compressed with :func:`torchrec_cce.compress_trained` to 1/16 of the full
  tables' bytes (the CCE plan of :func:`torchrec_cce.plan_compression`, ``methods=["cce"]``,
  float32 codebooks; the dense part copied), evaluated without further training (the paper's
  post-training quantisation);
* ``warm``: ``ptq`` fine-tuned 1 epoch (fresh optimizers, same recipe);
* ``scratch``: the same compressed model trained from its hashed init for 2 epochs with the
  project's CCE re-clustering schedule (after 1/4 and 1/2 of epoch 1);
* ``full_2ep``: ``full_1ep``'s model trained a second epoch (fresh optimizers and warm-up, as
  ``warm`` has; a reference: what the second epoch buys uncompressed).

Metrics: test log loss and AUC at the best validation log loss, evaluated every quarter epoch
(``warm``'s evaluations include its start, i.e. ``ptq``). Recipe per dataset from
``benchmarks/quality.py``'s ``RECIPES`` (sparse lr, batch size), dense Adagrad at 0.05, both
with a 100-step linear warm-up; the sparse optimizer is TorchRec's ``RowWiseAdagrad`` (a
torch optimizer: no DMP needed). Output: ``benchmarks/results/warm_start.json`` and
``warm_start.md``. Data are preprocessed once into ``--workdir`` as the quality benchmark does.
"""

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torchmetrics
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from quality import DATASETS, RECIPES, ROOT  # noqa: E402  (the shared dataset definitions)

from torchrec_cce import (  # noqa: E402
    CCEConfig,
    CCEEmbeddingBagCollection,
    ReclusterSchedule,
    compress_trained,
    memory_report,
    plan_compression,
)
from torchrec_cce.data.preprocessed import PreprocessedDataset  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
ARMS = ("full_1ep", "ptq", "warm", "scratch", "full_2ep")
DENSE_LR, WARMUP_STEPS, EVALS_PER_EPOCH = 0.05, 100, 4


def prepare(dataset: str, workdir: str) -> str:
    out = os.path.join(workdir, "data", dataset)
    if not os.path.isfile(os.path.join(out, "meta.json")):
        cmd = [sys.executable, "-m", "torchrec_cce.data.preprocess", *DATASETS[dataset],
               "--out", out]
        print("preprocess:", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return out


class Splits:
    """Train/val/test batches of a preprocessed directory (a constant dense column when the
    data has none, as ``examples/dlrm/train.py`` does)."""

    def __init__(self, data_dir: str, batch_size: int, seed: int) -> None:
        self.sets = {s: PreprocessedDataset(data_dir, split=s, batch_size=batch_size,
                                            shuffle=s == "train", seed=seed)
                     for s in ("train", "val", "test")}
        train = self.sets["train"]
        self.dense_in = max(1, len(train.dense_names))
        self.tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=16, num_embeddings=int(v),
                                          feature_names=[f])
                       for f, v in zip(train.feature_names, train.vocab_sizes)]
        self.counts = {t.name: torch.from_numpy(train.counts(t.feature_names[0])).double()
                       for t in self.tables}
        self.steps_per_epoch = len(train)

    def batches(self, split: str, epoch: int = 0) -> Iterator[Batch]:
        ds = self.sets[split]
        ds.set_epoch(epoch)
        for b in ds:
            if not ds.dense_names:
                b = Batch(dense_features=torch.ones(b.labels.shape[0], 1),
                          sparse_features=b.sparse_features, labels=b.labels)
            yield b


def build_model(ebc: nn.Module, dense_in: int) -> DLRMTrain:
    return DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=dense_in,
                          dense_arch_layer_sizes=[64, 16], over_arch_layer_sizes=[64, 32, 1]))


@torch.no_grad()
def evaluate(model: DLRMTrain, batches: Iterator[Batch]) -> Dict[str, float]:
    model.eval()
    auroc, logloss = torchmetrics.classification.BinaryAUROC(), torchmetrics.MeanMetric()
    for batch in batches:
        _, (_, logits, labels) = model(batch)
        auroc.update(torch.sigmoid(logits.float()), labels.int())
        logloss.update(nn.functional.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), reduction="none"))
    model.train()
    return {"logloss": float(logloss.compute()), "auc": float(auroc.compute())}


def train(model: DLRMTrain, data: Splits, epochs: int, sparse_lr: float,
          schedule: Optional[ReclusterSchedule] = None, first_epoch: int = 0,
          evaluate_start: bool = False) -> Dict[str, object]:
    """``epochs`` epochs of the plain loop; returns every evaluation and the best one."""
    sparse = list(model.model.sparse_arch.parameters())
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    opts = [(RowWiseAdagrad(sparse, lr=sparse_lr), sparse_lr),
            (torch.optim.Adagrad(dense, lr=DENSE_LR), DENSE_LR)]
    every = max(1, data.steps_per_epoch // EVALS_PER_EPOCH)
    evals: List[Dict[str, float]] = []

    def record(step: int) -> None:
        v, t = evaluate(model, data.batches("val")), evaluate(model, data.batches("test"))
        evals.append({"step": step, "val_logloss": v["logloss"], "val_auc": v["auc"],
                      "test_logloss": t["logloss"], "test_auc": t["auc"]})

    if evaluate_start:
        record(0)
    step, start = 0, time.perf_counter()
    model.train()
    for epoch in range(first_epoch, first_epoch + epochs):
        for batch in data.batches("train", epoch):
            step += 1
            for opt, lr in opts:
                for g in opt.param_groups:
                    g["lr"] = lr * min(1.0, step / WARMUP_STEPS)
            loss, _ = model(batch)
            for opt, _ in opts:
                opt.zero_grad()
            loss.backward()
            for opt, _ in opts:
                opt.step()
            if schedule is not None:
                schedule.step(model, step, optimizers=[o for o, _ in opts])
            if step % every == 0:
                record(step)
    if not evals or evals[-1]["step"] != step:
        record(step)
    best = min(evals, key=lambda r: r["val_logloss"])
    return {"best": best, "evaluations": evals, "steps": step,
            "train_seconds": time.perf_counter() - start}


def cce_plan(data: Splits, fraction: int) -> Dict[str, CCEConfig]:
    full_bytes = sum(t.num_embeddings * t.embedding_dim * 4 for t in data.tables)
    plan = plan_compression(data.tables, full_bytes // fraction, counts=data.counts,
                            methods=["cce"], codebook_dtype=torch.float32,
                            assignment_share=0.25)
    # the project's CCE default init (train.py): QR pair, remainder kept after clustering
    return {n: dataclasses.replace(c, init="qr", keep_remainder=True) if isinstance(c, CCEConfig)
            else c for n, c in plan.compression.items()}


def embedding_bytes(model: nn.Module) -> int:
    return int(sum(r["compressed_bytes"] for r in memory_report(model).values()))


def run_seed(dataset: str, data_dir: str, seed: int, fraction: int,
             log: Callable[[str], None]) -> Dict[str, object]:
    recipe = RECIPES[dataset]
    lr = recipe["lr"]
    data = Splits(data_dir, int(recipe["batch_size"]), seed)
    compression = cce_plan(data, fraction)
    torch.manual_seed(seed)
    full = build_model(EmbeddingBagCollection(tables=copy.deepcopy(data.tables)), data.dense_in)
    out: Dict[str, object] = {"seed": seed}
    out["full_1ep"] = train(full, data, 1, lr)
    log(f"{dataset} seed {seed} full_1ep {out['full_1ep']['best']}")
    full_ebc = full.model.sparse_arch.embedding_bag_collection

    start = time.perf_counter()
    warm_ebc = compress_trained(full_ebc, compression, id_counts=data.counts)
    warm = copy.deepcopy(full)
    warm.model.sparse_arch.embedding_bag_collection = warm_ebc
    compress_seconds = time.perf_counter() - start
    warm_run = train(warm, data, 1, lr, first_epoch=1, evaluate_start=True)
    out["ptq"] = {"best": warm_run["evaluations"][0], "compress_seconds": compress_seconds}
    out["warm"] = warm_run
    log(f"{dataset} seed {seed} ptq {out['ptq']['best']}")
    log(f"{dataset} seed {seed} warm {out['warm']['best']}")

    torch.manual_seed(seed)
    scratch = build_model(CCEEmbeddingBagCollection(copy.deepcopy(data.tables), compression),
                          data.dense_in)
    schedule = ReclusterSchedule.from_epochs(data.steps_per_epoch, fractions=[0.25, 0.5])
    out["scratch"] = train(scratch, data, 2, lr, schedule=schedule)
    log(f"{dataset} seed {seed} scratch {out['scratch']['best']}")

    out["full_2ep"] = train(full, data, 1, lr, first_epoch=1)  # continues full_1ep's model
    log(f"{dataset} seed {seed} full_2ep {out['full_2ep']['best']}")
    out["bytes"] = {"full": embedding_bytes(CCEEmbeddingBagCollection(
        copy.deepcopy(data.tables))), "compressed": embedding_bytes(warm_ebc)}
    out["compression"] = {n: repr(c) for n, c in compression.items()}
    return out


def _ms(xs: List[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def report(results: Dict[str, List[Dict[str, object]]]) -> str:
    lines = ["# Warm start vs from scratch at 1/16 of the embedding bytes", "",
             "Generated by `benchmarks/warm_start.py` (see its docstring for the protocol). "
             "Test metrics at the best validation log loss, mean ± std over seeds.", ""]
    for dataset, runs in results.items():
        b = runs[0]["bytes"]
        lines += [f"## {dataset} ({len(runs)} seeds; embedding bytes {b['full']:,} full, "
                  f"{b['compressed']:,} compressed = 1/{b['full'] / b['compressed']:.1f})", "",
                  "| arm | epochs trained | test log loss | test AUC |", "|---|---|---|---|"]
        epochs = {"full_1ep": "1 (full)", "ptq": "1 (full) + 0", "warm": "1 (full) + 1",
                  "scratch": "2", "full_2ep": "2 (full)"}
        for arm in ARMS:
            ll = [r[arm]["best"]["test_logloss"] for r in runs]
            auc = [r[arm]["best"]["test_auc"] for r in runs]
            lines.append(f"| {arm} | {epochs[arm]} | {_ms(ll)} | {_ms(auc)} |")
        diff = [r["warm"]["best"]["test_logloss"] - r["scratch"]["best"]["test_logloss"]
                for r in runs]
        wins = sum(d < 0 for d in diff)
        lines += ["", f"warm - scratch test log loss: {_ms(diff)} (per seed "
                  f"{', '.join(f'{d:+.4f}' for d in diff)}): warm start lower in {wins} of "
                  f"{len(diff)} seeds.", "",
                  "Plan (`plan_compression(methods=['cce'])` at 1/16, float32 codebooks; "
                  "`assigned_ids` = ids with a stored assignment, the rest keep a hashed one):",
                  ""]
        lines += [f"- `{n}`: {c}" for n, c in runs[0]["compression"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="frappe")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fraction", type=int, default=16, help="budget = full bytes / this")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "quality"))
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    path = os.path.join(args.results, "warm_start.json")
    results: Dict[str, List[Dict[str, object]]] = {}
    if os.path.isfile(path):
        with open(path) as f:
            results = json.load(f)
    if not args.report_only:
        torch.set_num_threads(1)
        for dataset in args.datasets.split(","):
            data_dir = prepare(dataset, args.workdir)
            results[dataset] = [
                run_seed(dataset, data_dir, int(s), args.fraction,
                         lambda m: print(m, file=sys.stderr, flush=True))
                for s in args.seeds.split(",")]
            os.makedirs(args.results, exist_ok=True)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
    md = report(results)
    with open(os.path.join(args.results, "warm_start.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
