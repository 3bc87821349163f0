"""k-means benchmarks; results are merged into ``benchmarks/results/kmeans.json``.

Sections (``--sections``, comma separated; default: all):

* ``search_vs_faiss_knn``: one exact nearest-centroid pass, our paths vs ``faiss.knn``
  (1 thread, CPU microseconds per row).
* ``kmeans_vs_faiss``: :func:`torchrec_cce.clustering.kmeans.kmeans` against ``faiss.Kmeans``
  on the same samples, timed side by side in one run (best of ``--reps``): ``n = 256 k``
  samples of dim 4 (a dim-16 table cut into 4 CCE chunks) and of dim 16, ``k = 4096``, 10
  Lloyd iterations, both initialised by a random draw of k samples (the same init budget;
  faiss: ``niter=10, nredo=1, max_points_per_centroid=256``, fixed seed, not spherical). Two
  sample distributions: ``gaussian`` (isotropic, no structure: the worst case for pruning)
  and ``mixture`` (1024 Gaussian components of random scale: clustered, like trained
  embedding chunks). Both inertias are measured the same way, against the *final* centroids
  (faiss' own ``obj`` is that of the centroids before its last update).
  Our run also performs the extra assignment pass that makes ``assignment``/``inertia``
  consistent with the final centroids (faiss skips it), so it does 11 assignment passes to
  faiss' 10. Ours is the exact search of :class:`~torchrec_cce.clustering.kmeans.CentroidIndex`
  (compiled kernels when they build: ``native_kernel``; bounding-box pruned where a probe shows
  the boxes prune: ``grouped_kernel``). ``*_cpu_s``: process CPU seconds (both use 2 threads),
  ``cpu_ratio`` their ratio (less sensitive to other jobs on a shared machine than ``ratio``).
  ``ours_kmeanspp_s`` is our k-means++ initialisation (on the replicated init
  pool) for reference; it is not part of the ratio.

* ``seeding``: seeding quality, ``kmeans++`` vs ``kmeans||`` (at each round growth of
  ``--growths``) vs ``random`` (mean k-means objective over ``--seeds`` seeds right after seeding
  and after each of ``--seeding-steps`` Lloyd steps, and each seeding's ratio to k-means++;
  rows under ``--seeding-key``): on real trained chunk vectors (a dim-16 logistic matrix
  factorisation of the shared Yelp2018 user-item data, trained for one epoch; its user and
  item tables cut into 4 chunks of dim 4, clustered per chunk as re-clustering does) and on
  planted clusters (well-separated Gaussians of unequal spread, k = 4 per cluster), at
  ``k`` in ``--seeding-k``.

Usage::

    python benchmarks/kmeans.py                 # full run (a few minutes on 2 cores)
    python benchmarks/kmeans.py --quick         # smoke run, k = 256
    python benchmarks/kmeans.py --sections kmeans_vs_faiss --threads 1
"""

import argparse
import functools
import itertools
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torchrec_cce.clustering import kmeans as kmeans_module  # noqa: E402
from torchrec_cce.clustering import native  # noqa: E402
from torchrec_cce.clustering.kmeans import kmeans, nearest_centroid  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kmeans.json")


def _data(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, d, generator=g)
    if kind == "mixture":
        comps = 1024
        centres = 2.0 * torch.randn(comps, d, generator=g)
        scale = 0.1 + 0.4 * torch.rand(comps, 1, generator=g)
        lab = torch.randint(0, comps, (n,), generator=g)
        return centres[lab] + scale[lab] * torch.randn(n, d, generator=g)
    raise ValueError(kind)


def _best_of(reps: int, fn: Callable[[], Any]):
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _kmeans_vs_faiss_row(faiss, kind: str, d: int, k: int, iters: int, threads: int,
                         reps: int, init_timing: bool = True) -> Dict[str, Any]:
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    load_before = os.getloadavg()[0]
    n = 256 * k
    x = _data(kind, n, d, seed=d)
    xn = x.numpy()

    def ours():
        return kmeans(x, k, iters=iters, seed=0, init="random", tol=0)

    def theirs():
        km = faiss.Kmeans(d, k, niter=iters, nredo=1, max_points_per_centroid=256, seed=1234,
                          spherical=False, verbose=False)
        km.train(xn)
        return km

    ours_s = faiss_s = ours_cpu = faiss_cpu = float("inf")
    res = km = None
    for _ in range(reps):  # interleaved, so both see the same machine load
        c = time.process_time()
        t, res = _best_of(1, ours)
        ours_s, ours_cpu = min(ours_s, t), min(ours_cpu, time.process_time() - c)
        c = time.process_time()
        t, km = _best_of(1, theirs)
        faiss_s, faiss_cpu = min(faiss_s, t), min(faiss_cpu, time.process_time() - c)
    _, fd2 = nearest_centroid(x, torch.from_numpy(km.centroids), method="auto")
    faiss_inertia = float(fd2.double().sum())
    extra = {}
    if init_timing:
        pp_s, pp = _best_of(1, lambda: kmeans(x, k, iters=iters, seed=0, init="kmeans++", tol=0))
        pp_init_s, _ = _best_of(1, lambda: kmeans(x, k, iters=0, seed=0, init="kmeans++"))
        extra = dict(ours_kmeanspp_s=round(pp_s, 3),
                     ours_kmeanspp_init_plus_one_pass_s=round(pp_init_s, 3),
                     ours_kmeanspp_inertia=round(pp.inertia, 2))
    return dict(dataset=kind, n=n, d=d, k=k, iters=iters, threads=threads,
                ours_s=round(ours_s, 3), faiss_s=round(faiss_s, 3),
                ratio=round(ours_s / faiss_s, 3), ours_cpu_s=round(ours_cpu, 3),
                faiss_cpu_s=round(faiss_cpu, 3), cpu_ratio=round(ours_cpu / faiss_cpu, 3),
                ours_inertia=round(res.inertia, 2), faiss_inertia=round(faiss_inertia, 2),
                inertia_ratio=round(res.inertia / faiss_inertia, 4),
                faiss_obj_last=round(float(km.obj[-1]), 2),
                ours_iters_run=res.iters_run, ours_reseeded=res.reseeded,
                native_kernel=native.available(), grouped_kernel=native.grouped_supported(),
                **extra,
                loadavg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)])


def kmeans_vs_faiss(args: argparse.Namespace) -> Dict[str, Any]:
    """Our k-means vs faiss.Kmeans, same samples, same iterations, same init budget."""
    import faiss  # the comparison needs it: pip install faiss-cpu

    k = 256 if args.quick else 4096
    rows: List[Dict[str, Any]] = []
    for threads, kind, d in itertools.product(
            [int(t) for t in str(args.threads).split(",")], args.datasets.split(","), (4, 16)):
        row = _kmeans_vs_faiss_row(faiss, kind, d, k, 10, threads, args.reps,
                                   not args.skip_init_timing)
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = dict(torch=torch.__version__, faiss=faiss.__version__, cpu_count=os.cpu_count(),
                machine=platform.processor() or platform.machine(), reps=args.reps,
                quick=bool(args.quick), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                note=("ratio = ours_s / faiss_s, each the best of `reps` interleaved runs on a "
                      "shared machine (loadavg_1min: before/after). Ours: 10 Lloyd updates + 11 "
                      "assignment passes (the last makes assignment/inertia match the final "
                      "centroids); faiss: 10 passes. Both inertias are against the final "
                      "centroids; faiss_obj_last is faiss' own last objective. cpu_ratio: the "
                      "same with process CPU seconds."))
    return {"kmeans_vs_faiss": rows, "kmeans_vs_faiss_meta": meta}


def search_vs_faiss_knn(args: argparse.Namespace) -> Dict[str, Any]:
    """One nearest-centroid pass (what a Lloyd iteration and the all-ids pass do) of
    ``n = 2**18`` rows against ``k = 4096`` centroids (drawn from the data), on 1 thread, by
    our search paths and by ``faiss.knn(x, c, 1)``, interleaved; the best of ``--reps``."""
    import faiss

    from torchrec_cce.clustering.kmeans import CentroidIndex

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    n, k = (1 << 14, 256) if args.quick else (1 << 18, 4096)
    rows: List[Dict[str, Any]] = []
    for kind, d in itertools.product(args.datasets.split(","), (4, 16)):
        x = _data(kind, n + k, d, seed=100 + d)
        x, c = x[:n].contiguous(), x[n:].contiguous()
        paths: Dict[str, Callable[[], Any]] = {
            "faiss_knn": lambda: faiss.knn(x.numpy(), c.numpy(), 1)}
        for method in ("auto", "grouped", "native"):
            if method == "grouped" and not native.grouped_supported():
                continue
            if method == "native" and not native.available():
                continue
            paths[method] = functools.partial(
                lambda m: CentroidIndex(c, method=m).brute_force(x), method)
        best = {name: float("inf") for name in paths}
        for _ in range(args.reps):
            for name, fn in paths.items():
                t = time.process_time()
                fn()
                best[name] = min(best[name], time.process_time() - t)
        row = dict(dataset=kind, d=d, n=n, k=k, threads=1,
                   **{f"{name}_cpu_us_per_row": round(1e6 * v / n, 3) for name, v in best.items()},
                   auto_vs_faiss_knn=round(best["auto"] / best["faiss_knn"], 3),
                   loadavg_1min=round(os.getloadavg()[0], 2))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"search_vs_faiss_knn": rows,
            "search_vs_faiss_knn_meta": dict(
                date=time.strftime("%Y-%m-%d %H:%M:%S"), reps=args.reps, faiss=faiss.__version__,
                note="process CPU microseconds per row of one exact nearest-centroid pass, 1 "
                     "thread, best of reps, paths interleaved; auto = what kmeans/recluster "
                     "use (grouped where a probe shows the boxes prune, else native)")}


SECTIONS: Dict[str, Callable[[argparse.Namespace], Dict[str, Any]]] = {
    "kmeans_vs_faiss": kmeans_vs_faiss,
    "search_vs_faiss_knn": search_vs_faiss_knn,
}


# <repo>/../shared/data (as benchmarks/quality.py); $TORCHREC_CCE_SHARED_DATA overrides it
YELP = os.path.join(os.environ.get("TORCHREC_CCE_SHARED_DATA", os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))), "yelp2018.csv")


def _trained_chunks(path: str, dim: int = 16, chunks: int = 4, seed: int = 0) -> torch.Tensor:
    """``[chunks, users + items, dim / chunks]``: the tables of a logistic matrix factorisation
    ``sigmoid(u . v)`` of ``label,user,item`` rows, one epoch of Adagrad (batch 4096)."""
    data = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64)
    y, users, items = (torch.from_numpy(data[:, i].copy()) for i in range(3))
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.Embedding(int(users.max()) + 1, dim, sparse=True)
    v = torch.nn.Embedding(int(items.max()) + 1, dim, sparse=True)
    for e in (u, v):
        torch.nn.init.normal_(e.weight, std=0.1, generator=g)
    opt = torch.optim.Adagrad(list(u.parameters()) + list(v.parameters()), lr=0.05)
    order = torch.randperm(y.numel(), generator=g)
    for lo in range(0, y.numel(), 4096):
        b = order[lo: lo + 4096]
        logit = (u(users[b]) * v(items[b])).sum(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y[b].float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = torch.cat([u.weight.detach(), v.weight.detach()])
    return w.view(w.shape[0], chunks, dim // chunks).transpose(0, 1).contiguous()


def _planted(clusters: int, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = 20 * torch.randn(clusters, d, generator=g)
    scale = 0.1 + 0.4 * torch.rand(clusters, 1, generator=g)
    lab = torch.randint(0, clusters, (n,), generator=g)
    return centres[lab] + scale[lab] * torch.randn(n, d, generator=g)


def _seeding_variants(growths: List[float]) -> Dict[str, Any]:
    """label -> (init, k-means|| growth or None): k-means++, k-means|| at each growth, random."""
    out: Dict[str, Any] = {"kmeans++": ("kmeans++", None)}
    for g in growths:
        out["kmeans||" if g == kmeans_module.KMEANS_PARALLEL_GROWTH else f"kmeans||@{g:g}"] = (
            "kmeans||", g)
    out["random"] = ("random", None)
    return out


def _kmeans_with_growth(growth, *args, **kwargs):
    """:func:`kmeans` whose k-means|| rounds grow by ``growth`` (None: the library default)."""
    if growth is None:
        return kmeans(*args, **kwargs)
    orig = kmeans_module._kmeans_parallel
    kmeans_module._kmeans_parallel = functools.partial(orig, growth=growth)
    try:
        return kmeans(*args, **kwargs)
    finally:
        kmeans_module._kmeans_parallel = orig


def seeding(args: argparse.Namespace) -> Dict[str, Any]:
    """Seeding quality (k-means objective) of kmeans++ / kmeans|| (at each ``--growths``) /
    random, same data, right after seeding and after each of ``--seeding-steps`` Lloyd steps."""
    variants = _seeding_variants([float(g) for g in args.growths.split(",")])
    steps = [int(s) for s in args.seeding_steps.split(",")]
    ks = [int(k) for k in args.seeding_k.split(",")]
    sets = {}
    if os.path.exists(args.yelp):
        for c, x in enumerate(_trained_chunks(args.yelp)):
            sets[f"yelp2018_mf_chunk{c}"] = x
    for k in ks:
        sets[f"planted_{k // 4}_clusters"] = _planted(k // 4, 64 * k, 4, seed=k)
    rows = []
    for name, x in sets.items():
        for k in ks:
            if name.startswith("planted") and not name.endswith(f"_{k // 4}_clusters"):
                continue
            row: Dict[str, Any] = {"data": name, "n": int(x.shape[0]), "d": int(x.shape[1]),
                                   "k": k, "seeds": args.seeds}
            for label, (init, growth) in variants.items():
                r0, secs = [], []
                after: Dict[int, List[float]] = {s: [] for s in steps}
                for s in range(args.seeds):
                    t = time.process_time()
                    r0.append(_kmeans_with_growth(growth, x, k, iters=0, seed=s, init=init).inertia)
                    secs.append(time.process_time() - t)
                    for n_steps in steps:
                        after[n_steps].append(_kmeans_with_growth(
                            growth, x, k, iters=n_steps, seed=s, init=init, tol=0).inertia)
                row[label] = {"seeded": sum(r0) / len(r0),
                              "seed_plus_one_pass_cpu_s": round(min(secs), 3),
                              **{f"after_{n}": sum(v) / len(v) for n, v in after.items()}}
            for label in variants:
                for key in ["seeded"] + [f"after_{n}" for n in steps]:
                    row[label][f"{key}_vs_kmeanspp"] = round(row[label][key]
                                                            / row["kmeans++"][key], 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {args.seeding_key: rows, f"{args.seeding_key}_meta": {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": torch.get_num_threads(),
        "growth": kmeans_module.KMEANS_PARALLEL_GROWTH, "growths": args.growths,
        "lloyd_steps": args.seeding_steps,
        "loadavg_1min": round(os.getloadavg()[0], 2)}}


SECTIONS["seeding"] = seeding


def _merge(path: str, update: Dict[str, Any]) -> None:
    data: Dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update(update)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="small smoke run (k = 256)")
    p.add_argument("--reps", type=int, default=3, help="timing repetitions (best of)")
    p.add_argument("--threads", default=str(os.cpu_count() or 1),
                   help="torch and faiss threads; comma-separated for several runs (e.g. 1,2)")
    p.add_argument("--skip-init-timing", action="store_true",
                   help="skip the k-means++ reference timings (faster run)")
    p.add_argument("--datasets", default="gaussian,mixture", help="kmeans_vs_faiss data")
    p.add_argument("--seeding-k", default="1024,4096", help="seeding section: k values")
    p.add_argument("--seeds", type=int, default=3, help="seeding section: seeds per cell")
    p.add_argument("--growths", default=f"{kmeans_module.KMEANS_PARALLEL_GROWTH:g},2",
                   help="seeding section: k-means|| round growth factors compared")
    p.add_argument("--seeding-key", default="seeding",
                   help="seeding section: JSON key of its rows (and <key>_meta)")
    p.add_argument("--seeding-steps", default="3,10",
                   help="seeding section: Lloyd steps after which the objective is recorded")
    p.add_argument("--yelp", default=YELP, help="seeding section: label,user,item csv")
    p.add_argument("--out", default=RESULTS, help="JSON file to merge the results into")
    args = p.parse_args(argv)
    for name in args.sections.split(","):
        if name not in SECTIONS:
            p.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    for name in args.sections.split(","):
        _merge(args.out, SECTIONS[name](args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
