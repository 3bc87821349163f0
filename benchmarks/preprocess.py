"""Preprocessing and loader throughput; results go to ``benchmarks/results/preprocess.json``.

* ``preprocess``: rows/s of ``torchrec_cce.data.preprocess`` (both passes, writing parquet) on a
  Criteo-shaped TSV of ``--rows`` rows made in ``--tmp`` (never in the repo) by tiling
  ``../shared/data/criteo_kaggle_head10k.tsv``: in tile ``t`` every categorical value of the
  columns with more than 1,000 distinct values in the head is offset by ``t * 2**20``
  (mod 2**32), so those vocabularies grow with the file as Criteo's do; low-cardinality
  columns and dense values are copied. Each repetition runs in a fresh subprocess, timing only
  the ``preprocess()`` call (imports excluded; the ~20 s import of torch/torchrec through the
  package is not counted), and records its peak RSS and its CPU time (rows per CPU second is
  the less load-sensitive figure on a shared machine).
* ``loader``: batches/s and samples/s of ``PreprocessedDataset`` (train split, shuffled,
  ``--batch-size``, one full epoch per repetition).

Medians of ``--reps`` repetitions; the machine is a shared, loaded 2-core VM, so figures are noisy.

Usage::

    python benchmarks/preprocess.py                  # 1.5M rows, 3 repetitions
    python benchmarks/preprocess.py --rows 200000 --reps 1   # smoke run
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "preprocess.json")
HEAD = os.environ.get("TORCHREC_CCE_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))


def make_tsv(path: str, rows: int) -> dict:
    """Tile the shared Criteo head up to ``rows`` rows (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    head = os.path.join(HEAD, "criteo_kaggle_head10k.tsv")
    if not os.path.exists(head):
        sys.exit(f"{head} not found: set TORCHREC_CCE_SHARED_DATA to the shared data folder")
    names = ["label"] + [f"i{j}" for j in range(13)] + [f"c{j}" for j in range(26)]
    t = pcsv.read_csv(head, read_options=pcsv.ReadOptions(column_names=names),
                      parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
                      convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                          strings_can_be_null=False))
    grow = [n for n in names[14:] if len(pc.unique(t.column(n))) > 1000]
    ints = {n: np.array([int(v, 16) if v else -1 for v in t.column(n).to_pylist()], dtype=np.int64)
            for n in grow}
    wopt = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    written = 0
    with pcsv.CSVWriter(path, t.schema, write_options=wopt) as w:
        tile = 0
        while written < rows:
            cols = {}
            for n in names:
                if n in ints:
                    x = ints[n]
                    v = (x + tile * (1 << 20)) % (1 << 32)
                    s = np.char.mod("%08x", v).astype(object)
                    s[x < 0] = ""
                    cols[n] = pa.array(s, pa.string())
                else:
                    cols[n] = t.column(n)
            part = pa.table(cols)
            take = min(part.num_rows, rows - written)
            w.write_table(part.slice(0, take))
            written += take
            tile += 1
    return {"rows": written, "bytes": os.path.getsize(path), "growing_columns": len(grow)}


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from torchrec_cce.data.preprocess import preprocess
t, c = time.perf_counter(), time.process_time()
meta = preprocess({args!r})
dt, cpu = time.perf_counter() - t, time.process_time() - c
rows = sum(s["rows"] for s in meta["splits"].values())
print(json.dumps({{"seconds": dt, "cpu_seconds": cpu, "rows": rows,
                   "vocab_total": sum(f["vocab_size"] for f in meta["features"]),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run_preprocess(tsv: str, out: str) -> dict:
    args = ["--format", "criteo_tsv", "--input", tsv, "--no-progress", "--out", out]
    code = CHILD.format(repo=REPO, args=args)
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_loader(out: str, batch_size: int) -> dict:
    sys.path.insert(0, REPO)
    import torch

    from torchrec_cce.data import PreprocessedDataset

    torch.set_num_threads(1)
    t = time.perf_counter()
    ds = PreprocessedDataset(out, "train", batch_size=batch_size, seed=0)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    n = 0
    for batch in ds:
        n += batch.labels.shape[0]
    dt = time.perf_counter() - t
    return {"load_s": load_s, "batches": len(ds), "seconds": dt,
            "batches_per_s": len(ds) / dt, "samples_per_s": n / dt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_500_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--tmp", default="/tmp/torchrec_cce_preprocess_bench")
    args = p.parse_args()
    os.makedirs(args.tmp, exist_ok=True)
    tsv = os.path.join(args.tmp, f"criteo_shaped_{args.rows}.tsv")
    t = time.perf_counter()
    info = make_tsv(tsv, args.rows)
    info["generate_s"] = time.perf_counter() - t
    out = os.path.join(args.tmp, "pre")
    pre, loads = [], []
    for _ in range(args.reps):  # interleaved: preprocess, then a loader epoch on its output
        pre.append(run_preprocess(tsv, out))
        loads.append(run_loader(out, args.batch_size))
        print(f"preprocess {pre[-1]['rows'] / pre[-1]['seconds']:,.0f} rows/s, "
              f"{pre[-1]['rows'] / pre[-1]['cpu_seconds']:,.0f} rows/CPU-s "
              f"({pre[-1]['seconds']:.1f} s, peak RSS {pre[-1]['peak_rss_mb']:.0f} MB); loader "
              f"{loads[-1]['samples_per_s']:,.0f} samples/s", flush=True)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "note": "shared, loaded 2-core VM: noisy"},
        "input": dict(info, path=tsv, format="criteo_tsv"),
        "preprocess": {"reps": pre, "median_rows_per_s": med([r["rows"] / r["seconds"] for r in pre]),
                       "median_seconds": med([r["seconds"] for r in pre]),
                       "median_rows_per_cpu_s": med([r["rows"] / r["cpu_seconds"] for r in pre]),
                       "max_peak_rss_mb": max(r["peak_rss_mb"] for r in pre)},
        "loader": {"batch_size": args.batch_size, "reps": loads,
                   "median_batches_per_s": med([r["batches_per_s"] for r in loads]),
                   "median_samples_per_s": med([r["samples_per_s"] for r in loads])},
        "command": " ".join(["python", "benchmarks/preprocess.py"] + sys.argv[1:]),
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("input",)}, indent=1))
    print(f"median: preprocess {result['preprocess']['median_rows_per_s']:,.0f} rows/s "
          f"({result['preprocess']['median_rows_per_cpu_s']:,.0f} rows/CPU-s), loader "
          f"{result['loader']['median_batches_per_s']:,.1f} batches/s = "
          f"{result['loader']['median_samples_per_s']:,.0f} samples/s -> {RESULTS}")


if __name__ == "__main__":
    main()
