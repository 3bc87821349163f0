"""Copy a ``torchrec_cce.data.preprocess`` directory with every categorical feature's ids
permuted (the out-of-vocabulary id 0 kept; counts permuted alike): a vocabulary in arbitrary
order, whose hot ids are no prefix, to measure the online hot tier (``--hot-set online``) on
real data against the prefix tier on the frequency-ordered original.

    python benchmarks/shuffle_ids.py SRC_DIR DST_DIR [--seed 123]
"""

import argparse
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--seed", type=int, default=123)
    args = p.parse_args()
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise SystemExit("shuffle_ids.py: DST_DIR must differ from SRC_DIR")
    shutil.rmtree(args.dst, ignore_errors=True)
    shutil.copytree(args.src, args.dst, ignore=shutil.ignore_patterns("mmap"))
    with open(os.path.join(args.src, "meta.json")) as f:
        meta = json.load(f)
    rng = np.random.default_rng(args.seed)
    perms = {}
    for feature in meta["features"]:
        if feature.get("kind", "categorical") != "categorical":
            raise SystemExit(f"shuffle_ids.py: feature {feature['name']} is "
                             f"{feature['kind']}; only categorical features are supported")
        v = feature["vocab_size"]
        perm = np.concatenate([[0], 1 + rng.permutation(v - 1)])  # new id of each old id
        perms[feature["name"]] = perm
        path = os.path.join("counts", f"{feature['name']}.npy")
        counts = np.load(os.path.join(args.src, path))
        out = np.empty_like(counts)
        out[perm] = counts
        np.save(os.path.join(args.dst, path), out)
        vocab_path = os.path.join("vocab", f"{feature['name']}.parquet")
        if os.path.exists(os.path.join(args.src, vocab_path)):  # id -> value, re-sorted by id
            vocab = pq.read_table(os.path.join(args.src, vocab_path))
            ids = perm[vocab["id"].to_numpy()]
            order = np.argsort(ids)
            vocab = vocab.take(pa.array(order)).set_column(
                0, "id", pa.array(ids[order].astype(np.int32)))
            pq.write_table(vocab, os.path.join(args.dst, vocab_path))
    for split in ("train", "val", "test"):
        table = pq.read_table(os.path.join(args.src, f"{split}.parquet"))
        columns = {}
        for name in table.column_names:
            col = table[name]
            if name in perms:
                values = col.to_numpy()
                col = pa.array(perms[name][values].astype(values.dtype))
            columns[name] = col
        pq.write_table(pa.table(columns), os.path.join(args.dst, f"{split}.parquet"))
    print(f"{args.dst}: ids of {sorted(perms)} permuted (seed {args.seed})")


if __name__ == "__main__":
    main()
