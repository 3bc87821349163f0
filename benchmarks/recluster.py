"""Full re-clustering time of one CCE table as the vocabulary grows (expect linear in V).

    .venv/bin/python benchmarks/recluster.py                      # V = 1e5, 1e6, 1e7
    .venv/bin/python benchmarks/recluster.py --ids 1000000 --compare-old f7838e1

One table, dim 16, 4 chunks, k = rows = 4096, a full reservoir (256 samples per centroid,
Zipf-skewed ids), 10 Lloyd iterations per chunk, one process with 2 threads. The JSON gets the
total, the k-means and all-ids phases, the per-id cost of the all-ids pass and the load average.
``--compare-old REV`` also runs the implementation of git revision ``REV`` (loaded from git) on
the same table, interleaved with the current one, and records both times, their ratio and how
many assignments differ. Results are merged into ``benchmarks/results/kmeans.json`` under
``"recluster_scaling"``.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import types

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from torchrec import EmbeddingBagConfig  # noqa: E402

from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection  # noqa: E402
from torchrec_cce.clustering import native  # noqa: E402
from torchrec_cce.clustering.recluster import ReclusterState, recluster_table  # noqa: E402

ROWS, CHUNKS, DIM = 4096, 4, 16


def old_implementation(rev: str):
    """``(recluster_table, ReclusterState)`` of git revision ``rev``."""
    def show(path: str) -> str:
        return subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{path}"], check=True,
                              capture_output=True, text=True).stdout

    km = types.ModuleType("old_kmeans")
    exec(compile(show("torchrec_cce/clustering/kmeans.py"), "old_kmeans.py", "exec"), km.__dict__)
    sys.modules["old_kmeans"] = km
    rc = types.ModuleType("old_recluster")
    exec(compile(show("torchrec_cce/clustering/recluster.py").replace(
        "from torchrec_cce.clustering.kmeans import", "from old_kmeans import"),
        "old_recluster.py", "exec"), rc.__dict__)
    return rc.recluster_table, rc.ReclusterState


def one(num_ids: int, iters: int, impl=recluster_table, State=ReclusterState) -> dict:
    t = [EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=num_ids,
                            feature_names=["f"])]
    ebc = CCEEmbeddingBagCollection(t, {"t": CCEConfig(rows=ROWS, chunks=CHUNKS)})
    with torch.no_grad():  # trained-looking codebooks: a few clusters plus noise
        g = torch.Generator().manual_seed(0)
        for name in ("t__cce",):
            w = ebc.codebooks.embedding_bags[name].weight
            w.copy_(torch.randn(w.shape, generator=g))
    m = ebc.tables["t"]
    m.reservoir.observe((torch.rand(m.reservoir.capacity, generator=g) ** 4 * num_ids).long())
    wa = ebc.codebooks.embedding_bags["t__cce_A"].weight
    wb = ebc.codebooks.embedding_bags["t__cce_B"].weight
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    _, _, stats = impl(State(m, wa, wb, m.assignment, 0, (0, num_ids)), None, iters)
    seconds = time.perf_counter() - start
    row = {"num_ids": num_ids, "seconds": round(seconds, 2),
           "cpu_seconds": round(time.process_time() - cpu, 2),
           "num_samples": stats["num_samples"], "us_per_id": round(1e6 * seconds / num_ids, 3),
           "kmeans_inertia_end": stats["kmeans_inertia_end"],
           "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
    if "kmeans_seconds" in stats:
        row["kmeans_seconds"] = round(stats["kmeans_seconds"], 2)
        row["all_ids_seconds"] = round(seconds - stats["kmeans_seconds"], 2)
        row["all_ids_us_per_id"] = round(1e6 * row["all_ids_seconds"] / num_ids, 3)
    return row, m.assignment.clone()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ids", default="100000,1000000,10000000")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compare-old", default=None, metavar="REV",
                   help="also time the implementation of this git revision, interleaved")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "kmeans.json"))
    args = p.parse_args()
    torch.set_num_threads(2)
    old = old_implementation(args.compare_old) if args.compare_old else None
    rows = []
    for v in (int(x) for x in args.ids.split(",")):
        row, p_new = one(v, args.iters)
        if old is not None:
            old_row, p_old = one(v, args.iters, *old)
            row["old"] = dict(old_row, rev=args.compare_old)
            row["speedup_vs_old"] = round(old_row["seconds"] / row["seconds"], 2)
            row["assignments_differing_from_old"] = int((p_new != p_old).sum())
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
        "native_kernel": native.available(), "results": merged,
        "note": ("one run per V on a shared 2-core VM (loadavg_1min before/after each run: "
                 "other jobs were running); cpu_seconds = process CPU time")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
