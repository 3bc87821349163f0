"""LSQ+ fake quantisation of embedding rows (Bhalgat et al., "LSQ+", CVPRW 2020), as MPE uses it.

Following the MPE authors' public code (github.com/Leopold1423/mpe, ``model/embedding.py``:
``lsq_plus`` and ``OptFP_Embedding``):

* one learned step ``alpha_b`` per bit width ``b`` (used as ``|alpha_b| + 1e-10``), initialised
  to ``2 * mean|W| / sqrt(2^(b-1))``; one learned offset ``beta`` per embedding dimension,
  initialised to 0;
* ``q_b(w) = clamp(round((w - beta) / alpha_b), -2^(b-1), 2^(b-1) - 1) * alpha_b + beta``;
* straight-through gradients: ``dq/dw = 1`` inside the clamp range and 0 outside;
  ``dq/dalpha = round(u) - u`` inside and the clamp bound outside; ``dq/dbeta = 0`` inside and 1
  outside (``u = (w - beta) / alpha``); the step's and offset's gradients are multiplied by
  LSQ's ``grad_scale = 1 / sqrt(2^(b-1) * numel(W))``;
* ``b = 0`` means the row is pruned: its value is 0 (no offset either).

The gradients come from autograd through two identity-valued functions (round with a
straight-through backward; a gradient-scaling identity), so the forward value is exactly
``codes * alpha + beta`` (:func:`dequantize`), the same operations the serving loader runs.
"""

import math
from typing import Union

import torch

Scalar = Union[float, torch.Tensor]

ALPHA_EPS = 1e-10  # the public code's |alpha| + 1e-10


class _RoundSTE(torch.autograd.Function):
    """``round(x)`` with the identity as its gradient (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


class _GradScale(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale`` (LSQ's ``grad_scale``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def code_range(bits: int) -> "tuple[int, int]":
    """Signed integer grid ``[-2^(b-1), 2^(b-1) - 1]`` of a ``b``-bit code (``b >= 1``)."""
    if bits < 1:
        raise ValueError(f"a quantised row needs >= 1 bit, got {bits} (0 bits = pruned)")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def grad_scale(bits: int, numel: int) -> float:
    """LSQ's step-gradient scale ``1 / sqrt(2^(b-1) * numel)`` (as in the public code)."""
    return 1.0 / math.sqrt(2.0 ** (bits - 1)) / math.sqrt(max(1, numel))


def initial_step(weight: torch.Tensor, bits: int) -> float:
    """The public code's step initialisation ``2 * mean|W| / sqrt(2^(b-1))``."""
    return float(2 * weight.abs().mean() / math.sqrt(2.0 ** (bits - 1)))


def effective_step(alpha: torch.Tensor) -> torch.Tensor:
    """The step actually used: ``|alpha| + 1e-10`` (keeps it positive)."""
    return alpha.abs() + ALPHA_EPS


def quantize_codes(w: torch.Tensor, alpha: Scalar, beta: torch.Tensor, lo: Scalar,
                   hi: Scalar) -> torch.Tensor:
    """Integer codes (as floats) of ``w``: ``round(clamp((w - beta) / alpha, lo, hi))``.

    ``alpha``/``lo``/``hi`` may be scalars or ``[n, 1]`` tensors (one width per row).
    """
    return torch.round(torch.clamp((w - beta) / alpha, lo, hi))


def dequantize(codes: torch.Tensor, alpha: Scalar, beta: torch.Tensor) -> torch.Tensor:
    """``codes * alpha + beta``: the value of a quantised row (training and serving)."""
    return codes * alpha + beta


def lsq_plus(w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, lo: Scalar, hi: Scalar,
             scale: Scalar) -> torch.Tensor:
    """LSQ+ fake-quantised ``w`` with straight-through gradients (see the module docstring).

    Args:
        w: ``[n, dim]`` rows.
        alpha: the *effective* step (``effective_step(param)``), a 0-d tensor or ``[n, 1]``.
        beta: ``[dim]`` offset.
        lo, hi: the code range (scalars or ``[n, 1]``), see :func:`code_range`.
        scale: gradient scale of ``alpha`` and ``beta`` (scalar or ``[n, 1]``).
    """
    scale_t = torch.as_tensor(scale, dtype=w.dtype, device=w.device)
    a = _GradScale.apply(alpha, scale_t)
    # With one scale per row, beta enters row by row so each row's gradient is scaled by its own.
    b = _GradScale.apply(beta if scale_t.dim() == 0 else beta.expand(w.shape[0], -1), scale_t)
    codes = _RoundSTE.apply(torch.clamp((w - b) / a, lo, hi))
    return dequantize(codes, a, b)
