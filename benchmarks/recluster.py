"""Full re-clustering time of one CCE table as the vocabulary grows (expect linear in V).

    .venv/bin/python benchmarks/recluster.py                      # V = 1e5, 1e6, 1e7
    .venv/bin/python benchmarks/recluster.py --ids 1000000,10000000

One table, dim 16, 4 chunks, k = rows = 4096, a full reservoir (256 samples per centroid,
Zipf-skewed ids), 10 Lloyd iterations per chunk, one process with 2 threads. The JSON gets the
wall and process CPU seconds, the wall seconds of each phase (``phases_seconds``, and process CPU seconds in
``phases_cpu_seconds``: sampling
and old vectors, k-means of all chunks, the all-ids pass split into reading ``p``, hashing,
gathering old vectors, nearest-centroid search and residual sums, the all-reduce, writing the
packed ``p``), the per-id cost of the all-ids pass and the load average. Results are merged into ``benchmarks/results/kmeans.json`` under
``"recluster_scaling"``.
"""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from torchrec import EmbeddingBagConfig  # noqa: E402

from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection  # noqa: E402
from torchrec_cce.clustering import native  # noqa: E402
from torchrec_cce.clustering.recluster import ReclusterState, recluster_table  # noqa: E402

ROWS, CHUNKS, DIM = 4096, 4, 16


def one(num_ids: int, iters: int) -> dict:
    t = [EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=num_ids,
                            feature_names=["f"])]
    ebc = CCEEmbeddingBagCollection(t, {"t": CCEConfig(rows=ROWS, chunks=CHUNKS)})
    m = ebc.tables["t"]
    with torch.no_grad():  # random codebooks: every id gets a distinct old vector
        g = torch.Generator().manual_seed(0)
        for cb in m.codebooks:
            w = ebc.codebooks.embedding_bags[f"t__{cb.suffix}"].weight
            w.copy_(torch.randn(w.shape, generator=g))
        wa, wb = m.stack_ab(lambda suffix: ebc.codebooks.embedding_bags[f"t__{suffix}"].weight)
    m.reservoir.observe((torch.rand(m.reservoir.capacity, generator=g) ** 4 * num_ids).long())
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    _, _, stats = recluster_table(ReclusterState(m, wa, wb, m.assignment, 0, (0, num_ids)),
                                  None, iters)
    seconds = time.perf_counter() - start
    row = {"num_ids": num_ids, "seconds": round(seconds, 2),
           "cpu_seconds": round(time.process_time() - cpu, 2),
           "num_samples": stats["num_samples"], "us_per_id": round(1e6 * seconds / num_ids, 3),
           "kmeans_inertia_end": stats["kmeans_inertia_end"],
           "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
           "phases_seconds": {k[: -len("_seconds")]: round(v, 2) for k, v in stats.items()
                              if k.endswith("_seconds") and not k.endswith("_cpu_seconds")
                              and k not in ("kmeans_seconds", "seconds")},
           "phases_cpu_seconds": {k[: -len("_cpu_seconds")]: round(v, 2)
                                  for k, v in stats.items() if k.endswith("_cpu_seconds")}}
    row["all_ids_us_per_id"] = round(1e6 * stats["all_ids_seconds"] / num_ids, 3)
    row["all_ids_cpu_us_per_id"] = round(1e6 * stats["all_ids_cpu_seconds"] / num_ids, 3)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ids", default="100000,1000000,10000000")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kmeans.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    for v in (int(x) for x in args.ids.split(",")):
        row = one(v, args.iters)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
    prev = result.get("recluster_scaling", {}).get("results", [])
    done = {r["num_ids"] for r in rows}
    merged = sorted([r for r in prev if r["num_ids"] not in done] + rows,
                    key=lambda r: r["num_ids"])
    result["recluster_scaling"] = {
        "rows": ROWS, "chunks": CHUNKS, "dim": DIM, "iters": args.iters, "threads": 2,
        "native_kernel": native.available(), "grouped_kernel": native.grouped_supported(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": merged,
        "note": ("one run per V on a shared 2-core VM (loadavg_1min before/after each run: "
                 "other jobs were running, so wall >> cpu / 2); cpu_seconds = process CPU "
                 "time; phases: wall (all_ids_* sub-phases: seconds summed over the worker "
                 "threads) and process CPU")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
