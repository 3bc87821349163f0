"""Whole training steps on the shared real datasets: every method's samples/s against the full
table's, at the quality grid's budgets, with re-clustering time reported apart.

    .venv/bin/python benchmarks/speed_real.py                          # frappe,movielens,yelp2018
    .venv/bin/python benchmarks/speed_real.py --datasets frappe --rounds 1 --budgets 16

(``benchmarks/speed.py --sections real`` runs the same.) Each cell is one
``examples/dlrm/train.py`` run of one epoch with the quality grid's recipe and flags
(``benchmarks/quality.py``: same data, batch size, learning rate, method flags, byte budget;
CCE with its default re-clusterings at 0.25 and 0.5 of the epoch), world size 1. Its metrics
give ``train_samples_per_s`` (training steps only: re-clustering and evaluation time are
measured apart, ``recluster_seconds``). Rounds are interleaved: round r runs every (budget,
method) cell of a dataset once, full first, and each ratio is taken against the full table's
run of the same round, so load on the machine hits a round's cells alike; reported are the
medians over rounds. Finished cells are skipped when run again (``--workdir``); results go to
``benchmarks/results/speed_real.json``.
"""

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402

ROOT = quality.ROOT
DEFAULT_METHODS = ["hashing", "ce", "qr_mult", "memcom", "cce", "mpe", "planner"]
OUT = os.path.join(ROOT, "benchmarks", "results", "speed_real.json")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="frappe,movielens,yelp2018")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--budgets", default="16,64", help="fractions of the full bytes (1/N)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per run")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "speed_real"))
    p.add_argument("--out", default=OUT)
    return p.parse_args(argv)


def _quality_args(args: argparse.Namespace) -> argparse.Namespace:
    """The quality grid's settings, one epoch per run (throughput, not quality)."""
    q = quality.parse_args(["--workdir", os.path.join(args.workdir, "quality")])
    q.epochs, q.patience = 1, 1
    q.max_steps = args.max_steps
    return q


def run_cell(dataset: str, method: str, fraction: Optional[int], rnd: int,
             data_args: List[str], full_bytes: int, q: argparse.Namespace,
             workdir: str) -> Dict:
    """One run's metrics (read back if it already finished; ``{"error": ...}`` if it failed)."""
    name = f"{dataset}__{method}__{'full' if fraction is None else f'1-{fraction}'}__r{rnd}"
    path = os.path.join(workdir, "cells", name + ".json")
    if not os.path.exists(path):
        budget = None if fraction is None else full_bytes // fraction
        quality.train_into(path, quality.cell_args(dataset, method, budget, 0, data_args, q,
                                                   full_recipe=False))
    with open(path) as f:
        return json.load(f)


def summarize(cells: Dict[str, Dict[str, Dict]], rounds: int) -> Dict[str, Dict]:
    """Per (budget, method): median samples/s, median ratio to the same round's full run,
    median re-clustering seconds."""
    out: Dict[str, Dict] = {}
    full = cells.get("full", {})
    for key, by_round in cells.items():
        ratios, speeds, recluster = [], [], []
        for r in range(rounds):
            m, f = by_round.get(str(r)), full.get(str(r))
            if not m or "error" in m:
                continue
            speeds.append(m["train_samples_per_s"])
            recluster.append(m.get("recluster_seconds", 0.0))
            if f and "error" not in f:
                ratios.append(m["train_samples_per_s"] / f["train_samples_per_s"])
        errors = sorted({m["error"] for m in by_round.values() if "error" in m})
        out[key] = {
            "rounds": len(speeds),
            "samples_per_s": statistics.median(speeds) if speeds else None,
            "ratio_to_full": statistics.median(ratios) if ratios else None,
            "ratios": ratios,
            "recluster_seconds": statistics.median(recluster) if recluster else None,
            "errors": errors,
        }
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    q = _quality_args(args)
    result: Dict = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
    methods = [m for m in args.methods.split(",") if m]
    fractions = [int(x) for x in args.budgets.split(",") if x]
    unknown = [d for d in args.datasets.split(",") if d not in quality.DATASETS]
    if unknown:
        raise SystemExit(f"speed_real: unknown dataset(s) {unknown}; pick from "
                         f"{sorted(quality.DATASETS)}")
    for dataset in args.datasets.split(","):
        try:
            data_args = quality.prepare(dataset, q)
        except FileNotFoundError as e:
            print(f"skipping {dataset}: {e}", file=sys.stderr)
            continue
        full_bytes = quality.full_embedding_bytes(data_args[-1], q.embedding_dim)
        cells: Dict[str, Dict[str, Dict]] = {}
        for rnd in range(args.rounds):
            order = [("full", None)] + [(m, f) for f in fractions for m in methods]
            for method, fraction in order:
                key = method if fraction is None else f"{method}@1/{fraction}"
                metrics = run_cell(dataset, method, fraction, rnd, data_args, full_bytes, q,
                                   args.workdir)
                cells.setdefault(key, {})[str(rnd)] = (
                    metrics if "error" in metrics else
                    {k: metrics[k] for k in ("train_samples_per_s", "recluster_seconds",
                                             "embedding_bytes", "steps")})
        rows = summarize(cells, args.rounds)
        result[dataset] = {"recipe": quality.recipe(dataset, q), "full_bytes": full_bytes,
                           "rows": rows, "cells": cells}
        print(f"\n{dataset} (median over {args.rounds} rounds, ratio to full in the same round)")
        for key, row in rows.items():
            if row["samples_per_s"] is None:
                print(f"  {key:<18} failed: {row['errors']}")
                continue
            ratio = "" if row["ratio_to_full"] is None else f"{row['ratio_to_full']:.2f}x"
            print(f"  {key:<18}{row['samples_per_s']:>10,.0f} samples/s {ratio:>7}"
                  f"  re-clustering {row['recluster_seconds']:.1f} s")
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
