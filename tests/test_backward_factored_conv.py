"""mtl_backward with factored convolutions: the Gramian share and the update of a shared
convolution weight from its unfolded input and output gradients (mtl_opt._conv_rows), checked
against the explicit Jacobian and against ``factor_linear=False`` (every Jacobian row)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import mtl_opt
import mtl_opt._layerwise as layerwise
from mtl_opt import mtl_backward

from _mtl_models import explicit_jacobian, flat_grad


@pytest.fixture
def always_factor(monkeypatch):
    """Factor every qualifying layer, however small (the cost rule keeps tiny layers' rows)."""
    monkeypatch.setattr(layerwise, "_FLOAT64_COST", 0.0)


CONVS = {
    "stride2-pad1-groups2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
    "rect-kernel-dilation": lambda: nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    "depthwise-1d": lambda: nn.Conv1d(4, 4, 3, padding=2, dilation=2, groups=4),
    "pointwise-no-bias": lambda: nn.Conv2d(4, 6, 1, bias=False),
    "same-even-kernel-1d": lambda: nn.Conv1d(4, 5, 2, padding="same"),
}


class ConvNet(nn.Module):
    """The convolution under test between a first (shared) convolution and two task heads; the
    input of the tested one requires grad, so its node also runs (the first one's does not)."""

    def __init__(self, make, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.conv = make()
        one_d = isinstance(self.conv, nn.Conv1d)
        self.first = (nn.Conv1d if one_d else nn.Conv2d)(3, self.conv.in_channels, 3, padding=1)
        self.x = torch.randn(3, 3, *((9,) if one_d else (7, 6)), dtype=dtype)
        self.to(dtype)

    def losses(self) -> list[Tensor]:
        y = torch.tanh(self.conv(torch.tanh(self.first(self.x)))).flatten(1)
        return [y.pow(2).mean(), y[:, ::2].sin().sum(), (y[:, :3] - 1).pow(2).sum()]


def _run(net, **kw):
    for p in net.parameters():
        p.grad = None
    result = mtl_backward(net.losses(), net, mtl_opt.get_aggregator("mgda"), **kw)
    return result, flat_grad(net.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(CONVS))
def test_factored_convolution_matches_the_jacobian_rows(always_factor, name, dtype):
    net = ConvNet(CONVS[name], dtype)
    rows, rows_grad = _run(net, factor_linear=False)
    fact, fact_grad = _run(net)
    assert rows.factored_params == 0 and fact.factored_params == 2  # both convolution weights
    J = explicit_jacobian(net.losses(), list(net.parameters())).double()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fact.gramian, J @ J.T, **tol)
    torch.testing.assert_close(fact.gramian, rows.gramian, **tol)
    torch.testing.assert_close(fact_grad, rows_grad, **tol)
    torch.testing.assert_close(fact_grad, fact.weights.to(dtype) @ J.to(dtype), **tol)


def test_default_cost_rule_factors_low_resolution_wide_convolutions():
    """Factored when its (rows × rows) products cost less than its Jacobian rows: a 64-channel
    3×3 convolution on a 2×2 map is, a 4-channel one on a 32×32 map is not."""
    torch.manual_seed(0)
    wide, early = nn.Conv2d(64, 64, 3, padding=1).double(), nn.Conv2d(1, 4, 3, padding=1).double()
    xw = torch.randn(4, 64, 2, 2, dtype=torch.float64)
    xe = torch.randn(4, 1, 32, 32, dtype=torch.float64)

    def losses():
        a, b = torch.tanh(wide(xw)), torch.tanh(early(xe))
        return [a.pow(2).mean() + b.mean(), a.mean() + b.pow(2).mean()]

    shared = [*wide.parameters(), *early.parameters()]
    result = mtl_backward(losses(), shared, mtl_opt.get_aggregator("cagrad"))
    assert result.factored_params == 1  # wide.weight
    J = explicit_jacobian(losses(), shared)
    torch.testing.assert_close(result.gramian, J @ J.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_grad(shared), result.weights @ J, rtol=1e-10, atol=1e-12)


def test_convolution_weights_used_any_other_way_keep_their_rows(always_factor):
    """A weight used twice as a convolution is factored (its uses' rows stacked); one also read
    as a tensor, a transposed convolution, a 3-D convolution and a hooked weight keep their rows;
    every gradient stays exact and ``factored_params`` counts only the factored ones."""
    torch.manual_seed(0)
    twice = nn.Conv2d(3, 3, 3, padding=1).double()
    also_read = nn.Conv2d(3, 3, 1).double()
    transposed = nn.ConvTranspose2d(3, 3, 2, stride=2).double()
    three_d = nn.Conv3d(3, 3, 1).double()
    hooked = nn.Conv2d(3, 3, 1).double()
    hooked.weight.register_hook(lambda g: None)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)

    def losses():
        h = torch.tanh(twice(torch.tanh(twice(x))))
        h = torch.tanh(also_read(h)) + also_read.weight.sum()
        h = torch.tanh(transposed(h))[..., :4, :4]
        h = torch.tanh(three_d(h.unsqueeze(2))).squeeze(2)
        h = hooked(h)
        return [h.pow(2).mean(), h[:, 0].sin().sum()]

    modules = [twice, also_read, transposed, three_d, hooked]
    shared = [p for m in modules for p in m.parameters()]
    result = mtl_backward(losses(), shared, mtl_opt.get_aggregator("mgda"))
    assert result.factored_params == 1  # twice.weight
    J = explicit_jacobian(losses(), shared)
    torch.testing.assert_close(result.gramian, J @ J.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_grad(shared), result.weights @ J, rtol=1e-10, atol=1e-12)


def test_a_hook_that_changes_a_factored_convolutions_output_gradient_raises(always_factor):
    """As for linear layers: the bias rows (computed after the hook) expose it."""
    torch.manual_seed(0)
    c1, c2 = nn.Conv2d(2, 3, 3).double(), nn.Conv2d(3, 3, 3, padding=1).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)

    def losses(hook):
        y = c2(torch.tanh(c1(x)))
        y.register_hook(hook)
        return [y.pow(2).mean(), y[:, 0].sum()]

    shared = [*c1.parameters(), *c2.parameters()]
    with pytest.raises(RuntimeError, match=r"hook on the output of the linear layer with bias shared parameter #3"):
        mtl_backward(losses(lambda g: 2.0 * g), shared, mtl_opt.get_aggregator("mgda"))
    assert all(p.grad is None for p in shared)


def test_checkpointed_convolutions_keep_their_rows(always_factor):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Tanh()).double()
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)

    def losses():
        z = checkpoint(enc, x, use_reentrant=False)
        return [z.pow(2).mean(), F.softplus(z).sum()]

    result = mtl_backward(losses(), enc, mtl_opt.get_aggregator("mgda"))
    assert result.factored_params == 0
    J = explicit_jacobian(losses(), list(enc.parameters()))
    torch.testing.assert_close(result.gramian, J @ J.T, rtol=1e-10, atol=1e-12)
