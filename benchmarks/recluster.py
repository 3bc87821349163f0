"""Full re-clustering time of one CCE table as the vocabulary grows (expect linear in V).

    .venv/bin/python benchmarks/recluster.py                      # V = 1e5, 1e6, 1e7
    .venv/bin/python benchmarks/recluster.py --ids 100000,1000000

One table, dim 16, 4 chunks, k = rows = 4096, a full reservoir (256 samples per centroid,
Zipf-skewed ids), 10 Lloyd iterations per chunk, one process with 2 threads. ``recluster``
reports its phases; the JSON gets the total and the per-id cost of the all-ids pass.
Results are merged into ``benchmarks/results/kmeans.json`` under ``"recluster_scaling"``.
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

from torchrec_cce import CCEConfig, CCEEmbeddingBagCollection, recluster  # noqa: E402

ROWS, CHUNKS, DIM = 4096, 4, 16


def one(num_ids: int, iters: int) -> dict:
    t = [EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=num_ids,
                            feature_names=["f"])]
    ebc = CCEEmbeddingBagCollection(t, {"t": CCEConfig(rows=ROWS, chunks=CHUNKS)})
    with torch.no_grad():  # trained-looking codebooks: a few clusters plus noise
        g = torch.Generator().manual_seed(0)
        for name in ("t__cce",):
            w = ebc.codebooks.embedding_bags[name].weight
            w.copy_(torch.randn(w.shape, generator=g))
    reservoir = ebc.tables["t"].reservoir
    reservoir.observe((torch.rand(reservoir.capacity, generator=g) ** 4 * num_ids).long())
    start = time.perf_counter()
    stats = recluster(ebc, iters=iters)["t"]
    seconds = time.perf_counter() - start
    return {"num_ids": num_ids, "seconds": seconds, "num_samples": stats["num_samples"],
            "us_per_id": 1e6 * seconds / num_ids, "kmeans_inertia_end": stats["kmeans_inertia_end"]}


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
        print(f"V={v:>11,}: recluster {row['seconds']:.1f} s ({row['us_per_id']:.2f} us/id, "
              f"{row['num_samples']:,} samples)", flush=True)
    result = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            result = json.load(f)
    result["recluster_scaling"] = {"rows": ROWS, "chunks": CHUNKS, "dim": DIM,
                                   "iters": args.iters, "threads": 2, "results": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
