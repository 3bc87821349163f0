"""Cost of an online hot tier (``OnlineTieredConfig``) against a prefix tier and its cold method
alone: training step time (forward + backward of one unsharded collection, single-id bags),
the sketch's own update time, a migration and a ``top_k``; timed side by side in one run
(medians over ``--reps`` rounds, one thread), so ratios hold on a loaded machine.

    python benchmarks/online_tier.py [--ids 1000000] [--hot 10000] [--batch 8192]

Prints one JSON object (``ms_per_step`` per variant and its ratio to the cold method alone,
``sketch_observe_ms``, ``migrate_s``, ``top_k_s``, ``sketch_bytes``, the 1-minute load)."""

import argparse
import json
import os
import statistics
import time

import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_cce import (CCEEmbeddingBagCollection, HashingTrickConfig, OnlineTieredConfig,
                          TieredConfig, migrate_hot)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ids", type=int, default=1_000_000)
    p.add_argument("--hot", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    zipf = torch.arange(1, args.ids + 1, dtype=torch.float64) ** -1.1
    perm = torch.randperm(args.ids, generator=g)  # hot ids scattered, not a prefix
    batches = [perm[torch.multinomial(zipf, args.batch, replacement=True, generator=g)]
               for _ in range(args.batches)]
    kjts = [KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=b, lengths=torch.ones_like(b))
            for b in batches]
    tables = [EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=args.ids,
                                 feature_names=["f"])]
    cold = HashingTrickConfig(rows=65536)
    configs = {"cold_alone": cold, "prefix_tier": TieredConfig(hot_ids=args.hot, cold=cold),
               "online_tier": OnlineTieredConfig(hot_ids=args.hot, cold=cold,
                                                 migrate_every=10**9)}
    mods = {k: CCEEmbeddingBagCollection(tables, {"t": c}) for k, c in configs.items()}
    online = mods["online_tier"]
    for kjt in kjts:  # fill the sketch, then one migration
        online(kjt)
    t0 = time.perf_counter()
    stats = migrate_hot(online)["t"]
    migrate_s = time.perf_counter() - t0
    times = {k: [] for k in mods}
    for _ in range(args.reps):
        for k, m in mods.items():
            t0 = time.perf_counter()
            for kjt in kjts:
                m(kjt).values().sum().backward()
            times[k].append((time.perf_counter() - t0) / len(kjts) * 1000)
    sketch = online.tables["t"].sketch
    t0 = time.perf_counter()
    for b in batches:
        sketch.observe(b)
    observe_ms = (time.perf_counter() - t0) / len(batches) * 1000
    t0 = time.perf_counter()
    sketch.top_k(args.hot)
    top_k_s = time.perf_counter() - t0
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "ids": args.ids, "hot": args.hot, "batch": args.batch,
        "ms_per_step": {k: round(v, 2) for k, v in med.items()},
        "ratio_to_cold_alone": {k: round(v / med["cold_alone"], 2) for k, v in med.items()},
        "sketch_observe_ms": round(observe_ms, 2), "migrate_s": round(migrate_s, 3),
        "promoted": stats["promoted"], "top_k_s": round(top_k_s, 3),
        "sketch_bytes": sketch.stored_bytes(), "load_1min": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
