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
* ``--ref REV``: the same runs of ``torchrec_cce/data/preprocess.py`` as of git revision ``REV``
  (extracted to ``--tmp``), alternating with the working tree's in one invocation (the machine's
  load changes by the minute), and a byte-for-byte comparison of the two outputs
  (``meta.json`` without its ``command``).
* ``--input TSV``: time an existing Criteo TSV instead of the tiled one (e.g. the first ``N``
  lines of a full-size ``train.txt`` or of ``scale.py``'s generated file: ``head -n N``);
  ``--section NAME`` keeps such a run's figures under their own key of the results.
* ``--full-vocab``: peak RSS at Criteo Kaggle's full vocabulary, 33.8M ids: a TSV of
  ``max(cardinalities)`` = 10,131,227 rows in which categorical ``j`` cycles through its
  Kaggle cardinality (row ``i`` has rank ``i mod card_j``, written as in ``scale.py``), so every
  value of every column appears; preprocessed once with ``--split 1,0,0`` (all rows train).

Medians of ``--reps`` repetitions; the machine is a shared, loaded 2-core VM, so figures are noisy.

Usage::

    python benchmarks/preprocess.py                  # 1.5M rows, 3 repetitions
    python benchmarks/preprocess.py --rows 200000 --reps 1   # smoke run
    python benchmarks/preprocess.py --ref 49008b4            # side by side with that revision
    python benchmarks/preprocess.py --input slice.tsv --ref 945b047   # an existing TSV
    python benchmarks/preprocess.py --full-vocab --reps 0    # the 33.8M-id vocabulary only
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


def make_full_vocab_tsv(path: str) -> dict:
    """Every value of Criteo Kaggle's 26 vocabularies at least once (module docstring)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from scale import KAGGLE_CARDINALITIES, _string_array, hex_values

    rows = max(KAGGLE_CARDINALITIES)
    names = ["label"] + [f"int_{i}" for i in range(13)] + [f"cat_{i}" for i in range(26)]
    schema = pa.schema([("label", pa.int8())] + [(n, pa.int64()) for n in names[1:14]]
                       + [(n, pa.string()) for n in names[14:]])
    rng = np.random.default_rng(0)
    opts = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with pcsv.CSVWriter(path, schema, write_options=opts) as w:
        for lo in range(0, rows, 1 << 20):
            i = np.arange(lo, min(rows, lo + (1 << 20)), dtype=np.int64)
            cols = [pa.array((rng.random(len(i)) < 0.25).astype(np.int8))]
            cols += [pa.array(rng.integers(0, 100, len(i))) for _ in range(13)]
            cols += [_string_array(hex_values(i % c + 1, j)) for j, c in enumerate(KAGGLE_CARDINALITIES)]
            w.write_table(pa.Table.from_arrays(cols, schema=schema))
    return {"rows": rows, "ids": sum(KAGGLE_CARDINALITIES), "bytes": os.path.getsize(path)}


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
if {module!r}:
    import importlib.util
    spec = importlib.util.spec_from_file_location("preprocess_ref", {module!r})
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    preprocess = mod.preprocess
else:
    from torchrec_cce.data.preprocess import preprocess
def peak_mb():  # this process's own high-water mark: VmHWM; ru_maxrss keeps the parent's
    try:           # at the fork (Linux carries it over execve), e.g. a loader epoch's
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t, c = time.perf_counter(), time.process_time()
meta = preprocess({args!r})
dt, cpu = time.perf_counter() - t, time.process_time() - c
rows = sum(s["rows"] for s in meta["splits"].values())
print(json.dumps({{"seconds": dt, "cpu_seconds": cpu, "rows": rows,
                   "vocab_total": sum(f["vocab_size"] for f in meta["features"]),
                   "peak_rss_mb": peak_mb()}}))
"""


def run_preprocess(tsv: str, out: str, module: str = "", extra=()) -> dict:
    """One ``preprocess()`` call in a fresh process (``module``: a file to take it from)."""
    args = ["--format", "criteo_tsv", "--input", tsv, "--no-progress", "--out", out, *extra]
    code = CHILD.format(repo=REPO, args=args, module=module)
    env = dict(os.environ, PYTHONPATH=REPO)
    load = os.getloadavg()[0]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(r.stderr)
    return dict(json.loads(r.stdout.strip().splitlines()[-1]), load_avg_1min=load)


def same_outputs(a: str, b: str) -> list:
    """Files that differ between two output directories (``meta.json`` minus ``command``; the
    loader's column cache ``mmap/`` left out)."""
    import filecmp

    def files(d):  # what preprocessing wrote (the loader adds its column cache, mmap/)
        every = (os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)
        return sorted(n for n in every if not n.startswith("mmap" + os.sep))

    names, other = files(a), files(b)
    differ = sorted(set(names) ^ set(other))
    for n in set(names) & set(other):
        if n == "meta.json":
            ma, mb = (json.load(open(os.path.join(d, n))) for d in (a, b))
            ma.pop("command"), mb.pop("command")
            if ma != mb:
                differ.append(n)
        elif not filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False):
            differ.append(n)
    return differ


def summary(reps: list) -> dict:
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return {"reps": reps, "median_rows_per_s": med([r["rows"] / r["seconds"] for r in reps]),
            "median_seconds": med([r["seconds"] for r in reps]),
            "median_rows_per_cpu_s": med([r["rows"] / r["cpu_seconds"] for r in reps]),
            "max_peak_rss_mb": max(r["peak_rss_mb"] for r in reps),
            "median_load_avg_1min": med([r["load_avg_1min"] for r in reps])}


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
    p.add_argument("--ref", default=None, help="git revision to run side by side (see above)")
    p.add_argument("--full-vocab", action="store_true", help="also the 33.8M-id vocabulary run")
    p.add_argument("--input", default=None, help="an existing Criteo TSV to time instead of the tiled one")
    p.add_argument("--no-loader", action="store_true", help="skip the loader epochs")
    p.add_argument("--section", default=None,
                   help="store this run's input/preprocess/loader/reference under this key of the results")
    p.add_argument("--tmp", default="/tmp/torchrec_cce_preprocess_bench")
    args = p.parse_args()
    os.makedirs(args.tmp, exist_ok=True)
    result = {}  # this invocation's parts; the others of RESULTS are kept
    top = result
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                         "note": "shared, loaded 2-core VM: noisy; wall figures depend on the load"}
    command = " ".join(["python", "benchmarks/preprocess.py"] + sys.argv[1:])
    if args.reps and not args.section:  # the command of the top-level figures
        result["command"] = command
    ref_module = ""
    if args.ref:
        ref_module = os.path.join(args.tmp, "preprocess_ref.py")
        src = subprocess.run(["git", "-C", REPO, "show", f"{args.ref}:torchrec_cce/data/preprocess.py"],
                             check=True, capture_output=True, text=True).stdout
        with open(ref_module, "w") as f:
            f.write(src)
    if args.reps:
        if args.input:
            tsv = args.input
            info = {"rows": None, "bytes": os.path.getsize(tsv), "given": True}
        else:
            tsv = os.path.join(args.tmp, f"criteo_shaped_{args.rows}.tsv")
            t = time.perf_counter()
            info = make_tsv(tsv, args.rows)
            info["generate_s"] = time.perf_counter() - t
        out, ref_out = os.path.join(args.tmp, "pre"), os.path.join(args.tmp, "pre_ref")
        pre, ref, loads = [], [], []
        for _ in range(args.reps):  # interleaved: [reference,] preprocess, a loader epoch
            if ref_module:
                ref.append(run_preprocess(tsv, ref_out, ref_module))
                print(f"reference {ref[-1]['rows'] / ref[-1]['seconds']:,.0f} rows/s, "
                      f"{ref[-1]['rows'] / ref[-1]['cpu_seconds']:,.0f} rows/CPU-s "
                      f"({ref[-1]['seconds']:.1f} s, peak RSS {ref[-1]['peak_rss_mb']:.0f} MB)", flush=True)
            pre.append(run_preprocess(tsv, out))
            if not args.no_loader:
                loads.append(run_loader(out, args.batch_size))
            print(f"preprocess {pre[-1]['rows'] / pre[-1]['seconds']:,.0f} rows/s, "
                  f"{pre[-1]['rows'] / pre[-1]['cpu_seconds']:,.0f} rows/CPU-s "
                  f"({pre[-1]['seconds']:.1f} s, peak RSS {pre[-1]['peak_rss_mb']:.0f} MB, load "
                  f"{pre[-1]['load_avg_1min']:.1f})"
                  + (f"; loader {loads[-1]['samples_per_s']:,.0f} samples/s" if loads else ""), flush=True)
        med = lambda xs: float(np.median(xs))  # noqa: E731
        if args.section:
            result = result.setdefault(args.section, {"command": command})
            result["load_avg_1min_at_end"] = os.getloadavg()[0]
        info["rows"] = info["rows"] or pre[0]["rows"]
        result["input"] = dict(info, path=tsv, format="criteo_tsv")
        result["preprocess"] = summary(pre)
        if loads:
            result["loader"] = {"batch_size": args.batch_size, "reps": loads,
                                "median_batches_per_s": med([r["batches_per_s"] for r in loads]),
                                "median_samples_per_s": med([r["samples_per_s"] for r in loads])}
        if ref_module:
            differ = same_outputs(out, ref_out)
            result["reference"] = dict(summary(ref), revision=args.ref, differing_files=differ,
                                       cpu_speedup=result["preprocess"]["median_rows_per_cpu_s"]
                                       / summary(ref)["median_rows_per_cpu_s"],
                                       wall_speedup_median_of_pairs=med([r["seconds"] / q["seconds"]
                                                                         for r, q in zip(ref, pre)]))
            print(f"reference {args.ref}: outputs {'identical' if not differ else 'DIFFER: ' + str(differ)}")
        print(f"median: preprocess {result['preprocess']['median_rows_per_s']:,.0f} rows/s "
              f"({result['preprocess']['median_rows_per_cpu_s']:,.0f} rows/CPU-s)"
              + (f", loader {result['loader']['median_samples_per_s']:,.0f} samples/s" if loads else ""))
    result = top
    if args.full_vocab:
        tsv = os.path.join(args.tmp, "criteo_full_vocab.tsv")
        t = time.perf_counter()
        info = make_full_vocab_tsv(tsv) if not os.path.exists(tsv) else {
            "rows": None, "bytes": os.path.getsize(tsv), "reused": True}
        info["generate_s"] = time.perf_counter() - t
        r = run_preprocess(tsv, os.path.join(args.tmp, "pre_full_vocab"), extra=["--split", "1,0,0"])
        result["full_vocab"] = dict(r, input=dict(info, path=tsv), rows_per_s=r["rows"] / r["seconds"],
                                    rows_per_cpu_s=r["rows"] / r["cpu_seconds"], command=command)
        print(f"full vocabulary: {r['vocab_total']:,} ids, {r['rows'] / r['seconds']:,.0f} rows/s, "
              f"{r['rows'] / r['cpu_seconds']:,.0f} rows/CPU-s, peak RSS {r['peak_rss_mb']:,.0f} MB", flush=True)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    merged = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            merged = json.load(f)
    merged.update(result)
    with open(RESULTS, "w") as f:
        json.dump(merged, f, indent=1)
    with open(os.path.join(args.tmp, "last_result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
