"""LSQ+ quantiser (torchrec_cce/methods/mpe/quantizer.py): values on the grid, straight-through
gradients, learned step/offset updates, bit packing of the serving format."""

import numpy as np
import pytest
import torch

from torchrec_cce.methods.mpe.export import pack_codes, row_bytes, unpack_codes
from torchrec_cce.methods.mpe.quantizer import code_range, grad_scale, initial_step, lsq_plus


def _numpy_lsq(w: np.ndarray, alpha: np.float32, beta: np.ndarray, bits: int) -> np.ndarray:
    """Independent float32 reference: clamp(round((w - beta) / alpha)) * alpha + beta."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    u = ((w - beta) / alpha).astype(np.float32)
    codes = np.round(np.clip(u, lo, hi))  # numpy and torch both round half to even
    return (codes * alpha + beta).astype(np.float32)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8, 16])
def test_values_are_on_the_grid_and_match_reference(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(50, 8, generator=g) * 0.1
    beta = torch.randn(8, generator=g) * 0.01
    alpha = torch.tensor(initial_step(w, bits))
    lo, hi = code_range(bits)
    q = lsq_plus(w, alpha, beta, lo, hi, grad_scale(bits, w.numel()))
    ref = _numpy_lsq(w.numpy(), np.float32(alpha.item()), beta.numpy(), bits)
    assert np.array_equal(q.detach().numpy(), ref)
    codes = torch.round((q.detach() - beta) / alpha)
    assert codes.min() >= lo and codes.max() <= hi
    assert torch.allclose(codes * alpha + beta, q.detach(), atol=1e-7)
    # At most 2^bits distinct values per column.
    for j in range(8):
        assert q[:, j].unique().numel() <= 2 ** bits


def test_one_bit_grid_is_minus_alpha_and_zero_around_beta() -> None:
    w = torch.tensor([[-1.0, -0.2, 0.1, 3.0]])
    beta = torch.tensor([0.0, 0.0, 0.0, 0.5])
    q = lsq_plus(w, torch.tensor(0.5), beta, -1, 0, 1.0)
    assert q.tolist() == [[-0.5, 0.0, 0.0, 0.5]]


def test_code_range_rejects_zero_bits() -> None:
    with pytest.raises(ValueError, match="pruned"):
        code_range(0)


@pytest.mark.parametrize("bits", [2, 4])
def test_straight_through_gradients(bits: int) -> None:
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(40, 6, generator=g) * 0.3).requires_grad_()
    alpha = torch.tensor(0.05, requires_grad=True)
    beta = (torch.randn(6, generator=g) * 0.02).requires_grad_()
    upstream = torch.randn(40, 6, generator=g)
    lo, hi = code_range(bits)
    s = grad_scale(bits, w.numel())
    (lsq_plus(w, alpha, beta, lo, hi, s) * upstream).sum().backward()

    u = ((w - beta) / alpha).detach().numpy()
    dy = upstream.numpy()
    inside = (u >= lo) & (u <= hi)
    # dq/dw = 1 inside the clamp range, 0 outside (straight-through round).
    assert np.allclose(w.grad.numpy(), dy * inside)
    # dq/dalpha = round(u) - u inside, the clamp bound outside; times the LSQ grad scale.
    dalpha = np.where(inside, np.round(u) - u, np.where(u < lo, lo, hi))
    assert np.isclose(alpha.grad.item(), (dalpha * dy).sum() * s, rtol=1e-4)
    # dq/dbeta = 0 inside, 1 outside; times the grad scale.
    assert np.allclose(beta.grad.numpy(), ((~inside) * dy).sum(0) * s, rtol=1e-4, atol=1e-9)
    assert (~inside).any() and inside.any()  # both branches exercised


def test_per_row_widths_equal_scalar_quantiser() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, 4, generator=g) * 0.1
    beta = torch.randn(4, generator=g) * 0.01
    alphas = torch.tensor([0.02, 0.05])
    widths = torch.tensor([2, 4] * 5)
    idx = (widths == 4).long()
    lo = -(2.0 ** (widths - 1)).unsqueeze(1)
    hi = (2.0 ** (widths - 1) - 1).unsqueeze(1)
    per_row = lsq_plus(w, alphas[idx].unsqueeze(1), beta, lo, hi, torch.ones(10, 1))
    for i in range(10):
        b = int(widths[i])
        one = lsq_plus(w[i:i + 1], alphas[idx[i]], beta, *code_range(b), 1.0)
        assert torch.equal(per_row[i:i + 1], one)


def test_learned_step_and_offset_reduce_quantisation_error() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2000, 4, generator=g) * 0.1 + torch.tensor([0.3, -0.2, 0.0, 0.1])
    bits = 3
    alpha = torch.tensor(initial_step(w, bits) * 3, requires_grad=True)  # a poor start
    beta = torch.zeros(4, requires_grad=True)
    lo, hi = code_range(bits)
    opt = torch.optim.Adam([alpha, beta], lr=5e-3)

    def mse() -> torch.Tensor:
        q = lsq_plus(w, alpha.abs() + 1e-10, beta, lo, hi, grad_scale(bits, w.numel()))
        return ((q - w) ** 2).mean()

    before = mse().item()
    for _ in range(300):
        opt.zero_grad()
        mse().backward()
        opt.step()
    after = mse().item()
    assert after < 0.5 * before
    # The offset moves toward each dimension's mean (signs of the planted shifts).
    assert beta[0] > 0.05 and beta[1] < -0.05


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_pack_unpack_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for dim in (1, 5, 16):
        u = torch.randint(0, 2 ** bits, (33, dim), generator=g)
        packed = pack_codes(u, bits)
        assert packed.dtype == torch.uint8
        assert tuple(packed.shape) == (33, -(-dim * bits // 8)) == (33, row_bytes(dim, bits))
        assert torch.equal(unpack_codes(packed, bits, dim), u)


def test_int4_packing_is_low_nibble_first() -> None:
    # fbgemm's INT4 element order: element 0 in the low nibble of byte 0.
    packed = pack_codes(torch.tensor([[3, 10, 15, 0]]), 4)
    assert packed.tolist() == [[3 | (10 << 4), 15]]
