"""The optional compiled nearest-centroid kernel (``csrc/nearest.cpp``), built on first use.

:func:`nearest2` runs the kernel: best and second-best score ``||c||^2 - 2 x.c`` and the best
index of every row, without materialising distances; :func:`nearest2_grouped` does the same
over centroids grouped in bounding boxes (:class:`CentroidGroups`), skipping the boxes that
cannot hold a centroid within the caller's near-tie margin of the best. The shared library is compiled once with
the system C++ compiler (``$CXX`` or ``c++``; about a second, no torch headers) into
``$TORCHREC_CCE_CACHE`` (default ``~/.cache/torchrec_cce``), keyed by a hash of the source and
flags, and loaded with :mod:`ctypes` (whose calls release the GIL). Where no compiler exists or
the build fails, :func:`available` is ``False`` after a one-line warning and callers use the
pure-torch path, which yields the same assignments. ``TORCHREC_CCE_NATIVE=0`` disables it.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Optional, Tuple

import torch

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "nearest.cpp")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-std=c++17"]
_LOCK = threading.Lock()
_LIB: Optional[ctypes.CDLL] = None
_TRIED = False


def _build() -> ctypes.CDLL:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    with open(_SRC, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join([cxx] + _FLAGS).encode()).hexdigest()[:16]
    cache = os.environ.get("TORCHREC_CCE_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "torchrec_cce"))
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"nearest_{key}.so")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run([cxx, *_FLAGS, "-o", tmp, _SRC], check=True, capture_output=True,
                           text=True)
            os.replace(tmp, path)  # atomic: concurrent builders never load a partial file
        except subprocess.CalledProcessError as e:
            raise RuntimeError((e.stderr or "").strip().splitlines()[-1:] or "build failed") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(path)
    fn = lib.cce_nearest2
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p]
    g = lib.cce_nearest2_grouped
    g.restype = ctypes.c_int
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    g.argtypes = [p, i64, i64, p, p, i64, p, i64, i64, p, p, i64, i64, p, p, p, p, p, p, p, p, p]
    return lib


def available() -> bool:
    """Whether the compiled kernel can be used (builds it on the first call)."""
    global _LIB, _TRIED
    if _TRIED:
        return _LIB is not None
    with _LOCK:
        if not _TRIED:
            if os.environ.get("TORCHREC_CCE_NATIVE", "1") != "0":
                try:
                    _LIB = _build()
                except Exception as e:  # no compiler, read-only cache, ...: torch path
                    warnings.warn("torchrec_cce: compiled nearest-centroid kernel unavailable "
                                  f"({e}); using the pure-torch path (same results, slower)",
                                  RuntimeWarning)
                    _LIB = None
            _TRIED = True
    return _LIB is not None


def nearest2(x: torch.Tensor, ct: torch.Tensor, bias: torch.Tensor,
             out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(best index int64, best score, second-best score) of each row of ``x [n, d]`` against
    centroids given as ``ct [d, kp]`` (``kp % 8 == 0``) and ``bias [kp]`` (``||c||^2``, ``inf``
    for padding); CPU float32, ``1 <= d <= 16``. Requires :func:`available`."""
    if not available():
        raise RuntimeError("nearest2: the compiled kernel is not available")
    if not (x.dtype == ct.dtype == bias.dtype == torch.float32 and x.device.type == "cpu"):
        raise ValueError("nearest2: CPU float32 tensors required")
    x, ct, bias = x.contiguous(), ct.contiguous(), bias.contiguous()
    n, d = x.shape
    kp = ct.shape[1]
    if out is None:
        out = (torch.empty(n, dtype=torch.int64), torch.empty(n), torch.empty(n))
    idx, best, second = out
    rc = _LIB.cce_nearest2(x.data_ptr(), n, d, ct.data_ptr(), bias.data_ptr(), kp,
                           idx.data_ptr(), best.data_ptr(), second.data_ptr())
    if rc != 0:
        raise ValueError(f"nearest2: unsupported shapes x {tuple(x.shape)}, ct {tuple(ct.shape)}")
    return idx, best, second


def grouped_supported() -> bool:
    """Whether the grouped (pruned) kernel exists in this build (it needs AVX2 + FMA)."""
    global _GROUPED_OK
    if not available():
        return False
    if _GROUPED_OK is None:
        _GROUPED_OK = bool(_LIB.cce_grouped_available())
    return _GROUPED_OK


_GROUPED_OK: Optional[bool] = None


def nearest2_grouped(x: torch.Tensor, groups: "CentroidGroups", xn: torch.Tensor,
                     margin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Like :func:`nearest2` (but the index is the centroid's own) over centroids arranged in
    bounding-box groups (:class:`CentroidGroups`): boxes whose distance from a row exceeds
    ``||x||^2 + best + 2 margin`` are skipped. ``xn``: ``||x||^2`` per row; ``margin``: the
    caller's near-tie margin per row (score units). Also returns the number of boxes scanned."""
    if not grouped_supported():
        raise RuntimeError("nearest2_grouped: this build has no grouped kernel (needs AVX2)")
    x, xn, margin = x.contiguous(), xn.contiguous(), margin.contiguous()
    n, d = x.shape
    idx, best, second = torch.empty(n, dtype=torch.int64), torch.empty(n), torch.empty(n)
    visited = torch.zeros(1, dtype=torch.int64)
    gr = groups
    rc = _LIB.cce_nearest2_grouped(
        x.data_ptr(), n, d, gr.ct.data_ptr(), gr.bias.data_ptr(), gr.ct.shape[1],
        gr.offsets.data_ptr(), gr.num_groups, gr.lo.shape[1], gr.lo.data_ptr(), gr.hi.data_ptr(),
        gr.num_supers, gr.super_lo.shape[1], gr.super_lo.data_ptr(), gr.super_hi.data_ptr(),
        xn.data_ptr(), margin.data_ptr(), gr.perm.data_ptr(), idx.data_ptr(), best.data_ptr(),
        second.data_ptr(), visited.data_ptr())
    if rc != 0:
        raise ValueError(f"nearest2_grouped: unsupported shapes x {tuple(x.shape)}")
    return idx, best, second, int(visited)


BOXES_PER_SUPER = 32  # csrc/nearest.cpp kBoxesPerSuper


class CentroidGroups:
    """Centroids ``[k, d]`` split into groups of at most ``leaf`` by a balanced k-d tree
    (median splits along the widest side), stored group by group for
    :func:`nearest2_grouped`: ``ct [d, kp]`` and ``bias [kp]`` (``||c||^2``, ``inf`` in the
    padding that rounds every group up to 8 columns), ``offsets [G + 1]``, ``perm [kp]``
    (column -> centroid index), the groups' bounding boxes ``lo``/``hi`` ``[d, gp]`` and
    those of each run of :data:`BOXES_PER_SUPER` consecutive groups (adjacent leaves of the
    tree), ``super_lo``/``super_hi`` ``[d, sp]``: the kernel bounds the superboxes first and
    the groups only inside the superboxes within reach, so a query costs ``O(G / 32)``
    bounds, not ``O(G)``.

    The tree is built level by level, every node of a level at once (two sorts per level)."""

    def __init__(self, centroids: torch.Tensor, sq: torch.Tensor, leaf: int) -> None:
        c = centroids
        k, d = c.shape
        num_leaves = max(1, -(-k // leaf))
        # order: the centroids node by node (each node a contiguous segment of it)
        order = torch.arange(k)
        starts = torch.zeros(1, dtype=torch.int64)
        sizes = torch.tensor([k], dtype=torch.int64)
        leaves = torch.tensor([num_leaves], dtype=torch.int64)
        while bool((leaves > 1).any()):
            nodes = starts.numel()
            node = torch.repeat_interleave(torch.arange(nodes), sizes)
            pts = c[order]
            where = node[:, None].expand(k, d)
            hi = torch.full((nodes, d), -float("inf")).scatter_reduce_(0, where, pts, "amax")
            lo = torch.full((nodes, d), float("inf")).scatter_reduce_(0, where, pts, "amin")
            dim = (hi - lo).argmax(1)
            key = pts.gather(1, dim[node][:, None]).squeeze(1)
            key = torch.where((leaves > 1)[node], key, torch.zeros_like(key))  # leaves: keep
            perm = torch.argsort(key, stable=True)
            perm = perm[torch.argsort(node[perm], stable=True)]  # by node, then by key
            order = order[perm]
            left = leaves // 2
            cut = torch.div(sizes * left * 2 + leaves, 2 * leaves, rounding_mode="floor")
            split = leaves > 1
            # children in order: (left, right) of split nodes, the node itself otherwise
            ls, lz, ll = starts, torch.where(split, cut, sizes), torch.where(split, left, leaves)
            rs, rz, rl = starts + cut, sizes - cut, leaves - left
            both_s = torch.stack([ls, rs], 1)
            both_z = torch.stack([lz, rz], 1)
            both_l = torch.stack([ll, rl], 1)
            keep = torch.stack([torch.ones_like(split), split], 1)
            starts, sizes, leaves = both_s[keep], both_z[keep], both_l[keep]
        self.num_groups = G = starts.numel()
        padded = (sizes + 7) // 8 * 8
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), padded.cumsum(0)])
        group = torch.repeat_interleave(torch.arange(G), sizes)
        cols = self.offsets[group] + torch.arange(k) - starts[group]
        kp = int(self.offsets[-1])
        self.num_supers = S = -(-G // BOXES_PER_SUPER)
        gp = S * BOXES_PER_SUPER
        sp = (S + 7) // 8 * 8
        pts = c[order]
        self.ct = torch.zeros(d, kp)
        self.ct[:, cols] = pts.t()
        self.bias = torch.full((kp,), float("inf"))
        self.bias[cols] = sq[order]
        self.perm = torch.zeros(kp, dtype=torch.int64)  # padding: any valid index (never wins)
        self.perm[cols] = order
        where = group[:, None].expand(k, d)
        lo = torch.full((gp, d), float("inf")).scatter_reduce_(0, where, pts, "amin")
        hi = torch.full((gp, d), -float("inf")).scatter_reduce_(0, where, pts, "amax")
        super_lo = lo.view(S, BOXES_PER_SUPER, d).amin(1)
        super_hi = hi.view(S, BOXES_PER_SUPER, d).amax(1)
        hi[G:] = float("inf")  # padding boxes: +inf on both sides (never within reach)
        self.lo, self.hi = lo.t().contiguous(), hi.t().contiguous()
        self.super_lo = torch.full((sp, d), float("inf"))
        self.super_hi = torch.full((sp, d), float("inf"))
        self.super_lo[:S], self.super_hi[:S] = super_lo, super_hi
        self.super_lo = self.super_lo.t().contiguous()
        self.super_hi = self.super_hi.t().contiguous()
