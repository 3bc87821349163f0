"""torchrec_cce's C++ ops, JIT-built with ``torch.utils.cpp_extension.load`` into one library:

* ``torch.ops.torchrec_cce.remap`` (C++ CPU kernel, CUDA kernel where CUDA exists): one call
  turns a whole logical KJT into the codebook KJT: every stream of every table (hash, CCE's
  assignment lookup, read from the bit-packed ``p`` with its hash fallback or passed
  precomputed, QR's quotient and remainder, the full table's range check), its lengths and
  weights. A CCE table's chunk streams are computed together, id by id, so each id's packed
  ``p`` is fetched from memory once. Stream encoding: ``csrc/remap.h``.
* ``tbe_forward`` / ``tbe_backward_update`` (``csrc/tbe.cpp``): the CPU training kernel of
  :class:`torchrec_cce.distributed.cpu_tbe.CodebookTBE`.
* ``pair_compose`` (``csrc/compose.cpp``): the compose stage of collections with QR-mult/add
  tables, :class:`PairCompose`.
* ``nearest2`` / ``nearest2_grouped`` / ``nearest2_simd`` (``csrc/nearest.cpp``): the
  nearest-centroid kernels of k-means (:mod:`torchrec_cce.clustering.native`).

Build: ``scripts/bootstrap.sh`` calls :func:`load` (``python -m torchrec_cce.ops``) so the
library is compiled at install time, into ``build/torchrec_cce_ops`` next to the package (or
``$TORCHREC_CCE_BUILD_DIR``). Where it cannot be built or loaded (no compiler), :func:`load`
logs one line (:data:`NOTICE`) and the modules use torch-ops paths (fbgemm's TBE kernel, the
per-feature compose, k-means' torch search). ``TORCHREC_CCE_FUSED=0`` selects the remap's
reference path without trying to build; ``TORCHREC_CCE_NATIVE=0`` k-means' torch search.
"""

import logging
import os
import threading
from typing import List, Optional, Sequence, Tuple

import torch

log = logging.getLogger("torchrec_cce")

NOTICE = ("torchrec_cce: the fused remap op could not be built or loaded ({reason}); using the "
          "torch-ops reference path (slower)")
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None}


def build_directory() -> str:
    """Where the extension is built: ``$TORCHREC_CCE_BUILD_DIR`` or ``<repo>/build/torchrec_cce_ops``."""
    env = os.environ.get("TORCHREC_CCE_BUILD_DIR")
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(repo, "build", "torchrec_cce_ops")


def _cpu_has(flag: str) -> bool:
    """Whether this x86 CPU lists ``flag`` in /proc/cpuinfo (False elsewhere)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and flag in line.split() for line in fh)
    except OSError:
        return False


SOURCES = ("remap.cpp", "tbe.cpp", "compose.cpp", "nearest.cpp")  # in csrc/; CUDA: remap_cuda.cu


def cxx_flags() -> List[str]:
    """The C++ flags of the library. ``-ffp-contract=off``: no multiply-add is fused unless the
    source says so (the nearest-centroid kernels' float32 scores are the same bits on every
    path); the AVX2 kernels get their ISA per function (``csrc/nearest.cpp``), not here."""
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
    if _cpu_has("f16c"):  # float16 codebook rows converted 4 at a time (ops/csrc/tbe.cpp)
        flags.append("-mf16c")
    return flags


def _build(verbose: bool) -> None:
    from torch.utils.cpp_extension import CUDA_HOME, load as cpp_load

    sources = [os.path.join(_CSRC, f) for f in SOURCES]
    cuda = torch.cuda.is_available() and CUDA_HOME is not None
    if cuda:
        sources.append(os.path.join(_CSRC, "remap_cuda.cu"))
    directory = build_directory()
    os.makedirs(directory, exist_ok=True)
    cpp_load(name="torchrec_cce_ops_cuda" if cuda else "torchrec_cce_ops", sources=sources,
             extra_cflags=cxx_flags(), extra_ldflags=["-fopenmp"],
             extra_cuda_cflags=["-O3"], extra_include_paths=[_CSRC],
             build_directory=directory, is_python_module=False, verbose=verbose)


def load(verbose: bool = False) -> bool:
    """Build (if needed) and load the op once per process; False (with one logged notice) if
    that fails. ``TORCHREC_CCE_FORCE_NO_FUSED=1`` simulates a failed build (tests)."""
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        try:
            if os.environ.get("TORCHREC_CCE_FORCE_NO_FUSED") == "1":
                raise RuntimeError("TORCHREC_CCE_FORCE_NO_FUSED=1")
            if not (hasattr(torch.ops.torchrec_cce, "remap")
                    and hasattr(torch.ops.torchrec_cce, "nearest2")):
                _build(verbose)
            _register_python_side()
            _state["loaded"] = True
        except Exception as e:  # no compiler, failed build, incompatible library ...
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            _state["loaded"], _state["error"] = False, reason
            log.warning(NOTICE.format(reason=reason))
        return _state["loaded"]


def fused_available() -> bool:
    """Whether the fused op is usable in this process (builds/loads it on first call)."""
    return load()


def fused_default(requested: Optional[bool] = None) -> bool:
    """Whether a module with ``fused=requested`` uses the op: None follows
    ``TORCHREC_CCE_FUSED`` (default on); on only where the op is available."""
    if requested is None:
        requested = os.environ.get("TORCHREC_CCE_FUSED", "1") != "0"
    return bool(requested) and fused_available()


# ---------------------------------------------------------------- the op's Python side
_registered = False


def _register_python_side() -> None:
    """Autograd (gradient w.r.t. the weights input) and fake kernels (meta tensors,
    ``torch.export``/``torch.compile`` tracing) of the remap and pair-compose ops."""
    global _registered
    if _registered:
        return

    def setup_context(ctx, inputs, output):  # noqa: ANN001
        ids, lengths, weights, batch, spec = inputs[:5]
        ctx.save_for_backward(lengths, spec)
        ctx.batch, ctx.num_ids = batch, ids.numel()
        ctx.list_sizes = [len(x) for x in inputs[5:8]]

    def backward(ctx, grad_values, grad_lengths, grad_weights):  # noqa: ANN001
        lengths, spec = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[2] and grad_weights is not None:
            grad = torch.ops.torchrec_cce.remap_weight_grad(grad_weights, lengths, ctx.batch,
                                                            spec, ctx.num_ids)
        lists = [[None] * n for n in ctx.list_sizes]
        return (None, None, grad, None, None, *lists)

    torch.library.register_autograd("torchrec_cce::remap", backward, setup_context=setup_context)

    @torch.library.register_fake("torchrec_cce::remap")
    def _(ids, lengths, weights, batch, spec, generations, assignments, precomputed):  # noqa: ANN001
        n = torch.library.get_ctx().new_dynamic_size()
        w = weights.new_empty(n) if weights is not None else ids.new_empty(0, dtype=torch.float32)
        return ids.new_empty(n), lengths.new_empty(spec.shape[0] * batch), w

    @torch.library.register_fake("torchrec_cce::remap_weight_grad")
    def _(grad, lengths, batch, spec, num_ids):  # noqa: ANN001
        return grad.new_empty(num_ids)

    @torch.library.register_fake("torchrec_cce::pair_compose")
    def _(x, segments, out_cols):  # noqa: ANN001
        return x.new_empty(x.shape[0], out_cols)

    @torch.library.register_fake("torchrec_cce::pair_compose_backward")
    def _(grad, x, segments, every_column_used):  # noqa: ANN001
        return x.new_empty(x.shape)

    _registered = True


KINDS = {"identity": 0, "hash": 1, "cce_pair": 2, "qr_quotient": 3, "qr_remainder": 4}
SPEC_COLUMNS = 18


def remap(ids: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor],
          batch_size: int, spec: torch.Tensor, generations: Sequence[torch.Tensor] = (),
          assignments: Sequence[torch.Tensor] = (), precomputed: Sequence[torch.Tensor] = ()
          ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``torch.ops.torchrec_cce.remap``: (values, lengths, weights or None) of the codebook KJT.

    Args:
        ids, lengths, weights: the logical KJT's values, lengths (``features x batch_size``)
            and optional per-id weights.
        spec: ``[streams, 15]`` int64 (CPU), one row per output key (``csrc/remap.h``).
        generations: CCE hash generations (0-d int64), referenced by spec column ``kGen``.
        assignments: bit-packed CCE assignments (1-D int32 words of
            :mod:`torchrec_cce.methods.packed`, ``kAssign``), holding ids
            ``[kAssignLo, kAssignLo + kAssignCount)`` at ``kBits`` bits x ``kChunks`` entries
            per id; other ids use the hash fallback.
        precomputed: ``[n_f, chunks]`` int64 ``p`` per feature (``kPre``), e.g. fetched from
            the ranks owning the ids or unpacked from a packed assignment.
    """
    if not _state["loaded"] and not load():
        raise RuntimeError(NOTICE.format(reason=_state["error"]))
    values, out_lengths, out_weights = torch.ops.torchrec_cce.remap(
        ids, lengths, weights, batch_size, spec, list(generations), list(assignments),
        list(precomputed))
    return values, out_lengths, (out_weights if weights is not None else None)


def spec_row(feature: int, kind: str, rows: int, offset: int = 0, key: int = 0, h_key: int = 0,
             generation: int = -1, assignment: int = -1, assignment_lo: int = 0,
             precomputed: int = -1, column: int = 0, num_ids: int = 1,
             assignment_count: int = 0, bits: int = 0, chunks: int = 1, qr_mul: int = 0,
             qr_add: int = 0, keep_remainder: bool = False) -> List[int]:
    """One row of ``spec`` (column order of ``csrc/remap.h``)."""
    return [feature, KINDS[kind], rows, offset, key, h_key, generation, assignment,
            assignment_lo, precomputed, column, num_ids, assignment_count, bits, chunks,
            qr_mul, qr_add, int(keep_remainder)]


class PairCompose(torch.autograd.Function):
    """``torch.ops.torchrec_cce.pair_compose`` with its backward (``csrc/compose.cpp``):
    ``out[:, o+k] = x[:, a+k] * x[:, b+k] + x[:, c+k]`` per segment ``(o, a, b, c, n)``
    (b = -1: 1, c = -1: 0), every column of ``x`` read by at most one output column."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, segments: torch.Tensor, out_cols: int,  # noqa: ANN001
                every_column_used: bool) -> torch.Tensor:
        ctx.save_for_backward(x, segments)
        ctx.every_column_used = every_column_used
        return torch.ops.torchrec_cce.pair_compose(x, segments, out_cols)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        x, segments = ctx.saved_tensors
        return (torch.ops.torchrec_cce.pair_compose_backward(grad, x, segments,
                                                             ctx.every_column_used),
                None, None, None)


__all__ = ["NOTICE", "PairCompose", "SOURCES", "build_directory", "cxx_flags", "fused_available",
           "fused_default", "load", "remap", "spec_row"]
