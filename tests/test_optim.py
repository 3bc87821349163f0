"""torchrec_cce.optim.RowWiseAdagrad: fbgemm's row-wise Adagrad rule with sparse gradients."""

import pytest
import torch
import torch.nn.functional as F
from torchrec.optim import RowWiseAdagrad as TorchRecRowWiseAdagrad

from torchrec_cce.optim import RowWiseAdagrad


def _pair(weight_decay: float = 0.0):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(50, 8, generator=g)
    dense, sparse = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    kw = dict(lr=0.3, eps=1e-8, weight_decay=weight_decay)
    return g, w0, dense, sparse, TorchRecRowWiseAdagrad([dense], **kw), RowWiseAdagrad([sparse], **kw)


def _backward(dense, sparse, ids, target) -> None:  # noqa: ANN001
    (F.embedding(ids, dense) * target).sum().backward()
    (F.embedding(ids, sparse, sparse=True) * target).sum().backward()
    assert sparse.grad.is_sparse


def test_sparse_steps_equal_torchrec_dense_row_wise_adagrad() -> None:
    g, w0, dense, sparse, opt_d, opt_s = _pair()
    for _ in range(3):
        ids = torch.randint(0, 25, (20,), generator=g)  # rows 25.. never looked up; duplicates
        _backward(dense, sparse, ids, torch.randn(20, 8, generator=g))
        opt_d.step(), opt_s.step()
        opt_d.zero_grad(), opt_s.zero_grad()
    torch.testing.assert_close(sparse.detach(), dense.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(opt_s.state[sparse]["sum"], opt_d.state[dense]["sum"],
                               atol=1e-6, rtol=0)
    assert torch.equal(sparse.detach()[25:], w0[25:])  # untouched rows never move
    assert float(opt_s.state[sparse]["sum"][25:].abs().sum()) == 0


def test_weight_decay_touches_only_looked_up_rows() -> None:
    """fbgemm's behaviour: a sparse step decays the rows it updates, the others stay."""
    g, w0, dense, sparse, opt_d, opt_s = _pair(weight_decay=0.01)
    ids = torch.tensor([1, 2, 2, 3])
    _backward(dense, sparse, ids, torch.randn(4, 8, generator=g))
    opt_d.step(), opt_s.step()
    rows = torch.tensor([1, 2, 3])
    torch.testing.assert_close(sparse.detach()[rows], dense.detach()[rows], atol=1e-6, rtol=0)
    others = torch.ones(50, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(sparse.detach()[others], w0[others])
    assert not torch.equal(dense.detach()[others], w0[others])  # TorchRec's dense step decays all


def test_one_accumulator_per_row_unlike_torch_adagrad() -> None:
    """Row-wise: one accumulator per row (the mean of the squared gradient), not per element;
    a fully sparse COO gradient (both dims sparse) is taken as rows too."""
    p = torch.nn.Parameter(torch.zeros(2, 4))
    opt = RowWiseAdagrad([p], lr=1.0, eps=0.0)
    p.grad = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]).to_sparse()
    opt.step()
    assert opt.state[p]["sum"].shape == (2, 1)
    assert float(opt.state[p]["sum"][0]) == pytest.approx(7.5)  # mean(1, 4, 9, 16)
    torch.testing.assert_close(p.detach()[0], -torch.tensor([1.0, 2.0, 3.0, 4.0]) / 7.5 ** 0.5)
    assert float(p.detach()[1].abs().sum()) == 0
