"""GPU check of torchrec_cce's CUDA kernels, runnable with nothing but torch (+ a compiler).

``scripts/gpu_check.sh`` runs this on a CUDA machine that has PyTorch (>= 2.4) and nvcc but
neither TorchRec nor fbgemm-gpu, and no network. It loads ``torchrec_cce/ops/__init__.py``,
``torchrec_cce/hashing.py`` and ``torchrec_cce/methods/packed.py`` by file path (importing the
``torchrec_cce`` package would import TorchRec), builds the op library (with
``remap_cuda.cu`` where CUDA exists) and checks, on random inputs:

* CPU part (always): the C++ CPU kernel of ``torchrec_cce::remap`` against a pure-torch
  reference written here (every stream kind: identity with its range check, hash, CCE pairs
  with hash fallback / packed assignments of several bit widths / precomputed ``p`` / QR init
  with ``qr_mul``, ``qr_add``, kept remainder, QR quotient and remainder; weighted bags,
  float16 weights, int32 lengths, empty bags), and ``remap_weight_grad``.
* GPU part (where CUDA is available): the CUDA kernel against the CPU kernel (exact) and the
  reference on the device, the same cases, then timings of both on a Criteo-shaped batch.

``tbe.cpp`` and ``compose.cpp`` are CPU-only kernels (no CUDA implementation: on GPUs the
modules use fbgemm's TBE and torch ops), so they are not part of the GPU check.

Prints one summary line; exit code 0 when every check passed (GPU part skipped without CUDA).
"""

import argparse
import glob
import importlib.util
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str, relpath: str):  # noqa: ANN202
    """Import one file of the package by path, without running ``torchrec_cce/__init__.py``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ops = _load("torchrec_cce_gpu_check_ops", "torchrec_cce/ops/__init__.py")
hashing = _load("torchrec_cce_gpu_check_hashing", "torchrec_cce/hashing.py")
packed = _load("torchrec_cce_gpu_check_packed", "torchrec_cce/methods/packed.py")

# Spec columns (csrc/remap.h).
FEATURE, KIND, ROWS, OFFSET, KEY, HKEY, GEN, ASSIGN, ASSIGN_LO, PRE, COLUMN, NUM_IDS, \
    ASSIGN_COUNT, BITS, CHUNKS, QR_MUL, QR_ADD, KEEP_REMAINDER = range(ops.SPEC_COLUMNS)
IDENTITY, HASH, CCE, QR_Q, QR_R = (ops.KINDS[k] for k in
                                   ("identity", "hash", "cce_pair", "qr_quotient", "qr_remainder"))
OUT_OF_RANGE = "is outside [0, "  # the op's documented error for an id outside a full table


class Case:
    """One call of the remap op: its inputs, and ``p`` values behind each packed assignment
    (the reference reads those, not the packed words)."""

    def __init__(self, name: str, ids: torch.Tensor, lengths: torch.Tensor,
                 weights: Optional[torch.Tensor], batch: int, spec: List[List[int]],
                 generations: Sequence[torch.Tensor] = (),
                 assignment_values: Sequence[torch.Tensor] = (),
                 precomputed: Sequence[torch.Tensor] = (), bad: bool = False):
        self.name, self.ids, self.lengths, self.weights = name, ids, lengths, weights
        self.batch = batch
        self.spec = torch.tensor(spec, dtype=torch.int64).reshape(-1, ops.SPEC_COLUMNS)
        self.generations = list(generations)
        self.assignment_values = list(assignment_values)
        bits = {}
        for row in spec:
            if row[KIND] == CCE and row[ASSIGN] >= 0:
                bits[row[ASSIGN]] = row[BITS]
        self.assignments = [packed.pack(v, bits.get(i, 0)) for i, v in enumerate(assignment_values)]
        self.precomputed = list(precomputed)
        self.bad = bad

    def args(self, device: str) -> tuple:
        """The op's arguments with every tensor (but ``spec``) on ``device``."""
        move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        return (self.ids.to(device), self.lengths.to(device),
                None if self.weights is None else self.weights.to(device), self.batch, self.spec,
                move(self.generations), move(self.assignments), move(self.precomputed))


# ------------------------------------------------------------------ pure-torch reference
def reference(ids: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor],
              batch: int, spec: torch.Tensor, generations: Sequence[torch.Tensor],
              assignment_values: Sequence[torch.Tensor], precomputed: Sequence[torch.Tensor]
              ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """What ``torchrec_cce::remap`` computes (``csrc/remap.h``), stream by stream in torch ops.
    Packed assignments are given as their unpacked ``[count, chunks]`` values."""
    num_features = lengths.numel() // batch if batch else 0
    lens = lengths.view(num_features, batch)
    bounds = [0] + torch.cumsum(lens.sum(1).to(torch.int64), 0).tolist()
    values, out_lengths, out_weights = [], [], []
    for row in spec.tolist():
        f, kind, rows, offset = row[FEATURE], row[KIND], row[ROWS], row[OFFSET]
        x = ids[bounds[f]:bounds[f + 1]]
        if kind == IDENTITY:
            if bool(((x < 0) | (x >= rows)).any()):
                raise ValueError(f"id {OUT_OF_RANGE}{rows})")
            v = x
        elif kind == HASH:
            v = hashing.hash_ids(x, row[KEY], rows)
        elif kind in (QR_Q, QR_R):
            y = torch.remainder(x, row[NUM_IDS])
            v = torch.div(y, rows, rounding_mode="floor") if kind == QR_Q else y % rows
        elif kind == CCE:
            gen = int(generations[row[GEN]]) if row[GEN] >= 0 else 1
            h_key = (int(hashing.combine_keys(row[HKEY], torch.tensor(gen))) if row[GEN] >= 0
                     else row[HKEY])
            qa, qb, num_ids = row[QR_MUL], row[QR_ADD], row[NUM_IDS]
            xq = torch.remainder(torch.remainder(x, num_ids) * qa + qb, num_ids) if qa else None
            if row[PRE] >= 0:
                p = precomputed[row[PRE]][:, row[COLUMN]].to(x.device)
            else:
                p = (torch.div(xq, rows, rounding_mode="floor") % rows if qa
                     else hashing.hash_ids(x, row[KEY], rows))
                if row[ASSIGN] >= 0:
                    local = x - row[ASSIGN_LO]
                    inside = (local >= 0) & (local < row[ASSIGN_COUNT])
                    table = assignment_values[row[ASSIGN]].to(x.device)
                    p = torch.where(inside, table[local.clamp(0, max(table.shape[0] - 1, 0)),
                                                  row[COLUMN]] if table.shape[0] else p, p)
            remainder_h = qa and (row[KEEP_REMAINDER] or gen == 0)
            h = xq % rows if remainder_h else hashing.hash_ids(x, h_key, rows)
            v = torch.stack([p, rows + h], 1).reshape(-1)
        else:
            raise ValueError(f"unknown kind {kind}")
        k = 2 if kind == CCE else 1
        values.append(v + offset)
        out_lengths.append(lens[f] * k)
        if weights is not None:
            out_weights.append(weights[bounds[f]:bounds[f + 1]].repeat_interleave(k))
    cat = lambda ts, like: torch.cat(ts) if ts else like.new_empty(0)  # noqa: E731
    return (cat(values, ids), cat(out_lengths, lengths),
            cat(out_weights, weights) if weights is not None else None)


def reference_weight_grad(grad: torch.Tensor, lengths: torch.Tensor, batch: int,
                          spec: torch.Tensor, num_ids: int) -> torch.Tensor:
    """Gradient of remap's weights w.r.t. the input weights: each value's back to its id."""
    num_features = lengths.numel() // batch
    counts = lengths.view(num_features, batch).sum(1).to(torch.int64)
    bounds = [0] + torch.cumsum(counts, 0).tolist()
    out = torch.zeros(num_ids, dtype=torch.float64, device=grad.device)
    pos = 0
    for row in spec.tolist():
        f, k = row[FEATURE], 2 if row[KIND] == CCE else 1
        n = bounds[f + 1] - bounds[f]
        out[bounds[f]:bounds[f + 1]] += grad[pos:pos + k * n].double().view(n, k).sum(1)
        pos += k * n
    return out


# ------------------------------------------------------------------ random cases
def _row(**kw) -> List[int]:  # noqa: ANN003
    kind = kw.pop("kind")
    return ops.spec_row(kind=kind, **kw)


def _bags(g: torch.Generator, features: int, batch: int, max_len: int,
          lengths_dtype: torch.dtype = torch.int64, empty_feature: int = -1) -> torch.Tensor:
    """Random bag lengths, about a third of them empty (and one whole feature if asked)."""
    lens = torch.randint(0, max_len + 1, (features, batch), generator=g)
    lens[torch.rand(features, batch, generator=g) < 0.3] = 0
    if 0 <= empty_feature < features:
        lens[empty_feature] = 0
    return lens.flatten().to(lengths_dtype)


def _ids(g: torch.Generator, n: int, lo: int, hi: int) -> torch.Tensor:
    return torch.randint(lo, hi, (n,), generator=g, dtype=torch.int64)


def _big(g: torch.Generator, n: int) -> torch.Tensor:
    """Arbitrary int64 ids (negative, Criteo-style 64-bit hashes)."""
    return torch.randint(-(2 ** 63), 2 ** 63 - 1, (n,), generator=g, dtype=torch.int64)


def make_cases(seed: int, batch: int = 64, max_len: int = 6) -> List[Case]:
    """Every stream kind and option of the op, on random inputs."""
    g = torch.Generator().manual_seed(seed)
    key = lambda: int(torch.randint(0, 2 ** 62, (1,), generator=g))  # noqa: E731
    cases = []

    lens = _bags(g, 2, batch, max_len, empty_feature=1)
    cases.append(Case("identity", _ids(g, int(lens.sum()), 0, 1000), lens, None, batch,
                      [_row(feature=0, kind="identity", rows=1000, offset=17),
                       _row(feature=1, kind="identity", rows=5)]))

    lens = _bags(g, 3, batch, max_len)
    n = int(lens.sum())
    cases.append(Case("hash", torch.cat([_big(g, n // 2), _ids(g, n - n // 2, 0, 100)]), lens,
                      None, batch,
                      [_row(feature=0, kind="hash", rows=4096, key=key(), offset=3),
                       _row(feature=1, kind="hash", rows=1000003, key=key()),
                       _row(feature=2, kind="hash", rows=1, key=key()),
                       _row(feature=0, kind="hash", rows=97, key=key(), offset=4096)]))

    lens = _bags(g, 2, batch, max_len)
    num_ids, m = 100_000, 317
    cases.append(Case("qr", torch.cat([_ids(g, int(lens.sum()) - 8, -num_ids, 3 * num_ids),
                                       _big(g, 8)]), lens, None, batch,
                      [_row(feature=0, kind="qr_quotient", rows=-(-num_ids // m), num_ids=num_ids),
                       _row(feature=0, kind="qr_remainder", rows=m, num_ids=num_ids, offset=400),
                       _row(feature=1, kind="qr_remainder", rows=m, num_ids=num_ids)]))

    # CCE with the hash fallback only, with and without a generation.
    lens = _bags(g, 2, batch, max_len)
    gens = [torch.tensor(0), torch.tensor(3)]
    cce = [_row(feature=f, kind="cce_pair", rows=r, key=key(), h_key=key(), generation=gen,
                offset=off, column=c, chunks=2)
           for f, r, gen in ((0, 1000, -1), (1, 4096, 1)) for c, off in ((0, 0), (1, 2 * r))]
    cases.append(Case("cce_hash", _big(g, int(lens.sum())), lens, None, batch, cce, gens))

    # CCE reading packed assignments of several bit widths (ids partly outside [lo, lo + count)).
    for rows, chunks in ((1, 2), (2, 1), (7, 3), (1000, 4), (70_000, 2), (2 ** 31 - 5, 2)):
        bits = packed.bits_for(rows)
        count, lo = 3000, 500
        lens = _bags(g, 1, batch, max_len)
        ids = _ids(g, int(lens.sum()), lo - 200, lo + count + 200)
        p_values = torch.randint(0, rows, (count, chunks), generator=g, dtype=torch.int64)
        spec = [_row(feature=0, kind="cce_pair", rows=rows, key=key(), h_key=key(),
                     assignment=0, assignment_lo=lo, assignment_count=count, bits=bits,
                     chunks=chunks, column=c, offset=2 * rows * c) for c in range(chunks)]
        cases.append(Case(f"cce_packed_{bits}bit", ids, lens, None, batch, spec,
                          assignment_values=[p_values]))

    # CCE with precomputed p (fetched from the owning ranks).
    lens = _bags(g, 2, batch, max_len)
    n0 = int(lens[:batch].sum())
    n1 = int(lens.sum()) - n0
    pre = [torch.randint(0, 512, (n0, 3), generator=g), torch.randint(0, 512, (n1, 3), generator=g)]
    spec = [_row(feature=f, kind="cce_pair", rows=512, key=key(), h_key=key(), generation=0,
                 precomputed=f, column=c, chunks=3, offset=1024 * c)
            for f in range(2) for c in range(3)]
    cases.append(Case("cce_precomputed", _big(g, n0 + n1), lens, None, batch, spec,
                      [torch.tensor(2)], precomputed=pre))

    # CCE init="qr": qr_mul / qr_add, h = remainder at generation 0 or when kept, else hashed;
    # ids inside a packed assignment and outside it (QR fallback).
    num_ids, rows, count, lo = 50_000, 224, 2000, 100
    lens = _bags(g, 2, batch, max_len)
    ids = torch.cat([_ids(g, int(lens.sum()) - 16, -num_ids, 2 * num_ids), _big(g, 16)])
    p_values = torch.randint(0, rows, (count, 2), generator=g, dtype=torch.int64)
    gens = [torch.tensor(0), torch.tensor(1)]
    spec = []
    for f, gen, keep, assignment in ((0, 0, 0, -1), (0, 1, 0, 0), (1, 1, 1, 0), (1, 0, 0, 0)):
        for c in range(2):
            qa = int(torch.randint(1, num_ids, (1,), generator=g)) | 1
            spec.append(_row(feature=f, kind="cce_pair", rows=rows, key=key(), h_key=key(),
                             generation=gen, assignment=assignment, assignment_lo=lo,
                             assignment_count=count if assignment >= 0 else 0,
                             bits=packed.bits_for(rows), chunks=2, column=c, num_ids=num_ids,
                             qr_mul=qa, qr_add=int(torch.randint(0, num_ids, (1,), generator=g)),
                             keep_remainder=bool(keep), offset=2 * rows * c))
    cases.append(Case("cce_qr_init", ids, lens, None, batch, spec, gens,
                      assignment_values=[p_values]))

    # Everything at once, weighted, int32 lengths; then float16 weights; then all bags empty.
    for name, wdtype, ldtype, empty in (("mixed_weighted", torch.float32, torch.int32, False),
                                        ("mixed_weighted_fp16", torch.float16, torch.int64, False),
                                        ("empty_bags", torch.float32, torch.int64, True)):
        lens = _bags(g, 4, batch, max_len, ldtype)
        if empty:
            lens.zero_()
        n0 = int(lens[:batch].sum())
        ids = torch.cat([_ids(g, n0, 0, 300), _big(g, int(lens.sum()) - n0)])
        p_values = torch.randint(0, 256, (5000, 2), generator=g, dtype=torch.int64)
        spec = [_row(feature=0, kind="identity", rows=300),
                _row(feature=1, kind="hash", rows=999, key=key(), offset=300),
                _row(feature=2, kind="qr_quotient", rows=40, num_ids=1600),
                _row(feature=2, kind="qr_remainder", rows=40, num_ids=1600, offset=40),
                *[_row(feature=3, kind="cce_pair", rows=256, key=key(), h_key=key(), generation=0,
                       assignment=0, assignment_lo=-2500, assignment_count=5000, bits=8,
                       chunks=2, column=c, offset=512 * c) for c in range(2)],
                _row(feature=1, kind="cce_pair", rows=64, key=key(), h_key=key())]
        weights = torch.rand(int(lens.sum()), generator=g).to(wdtype)
        cases.append(Case(name, ids, lens, weights, batch, spec, [torch.tensor(5)],
                          assignment_values=[p_values]))

    # Out-of-range ids of a full table: the op raises.
    lens = _bags(g, 1, batch, max_len)
    lens[0] = 2
    ids = _ids(g, int(lens.sum()), 0, 50)
    ids[1] = 50
    cases.append(Case("out_of_range", ids, lens, None, batch,
                      [_row(feature=0, kind="identity", rows=50)], bad=True))
    lens = _bags(g, 1, batch, max_len)
    lens[0] = 1
    ids = _ids(g, int(lens.sum()), 0, 50)
    ids[0] = -1
    cases.append(Case("negative_id", ids, lens, None, batch,
                      [_row(feature=0, kind="identity", rows=50)], bad=True))
    return cases


# ------------------------------------------------------------------ checks
class Results:
    def __init__(self) -> None:
        self.passed: Dict[str, int] = {}
        self.failed: List[str] = []

    def record(self, part: str, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            self.passed[part] = self.passed.get(part, 0) + 1
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            self.failed.append(f"{part}:{name}")
            print(f"FAIL {part} {name}: {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                  file=sys.stderr)
            if os.environ.get("GPU_CHECK_TRACEBACK"):
                traceback.print_exc()


def _same(name: str, got: Tuple, want: Tuple, exact_weights: bool = True) -> None:
    gv, gl, gw = got
    wv, wl, ww = want
    for what, a, b in (("values", gv, wv), ("lengths", gl, wl)):
        a, b = a.cpu(), b.cpu()
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            bad = (a != b).nonzero()[:3].flatten().tolist() if a.shape == b.shape else "shape"
            raise AssertionError(f"{name}: {what} differ ({a.dtype}{tuple(a.shape)} vs "
                                 f"{b.dtype}{tuple(b.shape)}; first at {bad})")
    if (gw is None) != (ww is None):
        raise AssertionError(f"{name}: weights present in one output only")
    if gw is not None and (gw.dtype != ww.dtype or not torch.equal(gw.cpu(), ww.cpu())):
        raise AssertionError(f"{name}: weights differ")


def _expect_out_of_range(fn: Callable[[], object]) -> None:
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        if OUT_OF_RANGE not in str(e):
            raise AssertionError(f"wrong error for an out-of-range id: {e}") from e
        return
    raise AssertionError("an out-of-range id was accepted")


def _ref(case: Case, device: str):  # noqa: ANN202
    ids, lengths, weights, batch, spec, gens, _, pre = case.args(device)
    return reference(ids, lengths, weights, batch, spec, gens,
                     [v.to(device) for v in case.assignment_values], pre)


def check_cpu(cases: List[Case], results: Results, seed: int) -> None:
    """The C++ CPU kernel against the pure-torch reference."""
    for case in cases:
        def run(case: Case = case) -> None:
            if case.bad:
                _expect_out_of_range(lambda: _ref(case, "cpu"))
                _expect_out_of_range(lambda: torch.ops.torchrec_cce.remap(*case.args("cpu")))
                return
            _same(case.name, ops.remap(*case.args("cpu")), _ref(case, "cpu"))
        results.record("cpu", case.name, run)

    def grad() -> None:
        case = next(c for c in cases if c.name == "mixed_weighted")
        values, _, _ = ops.remap(*case.args("cpu"))
        g = torch.randn(values.numel(), generator=torch.Generator().manual_seed(seed))
        got = torch.ops.torchrec_cce.remap_weight_grad(g, case.lengths, case.batch, case.spec,
                                                       case.ids.numel())
        want = reference_weight_grad(g, case.lengths, case.batch, case.spec, case.ids.numel())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    results.record("cpu", "weight_grad", grad)


def check_cuda(cases: List[Case], results: Results, seed: int) -> None:
    """The CUDA kernel against the CPU kernel (exact) and the torch reference on the device."""
    for case in cases:
        def run(case: Case = case) -> None:
            if case.bad:
                _expect_out_of_range(lambda: torch.ops.torchrec_cce.remap(*case.args("cuda")))
                return
            got = ops.remap(*case.args("cuda"))
            if got[0].numel() and not got[0].is_cuda:
                raise AssertionError(f"{case.name}: output not on the GPU")
            _same(case.name, got, ops.remap(*case.args("cpu")))
            _same(case.name + " (device reference)", got, _ref(case, "cuda"))
        results.record("cuda", case.name, run)

    def grad() -> None:
        case = next(c for c in cases if c.name == "mixed_weighted")
        values, _, _ = ops.remap(*case.args("cpu"))
        g = torch.randn(values.numel(), generator=torch.Generator().manual_seed(seed))
        args = (case.lengths, case.batch, case.spec, case.ids.numel())
        got = torch.ops.torchrec_cce.remap_weight_grad(g.cuda(), case.lengths.cuda(), *args[1:])
        want = torch.ops.torchrec_cce.remap_weight_grad(g, *args)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    results.record("cuda", "weight_grad", grad)

    def autograd() -> None:  # the registered autograd formula, weights on the GPU
        case = next(c for c in cases if c.name == "mixed_weighted")
        ids, lengths, weights, *rest = case.args("cuda")
        weights = weights.clone().requires_grad_(True)
        _, _, out_w = ops.remap(ids, lengths, weights, *rest)
        out_w.sum().backward()
        want = reference_weight_grad(torch.ones(out_w.numel()), case.lengths, case.batch,
                                     case.spec, case.ids.numel())
        torch.testing.assert_close(weights.grad.double().cpu(), want)
    results.record("cuda", "autograd", autograd)

    def host_precomputed() -> None:  # p left in host memory while the ids are on the GPU
        case = next(c for c in cases if c.name == "cce_precomputed")
        args = list(case.args("cuda"))
        args[7] = [p.cpu() for p in case.precomputed]
        _same(case.name, ops.remap(*args), ops.remap(*case.args("cpu")))
    results.record("cuda", "host_precomputed", host_precomputed)


# ------------------------------------------------------------------ build without ninja
def build_without_ninja(verbose: bool) -> None:
    """Build the op library with setuptools (``BuildExtension(use_ninja=False)``), the same
    sources and flags as ``ops._build``, and load it: for machines without ninja (it is not a
    torch dependency, and there may be no network to install it)."""
    from setuptools import setup  # only here: the ninja build does not need it
    from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                           CUDAExtension)

    cuda = torch.cuda.is_available() and CUDA_HOME is not None
    csrc = os.path.join(ROOT, "torchrec_cce", "ops", "csrc")
    sources = [os.path.join(csrc, f) for f in ops.SOURCES]
    cflags = ops.cxx_flags()
    name = "torchrec_cce_ops_cuda" if cuda else "torchrec_cce_ops"
    if cuda:
        ext = CUDAExtension(name, sources + [os.path.join(csrc, "remap_cuda.cu")],
                            include_dirs=[csrc], extra_link_args=["-fopenmp"],
                            extra_compile_args={"cxx": cflags, "nvcc": ["-O3"]})
    else:
        ext = CppExtension(name, sources, include_dirs=[csrc], extra_link_args=["-fopenmp"],
                           extra_compile_args={"cxx": cflags})
    out = os.path.join(ops.build_directory(), "setuptools")
    os.makedirs(out, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(out)  # setuptools reads pyproject.toml / setup.cfg from the working directory
    try:
        setup(name=name, ext_modules=[ext],
              cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
              script_args=["--verbose" if verbose else "--quiet", "build_ext", "--build-lib",
                           out, "--build-temp", os.path.join(out, "tmp")])
    finally:
        os.chdir(cwd)
    torch.ops.load_library(sorted(glob.glob(os.path.join(out, name + "*.so")))[-1])


# ------------------------------------------------------------------ timing
def timing_cases(seed: int, batch: int, features: int = 26, mean_len: int = 4) -> Dict[str, Case]:
    """Criteo-shaped batches (``features`` features x ``batch`` bags), one per stream family."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 2 * mean_len + 1, (features, batch), generator=g).flatten()
    n = int(lens.sum())
    ids = torch.randint(0, 1_000_000, (n,), generator=g, dtype=torch.int64)
    key = lambda: int(torch.randint(0, 2 ** 62, (1,), generator=g))  # noqa: E731
    out = {
        "identity": [_row(feature=f, kind="identity", rows=1_000_000) for f in range(features)],
        "hash": [_row(feature=f, kind="hash", rows=100_003, key=key()) for f in range(features)],
        "qr": [_row(feature=f, kind=k, rows=1000, num_ids=1_000_000)
               for f in range(features) for k in ("qr_quotient", "qr_remainder")],
        "cce_packed": [_row(feature=f, kind="cce_pair", rows=131_072, key=key(), h_key=key(),
                            generation=0, assignment=0, assignment_count=1_000_000, bits=17,
                            chunks=4, column=c) for f in range(features) for c in range(4)],
    }
    p_values = torch.randint(0, 131_072, (1_000_000, 4), generator=g, dtype=torch.int64)
    cases = {name: Case(name, ids, lens, None, batch, spec, [torch.tensor(1)],
                        assignment_values=[p_values] if name == "cce_packed" else [])
             for name, spec in out.items()}
    cases["weighted_hash"] = Case("weighted_hash", ids, lens, torch.rand(n, generator=g), batch,
                                  out["hash"])
    return cases


def _median_seconds(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def time_kernels(cases: Dict[str, Case], cuda: bool, repeats: int) -> Dict[str, Dict[str, float]]:
    """Median seconds per call: CPU kernel, pure-torch reference (CPU) and the CUDA kernel."""
    out = {}
    for name, case in cases.items():
        cpu_args = case.args("cpu")
        row = {"cpu": _median_seconds(lambda: ops.remap(*cpu_args), lambda: None, repeats)}
        if cuda:
            dev_args = case.args("cuda")
            row["cuda"] = _median_seconds(lambda: ops.remap(*dev_args), torch.cuda.synchronize,
                                          repeats)
        else:
            ref_args = (*cpu_args[:6], case.assignment_values, cpu_args[7])
            row["torch_ref"] = _median_seconds(lambda: reference(*ref_args), lambda: None,
                                               max(1, repeats // 3))
        out[name] = row
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="random case sets per part")
    parser.add_argument("--timing-batch", type=int, default=16384,
                        help="bags per feature of the timed batches (0: no timing)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per kernel")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU part")
    parser.add_argument("--no-ninja", action="store_true",
                        help="build with setuptools even where ninja exists (automatic without)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the build's output")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu_only
    from torch.utils.cpp_extension import is_ninja_available

    if args.no_ninja or not is_ninja_available():
        try:
            build_without_ninja(args.verbose)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - setup() exits on errors
            print(f"gpu_check: FAIL: the op library did not build (setuptools, no ninja): "
                  f"{' '.join(str(e).split())[:300]}")
            return 1
    if not ops.load(verbose=args.verbose):
        print(f"gpu_check: FAIL: the op library did not build: {ops._state['error']}")
        return 1
    has_cuda_kernel = cuda and torch._C._dispatch_has_kernel_for_dispatch_key(
        "torchrec_cce::remap", "CUDA")
    build_s = time.perf_counter() - t0
    results = Results()
    for seed in range(args.seeds):
        cases = make_cases(seed)
        check_cpu(cases, results, seed)
        if has_cuda_kernel:
            check_cuda(cases, results, seed)
    if cuda and not has_cuda_kernel:
        results.failed.append("cuda:build (no CUDA kernel registered: is nvcc / CUDA_HOME set?)")

    timing = ""
    if args.timing_batch > 0:
        # Without CUDA the slow pure-torch reference is timed instead: a smaller batch.
        batch = args.timing_batch if has_cuda_kernel else min(args.timing_batch, 2048)
        cases = timing_cases(1234, batch)
        times = time_kernels(cases, has_cuda_kernel, args.repeats if has_cuda_kernel else 3)
        other = "cuda" if has_cuda_kernel else "torch_ref"
        if has_cuda_kernel:
            label, ratio = "cuda speedup vs cpu kernel", lambda t: t["cpu"] / t["cuda"]
        else:
            label, ratio = "cpu kernel speedup vs torch ref", lambda t: t["torch_ref"] / t["cpu"]
        n = int(next(iter(cases.values())).ids.numel())
        timing = f"; {label} ({n} ids, {torch.get_num_threads()} cpu threads): " + ", ".join(
            f"{name} {ratio(t):.{1 if ratio(t) >= 1 else 2}f}x" for name, t in times.items())
        for name, t in times.items():
            print("timing " + name + " " + " ".join(f"{k}={v * 1e3:.2f}ms" for k, v in t.items()),
                  file=sys.stderr)

    leaked = [m for m in ("torchrec", "fbgemm_gpu", "torchrec_cce")
              if sys.modules.get(m) is not None]
    if leaked:
        results.failed.append(f"imports:{','.join(leaked)} imported")
    passed = sum(results.passed.values())
    status = "PASS" if not results.failed else "FAIL"
    parts = ", ".join(f"{k} {v}" for k, v in results.passed.items())
    gpu = ("" if has_cuda_kernel else "; GPU part skipped (--cpu-only)" if args.cpu_only else
           "; no CUDA: GPU part skipped" if not cuda else "; GPU part FAILED to build")
    print(f"gpu_check: {status} {passed} passed ({parts}), {len(results.failed)} failed"
          f"{' [' + ', '.join(results.failed[:8]) + ']' if results.failed else ''}{gpu}{timing}; "
          f"tbe/compose: CPU-only kernels, not checked; torch {torch.__version__}, "
          f"{time.perf_counter() - t0:.0f}s (build {build_s:.0f}s)")
    return 0 if not results.failed else 1


if __name__ == "__main__":
    sys.exit(main())
