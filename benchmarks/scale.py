"""Criteo Kaggle size, end to end; results go to ``benchmarks/results/scale.json`` (+ ``scale.md``).

Phases, each a *cell* of the JSON keyed ``"<rows>/<phase>/<method>"`` (a finished cell is
skipped when the script runs again, so an interrupted run resumes where it stopped;
``--force`` redoes them):

1. ``generate``: a Criteo-shaped raw TSV of ``--rows`` rows (label, 13 ints, 26 8-hex-digit
   categoricals) written with numpy + pyarrow in blocks (no Python row loop), in ``--work-dir``
   (never in the repo). Column ``j`` has ``cardinalities(rows)[j]`` possible values: Kaggle's
   (``CRITEO_KAGGLE_CARDINALITIES``) where they are at most ``KEEP_BELOW``, else scaled by
   ``rows / 45,840,617`` (never below ``KEEP_BELOW`` nor above Kaggle's). Frequencies are
   Zipf-like: rank ``r = floor(x)`` with ``x`` drawn from the density ``x**-ZIPF_A`` on
   ``[1, card + 1)`` (inverse CDF, :func:`zipf_cdf` gives ``P(r <= k)`` exactly); rank ``r``
   is written as ``(r * 0x9E3779B1 + j * 0x01000193) mod 2**32`` in hex (a bijection, so exactly ``<= card``
   distinct values). Ints are log-normal counts, 10% empty. The label is a Bernoulli draw whose
   logit depends on three categoricals, so the model has something to learn. ``--train-txt``
   takes a user's real Criteo ``train.txt`` instead.
2. ``preprocess``: ``python -m torchrec_cce.data.preprocess --format criteo_tsv`` (random
   0.8/0.1/0.1 split), wall seconds (torch imports included), rows/s and the subprocess's peak
   RSS.
3. ``train``: one epoch of ``torchrun --nproc_per_node 2 examples/dlrm/train.py --data
   preprocessed`` for ``full``, ``cce`` and ``qr`` (both at 1/16 of the full float32 bytes) and
   the budget planner (``--embedding-budget-mb`` at 1/16 and 1/256, no ``--method``), CCE and
   the planner with their default scheduled re-clusterings (0.25 and 0.5 of the epoch). Per cell:
   wall seconds, train samples/s and its ratio to ``full`` of the same invocation of this script,
   ``recluster_seconds``, the peak RSS of every rank (``VmHWM`` polled from ``/proc``) against the
   planner's prediction (``embedding_training_bytes``; per rank = / world size), test log loss.
   Before each cell the memory-mapped columns are read once (:func:`warm_page_cache`,
   ``page_cache_seconds``), so every cell starts with the same warm page cache.
   The ``cce`` cell checkpoints every ``epoch_steps // 2`` steps (checkpoint bytes = size of the
   newest ``step_*`` directory).
4. ``fault``: the ``cce`` cell again under ``torchrun --max-restarts 1 ... --resume`` with
   ``TORCHREC_CCE_FAULT_AT_STEP`` set just after the first checkpoint (rank 1 SIGKILLs itself);
   resume exactness = final test log loss / AUC, every evaluation and the training losses after
   the resume point equal the uninterrupted ``cce`` cell's.

The machine is a shared, loaded 2-core VM: samples/s are noisy, compare ratios within one run.

Usage::

    python benchmarks/scale.py --rows 20000            # tiny (~5 min here)
    python benchmarks/scale.py --rows 200000
    python benchmarks/scale.py                         # full size: 45,840,617 rows
    python benchmarks/scale.py --train-txt /data/criteo/train.txt
    python benchmarks/scale.py --phases train --max-steps 600 --eval-batches 25  # a slice

``--max-steps N`` trains the first N steps of the epoch only (re-clusterings at 1/4 and 1/2 of
them, checkpoints every N/2; cells keyed ``<rows>/train@N/<method>``) and ``--eval-batches``
evaluates on the first batches of val/test (``train.py --limit-val-batches/--limit-test-batches``):
the full-size tables, memory, re-clustering of the whole vocabulary and checkpoints in a slice of
the time an epoch takes.
"""

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "scale.json")
TABLE = os.path.join(REPO, "benchmarks", "results", "scale.md")
TRAIN = os.path.join("examples", "dlrm", "train.py")
KAGGLE_ROWS = 45_840_617
# Criteo Kaggle's 26 vocabulary sizes (torchrec_cce.data.criteo.CRITEO_KAGGLE_CARDINALITIES;
# copied so that generating data imports neither torch nor the package).
KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
KEEP_BELOW = 10_000  # vocabularies up to this size are kept at Kaggle's size
ZIPF_A = 1.1  # exponent of the rank density
BLOCK = 1 << 20  # rows per generated block
LABEL_COLUMNS = (0, 4, 8)  # categoricals the label's logit depends on
METHODS = ("full", "cce", "qr", "planner_16", "planner_256")


# ------------------------------------------------------------------------------- phase 1: data
def cardinalities(rows: int) -> List[int]:
    """The 26 vocabulary sizes of a ``rows``-row file (see the module docstring)."""
    scale = rows / KAGGLE_ROWS
    return [c if c <= KEEP_BELOW else min(c, max(KEEP_BELOW, int(round(c * scale))))
            for c in KAGGLE_CARDINALITIES]


def zipf_cdf(k: np.ndarray, card: int, a: float = ZIPF_A) -> np.ndarray:
    """``P(rank <= k)`` of the generator's rank distribution over ``card`` values."""
    k = np.minimum(np.asarray(k, dtype=np.float64), card)
    return (np.power(k + 1, 1 - a) - 1) / (math.pow(card + 1, 1 - a) - 1)


def zipf_ranks(rng: np.random.Generator, n: int, card: int, a: float = ZIPF_A) -> np.ndarray:
    """``n`` ranks in ``1..card`` (int64) drawn by the inverse of :func:`zipf_cdf`."""
    u = rng.random(n)
    top = math.pow(card + 1, 1 - a) - 1
    x = np.power(u * top + 1, 1 / (1 - a))
    return np.clip(np.floor(x).astype(np.int64), 1, card)


_HEX_PAIRS = np.frombuffer(b"".join(b"%02x" % i for i in range(256)), dtype=np.uint8).reshape(256, 2)


def hex_values(ranks: np.ndarray, column: int = 0) -> np.ndarray:
    """Ranks as 8-hex-digit strings (``S8``) of ``(rank * 0x9E3779B1 + column * 0x01000193) mod
    2**32`` (a bijection of the rank for each column)."""
    v = ((ranks.astype(np.uint64) * np.uint64(0x9E3779B1) + np.uint64(column * 0x01000193))
         & np.uint64(0xFFFFFFFF)).astype(">u4")
    chars = _HEX_PAIRS[v.view(np.uint8).reshape(-1, 4)]  # [n, 4 bytes, 2 digits]
    return np.ascontiguousarray(chars).reshape(-1, 8).view("S8").ravel()


def _string_array(values: np.ndarray) -> "pa.Array":
    """An ``S8`` array as an arrow string array, built from its buffers (no per-value copy)."""
    import pyarrow as pa

    offsets = np.arange(0, 8 * (len(values) + 1), 8, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(values.tobytes())])


def generate_tsv(path: str, rows: int, seed: int = 0) -> Dict[str, Any]:
    """Write the Criteo-shaped TSV (see the module docstring); returns what it wrote."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    cards = cardinalities(rows)
    names = ["label"] + [f"int_{i}" for i in range(13)] + [f"cat_{i}" for i in range(26)]
    schema = pa.schema([("label", pa.int8())] + [(n, pa.int64()) for n in names[1:14]]
                       + [(n, pa.string()) for n in names[14:]])
    rng = np.random.default_rng(seed)
    opts = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    clicks = 0
    start = time.perf_counter()
    tmp = path + ".partial"
    with pcsv.CSVWriter(tmp, schema, write_options=opts) as w:
        for lo in range(0, rows, BLOCK):
            n = min(BLOCK, rows - lo)
            ranks = [zipf_ranks(rng, n, c) for c in cards]
            logit = -1.2 + sum(0.6 * ((ranks[j] % 3) - 1.0) for j in LABEL_COLUMNS)
            label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
            clicks += int(label.sum())
            cols = [pa.array(label)]
            for _ in range(13):
                ints = np.floor(np.exp(rng.normal(1.0, 1.5, n))).astype(np.int64)
                cols.append(pa.array(ints, mask=rng.random(n) < 0.1))
            cols += [_string_array(hex_values(r, j)) for j, r in enumerate(ranks)]
            w.write_table(pa.Table.from_arrays(cols, schema=schema))
    os.replace(tmp, path)
    seconds = time.perf_counter() - start
    return {"rows": rows, "cardinalities": cards, "zipf_a": ZIPF_A, "click_rate": clicks / rows,
            "bytes": os.path.getsize(path), "seconds": seconds, "rows_per_s": rows / seconds,
            "path": path}


# ----------------------------------------------------------------------- processes and memory
def _children(pid: int) -> List[int]:
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            out = [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _status(pid: int) -> Dict[str, Any]:
    info: Dict[str, Any] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    info["peak_rss"] = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):  # private pages: not the shared page cache
                    info["anon_rss"] = int(line.split()[1]) * 1024
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            info["cmd"] = f.read().replace(b"\0", b" ").decode(errors="replace")
        info["rank"] = env.get(b"RANK", b"").decode() or None
        info["attempt"] = int(env.get(b"TORCHELASTIC_RESTART_COUNT", b"0") or 0)
    except (OSError, ValueError):
        pass
    return info


def run(cmd: Sequence[str], log_path: str, env: Optional[Dict[str, str]] = None,
        timeout: float = 3 * 3600) -> Dict[str, Any]:
    """Run ``cmd`` from the repo root, polling the peak RSS (``VmHWM``) of it and every
    descendant twice a second, and the machine's 1-minute load average (median and max: a
    2-rank run alone is ~2 on this 2-core machine; more means other work shared the cores).
    Returns exit code, wall seconds, ``{pid: status}`` and ``loadavg_1min``."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        seen: Dict[int, Dict[str, Any]] = {}
        load: List[float] = []  # the machine's 1-minute load average, sampled with the RSS
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                load.append(os.getloadavg()[0])
                stack = [proc.pid]
                while stack:
                    pid = stack.pop()
                    st = _status(pid)
                    if "peak_rss" in st:
                        old = seen.get(pid, {})
                        seen[pid] = {**old, **st, "peak_rss": max(st["peak_rss"], old.get("peak_rss", 0)),
                                     "peak_anon": max(st.get("anon_rss", 0), old.get("peak_anon", 0))}
                    stack += _children(pid)
                done.wait(0.5)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this script started
            code = proc.wait()
        done.set()
        t.join()
    return {"returncode": code, "seconds": time.perf_counter() - start, "processes": seen,
            "loadavg_1min": {"median": round(statistics.median(load), 2) if load else None,
                             "max": round(max(load), 2) if load else None}}


def _tail(path: str, n: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


# ------------------------------------------------------------------------- phase 2: preprocess
def preprocess(tsv: str, out: str, rows: Optional[int], log: str) -> Dict[str, Any]:
    """Run the library's preprocessing CLI on ``tsv`` into ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torchrec_cce.data.preprocess", "--format", "criteo_tsv",
           "--input", tsv, "--split", "0.8,0.1,0.1", "--no-progress", "--out", out]
    r = run(cmd, log)
    if r["returncode"] != 0:
        raise RuntimeError(f"preprocess failed ({r['returncode']}); log {log}:\n{_tail(log)}")
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    total = sum(v["rows"] for v in meta["splits"].values())
    if rows is not None and total != rows:
        raise RuntimeError(f"preprocess kept {total} of {rows} rows; see {log}")
    return {"rows": total, "seconds": r["seconds"], "rows_per_s": total / r["seconds"],
            "peak_rss": max(p["peak_rss"] for p in r["processes"].values()),
            "peak_anon": max(p["peak_anon"] for p in r["processes"].values()),
            "splits": {s: v["rows"] for s, v in meta["splits"].items()},
            "vocab_sizes": [f["vocab_size"] for f in meta["features"]], "out": out,
            "seconds_note": "wall, imports of torch/torchrec (~20 s here) included",
            "loadavg_1min": r["loadavg_1min"]}


# ---------------------------------------------------------------------------- phase 3: train
def full_bytes(vocab_sizes: Sequence[int], dim: int) -> int:
    """Float32 bytes of the full tables."""
    return sum(vocab_sizes) * dim * 4


def method_flags(method: str, full: int) -> List[str]:
    """train.py flags of one method cell (budgets as fractions of the full float32 bytes)."""
    mb = lambda frac: f"{full / frac / 2**20:.6f}"  # noqa: E731
    return {"full": ["--method", "full"],
            "cce": ["--method", "cce", "--embedding-budget-mb", mb(16)],
            # CCE with every p kept whole on each rank (no per-step p lookups from the owning
            # rank): not in METHODS; `--methods cce_replicated` measures what the routing costs
            "cce_replicated": ["--method", "cce", "--embedding-budget-mb", mb(16),
                               "--replicate-assignment-below-mb", "1048576"],
            "qr": ["--method", "qr", "--embedding-budget-mb", mb(16)],
            "planner_16": ["--embedding-budget-mb", mb(16)],
            "planner_256": ["--embedding-budget-mb", mb(256)]}[method]


def train_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHREC_CCE_FAULT_AT_STEP"):
        env.pop(k, None)
    env.update(TORCHREC_CCE_BACKEND="gloo", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               **(extra or {}))
    return env


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def warm_page_cache(data_dir: str) -> Dict[str, Any]:
    """Read the memory-mapped columns (``<data_dir>/mmap``) once, so that every cell starts
    with the same warm page cache: the training order is the same permutation in every cell,
    so without this the first cell faults the rows in and the next ones find them cached
    (a 600-step slice measured its CCE cell first: part of its 0.89x was that)."""
    start, total = time.perf_counter(), 0
    root = os.path.join(data_dir, "mmap")
    for d, _, files in os.walk(root):
        for name in sorted(files):
            with open(os.path.join(d, name), "rb", buffering=0) as f:
                while True:
                    chunk = f.read(1 << 24)
                    if not chunk:
                        break
                    total += len(chunk)
    available = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return {"page_cache_bytes": total, "page_cache_seconds": time.perf_counter() - start,
            "mem_available_bytes": available}


def train_cell(method: str, data_dir: str, work: str, args: argparse.Namespace, full: int,
               fault_at: Optional[int] = None) -> Dict[str, Any]:
    """One epoch at world size 2 (``fault_at``: the restarted, SIGKILLed variant of ``cce``)."""
    name = method if fault_at is None else f"{method}_fault"
    metrics = os.path.join(work, f"{name}.json")
    ckpt = os.path.join(work, f"ckpt_{name}")
    for p in (metrics, ckpt):
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (
            os.path.exists(p) and os.remove(p))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    flags = ["--data", "preprocessed", "--data-dir", data_dir, "--epochs", "1",
             "--batch-size", str(args.batch_size), "--embedding-dim", str(args.dim),
             "--no-progress", "--metrics-json", metrics, *method_flags(method, full)]
    if args.run_steps != args.epoch_steps:
        flags += ["--max-steps", str(args.run_steps)]
        if method.startswith(("cce", "planner")):  # re-cluster at 1/4, 1/2 of the run
            flags += ["--recluster-at", ",".join(f"{f * args.run_steps / args.epoch_steps:.6g}"
                                                 for f in (0.25, 0.5))]
    if args.eval_batches:
        flags += ["--limit-val-batches", str(args.eval_batches),
                  "--limit-test-batches", str(args.eval_batches)]
    if args.dim != 16:  # train.py's default --dense-arch 64,16 ends with the embedding dim
        flags += ["--dense-arch", f"64,{args.dim}"]
    checkpointing = method == "cce"
    if checkpointing:
        flags += ["--checkpoint-dir", ckpt, "--checkpoint-every", str(args.checkpoint_every),
                  "--keep-checkpoints", "1", "--resume"]
    extra = {}
    if fault_at is not None:
        torchrun += ["--max-restarts", "1"]
        extra["TORCHREC_CCE_FAULT_AT_STEP"] = str(fault_at)
    log = os.path.join(work, f"{name}.log")
    warm = warm_page_cache(data_dir)
    r = run([*torchrun, TRAIN, *flags], log, env=train_env(extra))
    if r["returncode"] != 0 or not os.path.exists(metrics):
        raise RuntimeError(f"{name} failed ({r['returncode']}); log {log}:\n{_tail(log)}")
    with open(metrics) as f:
        m = json.load(f)
    ranks: Dict[str, int] = {}
    anon: Dict[str, int] = {}  # peak RssAnon: the rank's private memory
    for p in r["processes"].values():
        if p.get("rank") is not None and "train.py" in p.get("cmd", "") and "torch.distributed.run" not in p["cmd"]:
            key = f"rank{p['rank']}" + (f"_attempt{p['attempt']}" if p["attempt"] else "")
            ranks[key] = max(ranks.get(key, 0), p["peak_rss"])
            anon[key] = max(anon.get(key, 0), p["peak_anon"])
    world = int(m["world_size"])
    predicted = int(m["embedding_training_bytes"])
    cell = {"method": method, "seconds": r["seconds"], "samples_per_s": m["train_samples_per_s"],
            "steps": m["steps"], "recluster_seconds": m["recluster_seconds"],
            "reclusterings": len(m["reclusterings"]), "eval_seconds": m["eval_seconds"],
            "test_logloss": m["test_logloss"], "test_auc": m["test_auc"],
            "embedding_bytes": m["embedding_bytes"], "full_embedding_bytes": m["full_embedding_bytes"],
            "predicted_embedding_training_bytes": predicted,
            "predicted_per_rank": predicted // world, "peak_rss_per_rank": ranks,
            # besides the tables' share: CCE's id reservoirs (every rank) and, in runs that
            # re-cluster, the largest table's estimated re-clustering workspace
            "predicted_sample_bytes_per_rank": int(m.get("embedding_sample_bytes_per_rank", 0)),
            "predicted_recluster_workspace_bytes": (int(m.get("recluster_workspace_bytes", 0))
                                                    if m["reclusterings"] else 0),
            "peak_anon_per_rank": anon,
            "plan": None if m["embedding_plan"] is None else {
                n: {"method": t["method"], "rows": t["rows"]}
                for n, t in m["embedding_plan"]["tables"].items()},
            "restart_count": m["restart_count"], "resumed_from_step": m["resumed_from_step"],
            "loadavg_1min": r["loadavg_1min"], "eval_batches_per_rank": args.eval_batches,
            "metrics_json": metrics, "log": log, **warm}
    if checkpointing:
        steps = sorted((d for d in os.listdir(ckpt) if d.startswith("step_")),
                       key=lambda d: int(d.split("_")[1]))
        cell["checkpoint_bytes"] = dir_bytes(os.path.join(ckpt, steps[-1])) if steps else None
        cell["checkpoint_dir"] = ckpt
        # "checkpoint <dir> written in <s> s" (torchrec_cce.checkpoint logs it, rank 0)
        cell["checkpoint_save_seconds"] = [
            float(line.rsplit(" written in ", 1)[1].split()[0]) for line in open(log, errors="replace")
            if line.startswith("checkpoint ") and " written in " in line]
        cell["_metrics"] = {k: m[k] for k in ("test_logloss", "test_auc", "evaluations",
                                              "train_loss_curve", "steps")}
    return cell


def exactness(straight: Dict[str, Any], killed: Dict[str, Any], resumed_from: Optional[int]) -> Dict[str, Any]:
    """Resume exactness of the killed run against the uninterrupted one (bitwise, CPU/gloo)."""
    a, b = straight["_metrics"], killed["_metrics"]
    after = [x for x in a["train_loss_curve"] if resumed_from is not None and x[0] > resumed_from]
    checks = {"test_logloss": a["test_logloss"] == b["test_logloss"],
              "test_auc": a["test_auc"] == b["test_auc"],
              "evaluations": a["evaluations"] == b["evaluations"],
              "steps": a["steps"] == b["steps"],
              "train_losses_after_resume": b["train_loss_curve"] == after}
    return {"exact": all(checks.values()), "checks": checks}


# ------------------------------------------------------------------------------------ driver
def load_results() -> Dict[str, Any]:
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            return json.load(f)
    return {"cells": {}}


def save_results(res: Dict[str, Any], mine: Sequence[str] = ()) -> None:
    """Write the cells this process wrote (keys ``mine``) into the file's current ones (runs at
    other sizes may share the file), ``res["cells"]`` becoming the merged set."""
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    disk = load_results()
    cells = {**disk.get("cells", {}), **{k: res["cells"][k] for k in mine}}
    res["cells"].clear()  # in place: callers hold a reference
    res["cells"].update(cells)
    res["settings"] = {**disk.get("settings", {}), **res.get("settings", {})}
    with open(RESULTS, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    write_table(res)


def write_table(res: Dict[str, Any]) -> None:
    mib = 2 ** 20
    lines = ["# Criteo-scale benchmark (`benchmarks/scale.py`)", "",
             "Generated by `benchmarks/scale.py` from `scale.json`; the sizes below are the ones that "
             "ran. Peak RSS is per rank (VmHWM), max over ranks, with the peak private part (RssAnon: "
             "without the page cache of the memory-mapped data, shared by the ranks) in brackets "
             "where recorded; predicted = the planner's "
             "embedding training bytes / world size, plus (cells run since the reservoirs were "
             "counted) CCE's id reservoirs and the largest table's estimated re-clustering "
             "workspace (the process baseline of "
             "torch + TorchRec is not in it; 'over planner_256' subtracts the peak (private where "
             "recorded) RSS of the 1/256 cell, whose tables are tiny, as an estimate of that baseline). 'vs full' "
             "marked * compares with a full cell of another invocation (other load); 'load' is "
             "the machine's 1-minute load average during the cell (median, max; the run alone "
             "is ~2 on 2 cores).", ""]
    sizes = sorted({int(k.split("/")[0]) for k in res["cells"]})
    for rows in sizes:
        c = {k.split("/", 1)[1]: v for k, v in res["cells"].items() if k.startswith(f"{rows}/")}
        lines += [f"## {rows:,} rows", ""]
        lines += ["| phase | method | wall s | rows/s or samples/s | vs full | recluster s | "
                  "peak RSS / rank MiB | over planner_256 MiB | predicted / rank MiB | "
                  "embedding MiB (full MiB) | test logloss | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        if "generate/data" in c:
            g = c["generate/data"]
            lines.append(f"| generate | - | {g['seconds']:.1f} | {g['rows_per_s']:,.0f} | | | | | | | | "
                         f"{g['bytes'] / mib:.1f} MiB TSV, {sum(g['cardinalities']):,} ids max |")
        if "preprocess/data" in c:
            p = c["preprocess/data"]
            lines.append(f"| preprocess | - | {p['seconds']:.1f} | {p['rows_per_s']:,.0f} | | | "
                         f"{p['peak_rss'] / mib:.0f} | | | | | {sum(p['vocab_sizes']):,} ids; imports included |")
        # "train": one epoch; "train@N": its first N steps (--max-steps)
        for phase in sorted({k.split("/")[0] for k in c if k.startswith("train")},
                            key=lambda p: (p != "train", p)):
            steps = phase.partition("@")[2]
            label = "train" if not steps else f"train ({int(steps):,} steps)"
            b256 = c.get(f"{phase}/planner_256", {})
            private = bool(b256.get("peak_anon_per_rank"))  # compare private with private
            base = b256.get("peak_anon_per_rank" if private else "peak_rss_per_rank")
            base = max(base.values()) / mib if base else None
            for m in METHODS + ("cce_replicated", "cce_fault"):
                t = c.get(f"{phase}/{m}")
                if t is None:
                    continue
                rss = max(t["peak_rss_per_rank"].values()) / mib if t["peak_rss_per_rank"] else float("nan")
                anon = max(t["peak_anon_per_rank"].values()) / mib if t.get("peak_anon_per_rank") else None
                over = None
                if base is not None and (anon is not None or not private):
                    over = (anon if private else rss) - base
                note = []
                if t.get("checkpoint_bytes"):
                    saves = ", ".join(f"{x:.1f}" for x in t.get("checkpoint_save_seconds", []))
                    note.append(f"checkpoint {t['checkpoint_bytes'] / mib:.1f} MiB, saves {saves} s")
                predicted = t["predicted_per_rank"]
                if "predicted_sample_bytes_per_rank" in t:
                    extra = (t["predicted_sample_bytes_per_rank"],
                             t["predicted_recluster_workspace_bytes"])
                    if any(extra):
                        note.append(f"predicted = tables {predicted / mib:.0f} + reservoirs "
                                    f"{extra[0] / mib:.0f} + re-clustering {extra[1] / mib:.0f} MiB")
                    predicted += sum(extra)
                if "exactness" in t:
                    note.append(f"killed after step {t['fault_at']}, resumed from "
                                f"{t['resumed_from_step']}, exact={t['exactness']['exact']}")
                ratio, mark = t.get("ratio_to_full"), ""
                # full ran in another invocation of this script (under other load): marked *
                if ratio is None and f"{phase}/full" in c and m not in ("full", "cce_fault"):
                    ratio, mark = t["samples_per_s"] / c[f"{phase}/full"]["samples_per_s"], "*"
                if t.get("eval_batches_per_rank"):
                    note.append(f"val/test: first {t['eval_batches_per_rank']} batches per rank")
                load = t.get("loadavg_1min") or {}
                if load.get("median") is not None:
                    note.append(f"load {load['median']:.1f} (max {load['max']:.1f})")
                lines.append(
                    f"| {label} | {m} | {t['seconds']:.1f} | {t['samples_per_s']:,.0f} | "
                    f"{'' if ratio is None else f'{ratio:.2f}x{mark}'} | {t['recluster_seconds']:.2f} | {rss:.0f}"
                    f"{'' if anon is None else f' ({anon:.0f})'} | {'' if over is None else f'{over:.0f}'} | "
                    f"{predicted / mib:.2f} | {t['embedding_bytes'] / mib:.2f} "
                    f"({t['full_embedding_bytes'] / mib:.2f}) | {t['test_logloss']:.4f} | {'; '.join(note)} |")
        lines.append("")
    with open(TABLE, "w") as f:
        f.write("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=KAGGLE_ROWS, help="rows to generate (default: Kaggle's)")
    p.add_argument("--train-txt", default=None, help="a real Criteo train.txt instead of generated data")
    p.add_argument("--work-dir", default=None, help="data, checkpoints, logs (default /tmp/scale_<rows>)")
    p.add_argument("--phases", default="generate,preprocess,train,fault")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch-size", type=int, default=None,
                   help="per-rank batch (default: 4096, less for small --rows so an epoch has >= 40 steps)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=None,
                   help="train the first N steps of the epoch only (re-clusterings at 1/4 and "
                        "1/2 of them, checkpoints every N/2); cells go to phase 'train@N'")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="evaluate on the first N val and test batches per rank (default: all)")
    p.add_argument("--force", action="store_true", help="redo finished cells")
    p.add_argument("--no-results", action="store_true", help="do not write benchmarks/results (tests)")
    args = p.parse_args(argv)
    rows = None if args.train_txt else args.rows
    tag = "real" if args.train_txt else str(args.rows)
    work = os.path.abspath(args.work_dir or f"/tmp/scale_{tag}")
    os.makedirs(work, exist_ok=True)
    res = {"cells": {}} if args.no_results else load_results()
    cells = res["cells"]
    before = dict(cells)  # the cell objects as last loaded or saved
    phases = args.phases.split(",")
    mine: set = set()  # cells this invocation wrote (so others' newer cells are never overwritten)

    def save() -> None:
        mine.update(k for k in cells if cells[k] is not before.get(k))
        if not args.no_results:
            save_results(res, sorted(mine))
        before.clear()
        before.update(cells)

    def done(key: str) -> bool:
        return key in cells and not args.force

    # 1. data
    tsv = args.train_txt or os.path.join(work, "train.tsv")
    key = f"{tag}/generate/data"
    if "generate" in phases and not args.train_txt and (not done(key) or not os.path.exists(tsv)):
        cells[key] = generate_tsv(tsv, args.rows)
        print(f"generate: {cells[key]['rows_per_s']:,.0f} rows/s", flush=True)
        save()
    # 2. preprocess
    out = os.path.join(work, "preprocessed")
    key = f"{tag}/preprocess/data"
    if "preprocess" in phases and (not done(key) or not os.path.exists(os.path.join(out, "meta.json"))):
        cells[key] = preprocess(tsv, out, rows, os.path.join(work, "preprocess.log"))
        print(f"preprocess: {cells[key]['rows_per_s']:,.0f} rows/s", flush=True)
        save()
    if not {"train", "fault"} & set(phases):
        return 0
    vocab = cells[f"{tag}/preprocess/data"]["vocab_sizes"]
    train_rows = cells[f"{tag}/preprocess/data"]["splits"]["train"]
    if args.batch_size is None:
        args.batch_size = int(min(4096, max(64, train_rows // (2 * 40))))
    epoch_steps = train_rows // (2 * args.batch_size)
    args.run_steps = min(epoch_steps, args.max_steps or epoch_steps)
    args.epoch_steps = epoch_steps
    args.checkpoint_every = max(1, args.run_steps // 2)
    full = full_bytes(vocab, args.dim)
    res.setdefault("settings", {})[tag] = {"batch_size_per_rank": args.batch_size, "world_size": 2,
                                          "epoch_steps": epoch_steps, "dim": args.dim,
                                          "full_fp32_bytes": full}
    # 3. train (ratios to full are within this invocation only); a --max-steps run is its own
    # phase, "train@<steps>", beside the whole-epoch "train"
    phase = "train" if args.run_steps == epoch_steps else f"train@{args.run_steps}"
    fresh: Dict[str, Dict[str, Any]] = {}
    for m in args.methods.split(","):
        key = f"{tag}/{phase}/{m}"
        if "train" in phases and not done(key):
            fresh[m] = cells[key] = train_cell(m, out, work, args, full)
            print(f"train {m}: {cells[key]['samples_per_s']:,.0f} samples/s", flush=True)
            save()
    if "full" in fresh:
        for m, cell in fresh.items():
            cell["ratio_to_full"] = cell["samples_per_s"] / fresh["full"]["samples_per_s"]
        save()
    # 4. fault: SIGKILL rank 1 right after the first checkpoint, resume, compare with cce
    key = f"{tag}/{phase}/cce_fault"
    if "fault" in phases and not done(key) and f"{tag}/{phase}/cce" in cells:
        fault_at = args.checkpoint_every + 1
        cell = train_cell("cce", out, work, args, full, fault_at=fault_at)
        cell["fault_at"] = fault_at
        cell["exactness"] = exactness(cells[f"{tag}/{phase}/cce"], cell, cell["resumed_from_step"])
        cells[key] = cell
        print(f"fault: resumed from {cell['resumed_from_step']}, exact={cell['exactness']['exact']}",
              flush=True)
        save()
    if not args.no_results:
        res["note"] = ("Sizes that ran are the keys of 'cells' (rows/phase/method). The full "
                       f"{KAGGLE_ROWS:,}-row run is NOT done yet: `python benchmarks/scale.py` "
                       "(resumable; ~2.5 h target on 2 cores).")
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
