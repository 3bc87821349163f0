"""Re-clustering time of CCE tables: one table per (ids, rows) cell, or Criteo Kaggle's whole
vocabulary at the planner's rows. Resumable: finished cells are skipped.

    .venv/bin/python benchmarks/recluster.py                                   # the grid below
    .venv/bin/python benchmarks/recluster.py --ids 10000000 --rows 131072
    .venv/bin/python benchmarks/recluster.py --ids 1000000 --rows 8192 --seeding old,new
    .venv/bin/python benchmarks/recluster.py --kaggle --budget-mb 64          # 26 tables
    .venv/bin/python benchmarks/recluster.py --kaggle --warm                  # second re-clusterings

A cell: one table, dim 16, 4 chunks, random normal codebooks (every id has a distinct old
vector), a full reservoir (``min(256 rows, 2^21)`` Zipf-skewed samples), ``--iters`` Lloyd
iterations per chunk, one process, ``--threads`` threads. ``--seeding``: ``new`` is the
library default (``kmeans(init="auto")``: k-means++ up to 2048 rows, k-means|| above),
``old`` forces exact k-means++ at every size (the seeding before k-means||), so both can be
timed side by side in one run at a size where the old one finishes; ``before`` also re-scores
the float32 near-ties against all k centroids (``CentroidIndex._exact``, the search before the
box-pruned re-scoring): the code before k-means|| in both respects.

``--kaggle``: Criteo Kaggle's 26 cardinalities (33.8M ids) planned by
:func:`torchrec_cce.plan_compression` (``methods=["cce"]``, ``--budget-mb``, as
``train.py --method cce --embedding-budget-mb``); each CCE table is one cell (re-clustering
re-assigns its covered ids ``[0, assigned_ids)``); the total is the sum over tables.

``--warm``: each cell re-clusters its table twice and times the second one with k-means
started from the first one's centroids (``clustering.recluster.WARM_START``, off by default:
see benchmarks/README.md; no training in between, so the vectors moved only by the first
re-clustering). ``--label``
appends to the cell keys, so a code version's cells sit apart from earlier results.

Every cell records wall and process-CPU seconds, the phases (``phases_seconds``: sampling and
old vectors, k-means of all chunks, the all-ids pass split into reading ``p``, hashing,
gathering, nearest-centroid search, residual sums, writing ``p``), k-means inertia at the
start (the seeding's) and at the last assignment pass (since re-clustering skips k-means' final
pass, 2026-12-07: the inertia before the last update, an upper bound of the final one), the
peak RSS over the process's RSS before the cell (``peak_rss_delta_bytes``, ``VmHWM`` reset with
``/proc/self/clear_refs``; heap that earlier cells of the same process freed and glibc kept can
hide part of a later cell's rise) beside ``recluster_workspace_bytes``' estimate, and the
1-minute load average before and after (the machine is shared: compare cells of one run, not
across runs). ``--repeats`` runs a cell several times;
the JSON keeps every run and the median. Results: ``benchmarks/results/recluster.json``.
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from torchrec import EmbeddingBagConfig  # noqa: E402

from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection, plan_compression  # noqa: E402
from torchrec_cce.clustering import kmeans as kmeans_module  # noqa: E402
from torchrec_cce.clustering import native  # noqa: E402
from torchrec_cce.clustering import recluster as recluster_module  # noqa: E402
from torchrec_cce.clustering.recluster import ReclusterState, recluster_table  # noqa: E402
from torchrec_cce.data.criteo import CRITEO_KAGGLE_CARDINALITIES  # noqa: E402

CHUNKS, DIM = 4, 16
RESULTS = os.path.join(ROOT, "benchmarks", "results", "recluster.json")
# label -> (largest k seeded by exact k-means++, near-ties re-scored through the boxes)
SEEDINGS = {"new": (kmeans_module.AUTO_KMEANSPP_MAX_K, True), "old": (1 << 62, True),
            "before": (1 << 62, False)}
_EXACT_GROUPED = kmeans_module.CentroidIndex._exact_grouped


def _exact_all(index, x, near):  # the O(k)-per-row float64 re-scoring of near-ties
    return index._exact(x)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_table(config: CCEConfig, num_ids: int, iters: int, seeding: str,
              warm: bool = False) -> dict:
    """Re-cluster one freshly built CCE table once; its timings and statistics. ``warm``:
    re-cluster it first (untimed but recorded as ``first_*``), write the new codebooks, then
    time a second re-clustering (k-means starts from the first one's centroids)."""
    t = [EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=num_ids,
                            feature_names=["f"])]
    ebc = CCEEmbeddingBagCollection(t, {"t": config})
    m = ebc.tables["t"]
    with torch.no_grad():  # random codebooks: every id gets a distinct old vector
        g = torch.Generator().manual_seed(0)
        for cb in m.codebooks:
            w = ebc.codebooks.embedding_bags[f"t__{cb.suffix}"].weight
            w.copy_(torch.randn(w.shape, generator=g))
        wa, wb = m.stack_ab(lambda suffix: ebc.codebooks.embedding_bags[f"t__{suffix}"].weight)
    m.reservoir.observe((torch.rand(m.reservoir.capacity, generator=g) ** 4 * num_ids).long())
    first = None
    if warm:
        start, cpu = time.perf_counter(), time.process_time()
        new_a, new_b, _ = recluster_table(
            ReclusterState(m, wa, wb, m.assignment, 0, (0, m.assigned_ids)), None, iters)
        first = (round(time.perf_counter() - start, 2), round(time.process_time() - cpu, 2))
        with torch.no_grad():
            for suffix, w in m.unstack_ab(new_a, new_b).items():
                ebc.codebooks.embedding_bags[f"t__{suffix}"].weight.copy_(w)
            wa, wb = m.stack_ab(lambda suffix: ebc.codebooks.embedding_bags[f"t__{suffix}"].weight)
    before = kmeans_module.AUTO_KMEANSPP_MAX_K
    kmeans_module.AUTO_KMEANSPP_MAX_K, grouped_ties = SEEDINGS[seeding]
    kmeans_module.CentroidIndex._exact_grouped = _EXACT_GROUPED if grouped_ties else _exact_all
    load = os.getloadavg()[0]
    rss_reset = _reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    recluster_module.WARM_START = warm
    try:
        _, _, stats = recluster_table(
            ReclusterState(m, wa, wb, m.assignment, 0, (0, m.assigned_ids)), None, iters)
    finally:
        recluster_module.WARM_START = False
        kmeans_module.AUTO_KMEANSPP_MAX_K = before
        kmeans_module.CentroidIndex._exact_grouped = _EXACT_GROUPED
    seconds = time.perf_counter() - start
    peak_delta = (_status_kib("VmHWM") - rss_before) * 1024 if rss_reset else None
    extra = {} if first is None else {"first_seconds": first[0], "first_cpu_seconds": first[1]}
    return {"seconds": round(seconds, 2), "cpu_seconds": round(time.process_time() - cpu, 2),
            **extra, "warm_start": stats["warm_start"],
            "kmeans_iters_run": stats["kmeans_iters_run"],
            "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
            "peak_rss_delta_bytes": peak_delta,
            "workspace_estimate_bytes": recluster_module.recluster_workspace_bytes(m),
            "num_samples": stats["num_samples"],
            "num_distinct_samples": stats["num_distinct_samples"],
            "kmeans_inertia_start": round(stats["kmeans_inertia_start"], 1),
            "kmeans_inertia_end": round(stats["kmeans_inertia_end"], 1),
            "phases_seconds": {k[: -len("_seconds")]: round(v, 2) for k, v in stats.items()
                               if k.endswith("_seconds") and not k.endswith("_cpu_seconds")
                               and k not in ("kmeans_seconds", "seconds")}}


def _load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _save(path: str, result: dict) -> None:
    """Write ``result`` over the file's current content, section by section (another run
    writing other sections of the same file meanwhile keeps them)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    on_disk = _load(path)
    for key, value in result.items():
        if isinstance(value, dict) and isinstance(on_disk.get(key), dict):
            on_disk[key].update(value)
        else:
            on_disk[key] = value
    result = on_disk
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def _cell(result: dict, section: str, key: str, make: dict, repeats: int, path: str,
          run) -> dict:
    """Run (or resume) one cell: ``repeats`` runs, the median seconds; saved after each run."""
    cells = result.setdefault(section, {})
    cell = cells.setdefault(key, dict(make, runs=[]))
    while len(cell["runs"]) < repeats:
        row = run()
        cell["runs"].append(row)
        cell["median_seconds"] = statistics.median(r["seconds"] for r in cell["runs"])
        _save(path, result)
        print(json.dumps({"cell": key, **row}), flush=True)
    return cell


def grid(args: argparse.Namespace, result: dict) -> None:
    for num_ids in (int(v) for v in args.ids.split(",")):
        for rows in (int(v) for v in args.rows.split(",")):
            for seeding in args.seeding.split(","):
                key = (f"ids={num_ids},rows={rows},seeding={seeding},iters={args.iters}"
                       f"{',warm' if args.warm else ''}{args.label}")
                _cell(result, "cells", key, dict(num_ids=num_ids, rows=rows, seeding=seeding,
                                                  iters=args.iters), args.repeats, args.out,
                      lambda: run_table(CCEConfig(rows=rows, chunks=CHUNKS), num_ids,
                                        args.iters, seeding, args.warm))


def kaggle(args: argparse.Namespace, result: dict) -> None:
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=c,
                                 feature_names=[f"f{i}"])
              for i, c in enumerate(CRITEO_KAGGLE_CARDINALITIES)]
    plan = plan_compression(tables, int(args.budget_mb * 2**20), methods=["cce"],
                            chunks=CHUNKS)
    section = (f"kaggle_budget_mb={args.budget_mb:g},seeding={args.seeding},iters={args.iters}"
               f"{',warm' if args.warm else ''}{args.label}")
    todo = [(t, plan.compression[t.name]) for t in tables
            if isinstance(plan.compression.get(t.name), CCEConfig)]
    todo.sort(key=lambda tc: tc[0].num_embeddings)  # small tables first: early, cheap cells
    for t, config in todo:
        _cell(result, section, t.name,
              dict(num_ids=t.num_embeddings, rows=config.rows,
                   assigned_ids=config.assigned_ids or t.num_embeddings),
              args.repeats, args.out,
              lambda: run_table(config, t.num_embeddings, args.iters, args.seeding, args.warm))
    cells = result[section]
    done = [c for c in cells.values() if c["runs"]]
    result.setdefault("kaggle_totals", {})[section] = {
        "tables": len(todo), "finished": len(done),
        "total_ids": sum(t.num_embeddings for t in tables),
        "assigned_ids": sum(c["assigned_ids"] for c in done),
        "total_median_seconds": round(sum(c["median_seconds"] for c in done), 2),
        "total_cpu_seconds": round(sum(statistics.median(r["cpu_seconds"] for r in c["runs"])
                                       for c in done), 2),
        "max_rows": max(c["rows"] for c in done) if done else None}
    _save(args.out, result)
    print(json.dumps(result["kaggle_totals"][section]), flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ids", default="100000,1000000,10000000", help="table sizes (grid)")
    p.add_argument("--rows", default="4096", help="CCE rows = k (grid)")
    p.add_argument("--seeding", default="new", help="comma list of new,old,before (grid); "
                   "one of them with --kaggle")
    p.add_argument("--kaggle", action="store_true",
                   help="every CCE table of Criteo Kaggle's vocabulary at the planner's rows")
    p.add_argument("--budget-mb", type=float, default=64.0, help="with --kaggle")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--warm", action="store_true",
                   help="time a table's second re-clustering (k-means warm-started from the "
                   "first one's centroids), not its first")
    p.add_argument("--label", default="", help="appended to the cell / section keys (e.g. "
                   "',kernel=2026-12': a code version measured apart from earlier results)")
    args = p.parse_args(argv)
    for s in args.seeding.split(","):
        if s not in SEEDINGS:
            p.error(f"--seeding: {s!r} is not one of {sorted(SEEDINGS)}")
    torch.set_num_threads(args.threads)
    result = _load(args.out)
    result["meta"] = {"chunks": CHUNKS, "dim": DIM, "threads": args.threads,
                      "native_kernel": native.available(),
                      "grouped_kernel": native.grouped_supported(),
                      "cpus": os.cpu_count(),
                      "note": ("shared 2-core VM: loadavg_1min before/after each run; compare "
                               "cells of one run side by side, quote medians")}
    if args.kaggle:
        kaggle(args, result)
    else:
        grid(args, result)
    result["meta"]["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _save(args.out, result)


if __name__ == "__main__":
    main()
