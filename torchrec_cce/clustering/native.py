"""The optional compiled nearest-centroid kernel (``csrc/nearest.cpp``), built on first use.

:func:`nearest2` runs the kernel: best and second-best score ``||c||^2 - 2 x.c`` and the best
index of every row, without materialising distances. The shared library is compiled once with
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
