"""INT8/INT4 serving of a trained CCE model on a real dataset: bytes, error vs bound, log loss.

    .venv/bin/python benchmarks/serving.py                      # Frappe, 1/16 of the full bytes
    .venv/bin/python benchmarks/serving.py --fraction 4 --dtype int4

Trains ``examples/dlrm/train.py --method cce --serving-dtype <dtype> --embedding-budget-mb
<full / fraction>`` (one process, checkpointed), loads the last checkpoint into an unsharded
model, serves its codebooks as fbgemm INT-N rows (``torchrec_cce.serving.quantize_codebooks``)
and, over the whole test split, measures every pooled embedding element against the float
model's: the largest error, the documented bound (``sum_j |w_j| e_row_j`` plus fp32 slack,
:func:`torchrec_cce.serving.row_error_bound`; linear compositions only, which the CCE plan is),
the largest error/bound ratio (must be <= 1), and the test log loss of the served and float
models. Bytes are ``memory_report``'s of both. Results: ``benchmarks/results/serving_<dataset>.json``.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples", "dlrm"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from torchrec_cce import CCEEmbeddingBagCollection, QRConfig, memory_report  # noqa: E402
from torchrec_cce.serving import quantize_codebooks, row_error_bound  # noqa: E402

DTYPES = {"int8": torch.int8, "int4": torch.quint4x2}


def _bound_modules(ebc: CCEEmbeddingBagCollection, dtype: torch.dtype):
    """Copies of ``ebc`` whose codebook rows are each row's error bound / absolute values."""
    err, absolute = copy.deepcopy(ebc), copy.deepcopy(ebc)
    with torch.no_grad():
        for name, bag in ebc.codebooks.embedding_bags.items():
            w = bag.weight.detach()
            err.codebooks.embedding_bags[name].weight.copy_(
                row_error_bound(w, dtype).unsqueeze(1).expand_as(w))
            absolute.codebooks.embedding_bags[name].weight.copy_(w.abs())
    return err, absolute


def main() -> None:
    import train as T  # examples/dlrm/train.py

    from quality import DATASETS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="frappe")
    p.add_argument("--fraction", type=float, default=16, help="budget = full bytes / this")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="int8")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "serving"))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dtype = DTYPES[a.dtype]
    data_dir = os.path.join(a.workdir, "data", a.dataset)
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        subprocess.run([sys.executable, "-m", "torchrec_cce.data.preprocess", *DATASETS[a.dataset],
                        "--no-progress", "--out", data_dir], cwd=ROOT, check=True)
    base = ["--data", "preprocessed", "--data-dir", data_dir, "--method", "cce",
            "--serving-dtype", a.dtype, "--epochs", str(a.epochs), "--no-progress"]
    probe = T.parse_args(base + ["--embedding-budget-mb", "1"])
    tables = T.table_configs(T.load_data(probe, 0, 1), probe.embedding_dim)
    full = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)  # fp32 full tables
    args_list = base + ["--embedding-budget-mb", str(full / a.fraction / 2**20)]
    with tempfile.TemporaryDirectory() as tmp:
        ck, metrics_path = os.path.join(tmp, "ck"), os.path.join(tmp, "m.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        subprocess.run([sys.executable, os.path.join(ROOT, "examples", "dlrm", "train.py"),
                        *args_list, "--checkpoint-dir", ck, "--keep-checkpoints", "1",
                        "--metrics-json", metrics_path], cwd=ROOT, check=True, env=env)
        with open(metrics_path) as f:
            metrics = json.load(f)
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        last = sorted(d for d in os.listdir(ck) if d.startswith("step_"))[-1]
        dcp_to_torch_save(os.path.join(ck, last), os.path.join(tmp, "ck.pt"))
        state = torch.load(os.path.join(tmp, "ck.pt"), weights_only=False)["model"]
    args = T.parse_args(args_list)
    data = T.load_data(args, 0, 1)
    model, budget = T.build_model(args, data)
    if any(isinstance(c, QRConfig) for c in budget["compression"].values()):
        raise ValueError("this benchmark's bound covers linear compositions; the plan has QR")
    ebc = CCEEmbeddingBagCollection(budget["table_configs"], budget["compression"])
    model.model.sparse_arch.embedding_bag_collection = ebc
    model.load_state_dict(state)
    model.eval()
    served = quantize_codebooks(ebc, dtype)
    err_module, abs_module = _bound_modules(ebc, dtype)
    worst = {"max_abs_error": 0.0, "max_bound": 0.0, "max_error_over_bound": 0.0}
    total_err, count = 0.0, 0
    loss = {"float": [], "served": []}
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        for batch in data.test():
            kjt = batch.sparse_features
            out, q = ebc(kjt).values(), served(kjt).values()
            slack = 32 * 2.0 ** -23 * abs_module(kjt).values()  # <= 32 rows pooled per element
            bound = err_module(kjt).values() + slack
            err = (q - out).abs()
            worst["max_abs_error"] = max(worst["max_abs_error"], float(err.max()))
            worst["max_bound"] = max(worst["max_bound"], float(bound.max()))
            worst["max_error_over_bound"] = max(worst["max_error_over_bound"],
                                                float((err / bound.clamp(min=1e-30)).max()))
            total_err += float(err.sum())
            count += err.numel()
            for kind, module in (("float", ebc), ("served", served)):
                model.model.sparse_arch.embedding_bag_collection = module
                _, (_, logits, labels) = model(batch)
                loss[kind].append(bce(logits.float(), labels.float(), reduction="none"))
    model.model.sparse_arch.embedding_bag_collection = ebc
    float_report, served_report = memory_report(ebc), memory_report(served)
    result = {
        "dataset": a.dataset, "dtype": a.dtype, "budget_fraction": a.fraction,
        "train_args": args_list, "checkpoint": last,
        "float_bytes": sum(r["compressed_bytes"] for r in float_report.values()),
        "serving_bytes": sum(r["compressed_bytes"] for r in served_report.values()),
        "full_bytes": sum(r["full_bytes"] for r in float_report.values()),
        "serving_bytes_per_table": {n: r["compressed_bytes"] for n, r in served_report.items()},
        **worst, "mean_abs_error": total_err / max(1, count),
        "test_logloss_float": float(torch.cat(loss["float"]).mean()),
        "test_logloss_served": float(torch.cat(loss["served"]).mean()),
        "train_metrics": {k: metrics[k] for k in ("test_logloss", "test_auc", "best_epoch",
                                                   "embedding_bytes", "embedding_training_bytes")},
    }
    out = a.out or os.path.join(ROOT, "benchmarks", "results", f"serving_{a.dataset}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "train_args"}, indent=1))


if __name__ == "__main__":
    main()
