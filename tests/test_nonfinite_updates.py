"""Nothing non-finite reaches the weights: overflowing directions (every method, every path),
non-finite gradients outside the shared parameters, and the errors around them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtl_opt
from mtl_opt import MultiTaskOptimizer, aggregate_many, get_aggregator, mtl_backward

# Every row 3e38: finite in float32 (max 3.4e38), but any direction on the scale of the sum of
# two such rows (every method but Nash-MTL, which normalises) overflows.
HUGE = 3e38
OVERFLOWING = ["ls", "pcgrad", "mgda", "cagrad", "came_grad"]


def _huge_jacobian(B: int | None = None) -> torch.Tensor:
    return torch.full((2, 10) if B is None else (B, 2, 10), HUGE)


# ------------------------------------------------------------------------------------------
# Overflowing directions: one clear error on every path
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OVERFLOWING)
def test_single_call_refuses_an_overflowing_direction(name):
    agg = get_aggregator(name)
    with pytest.raises(ValueError, match=rf"{type(agg).__name__}\(.*overflows float32; rescale"):
        agg(_huge_jacobian())


def test_came_grad_with_a_huge_kappa_refuses_the_direction():
    G = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"kappa=1e\+39.*overflows float32"):
        get_aggregator("came_grad", kappa=1e39)(G)
    # The same hyperparameter fits a float64 Jacobian: it is not refused up front.
    assert bool(torch.isfinite(get_aggregator("came_grad", kappa=1e39)(G.double())).all())


@pytest.mark.parametrize("name", OVERFLOWING)
def test_aggregate_batch_refuses_an_overflowing_direction(name):
    with pytest.raises(ValueError, match="overflows float32"):
        get_aggregator(name).aggregate_batch(_huge_jacobian(B=3))


def test_aggregate_many_refuses_an_overflowing_direction_naming_the_method():
    with pytest.raises(ValueError, match=r"MGDA\(.*overflows float32"):
        aggregate_many(_huge_jacobian(), ["mgda", "pcgrad"])


def test_a_direction_that_fits_passes_unchanged():
    G = torch.full((2, 10), 1e38)  # the sum (2e38) fits float32
    for name in OVERFLOWING:
        d = get_aggregator(name)(G)
        assert bool(torch.isfinite(d).all()), name


def test_half_precision_overflow_is_refused_on_every_path():
    G = torch.full((2, 4), 4e4, dtype=torch.float16)  # the sum, 8e4, overflows float16
    with pytest.raises(ValueError, match="overflows float16"):
        get_aggregator("mgda")(G)
    with pytest.raises(ValueError, match="overflows float16"):
        aggregate_many(G, ["mgda"])
    with pytest.raises(ValueError, match="overflows float16"):
        get_aggregator("mgda").aggregate_batch(G[None])


class _Scaled(nn.Module):
    """A shared 32 × 32 linear layer (wide enough to be factored) and two heads; the trunk
    starts at zero, so the losses are 0 while every Jacobian row entry is ``scale``: finite
    rows whose sum overflows float32 when ``scale`` is 3e38."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.trunk = nn.Linear(32, 32)
        self.head_a = nn.Linear(32, 1)
        self.head_b = nn.Linear(32, 1)
        self.scale = scale
        with torch.no_grad():
            self.trunk.weight.zero_()
            self.trunk.bias.zero_()
            for head in (self.head_a, self.head_b):
                head.weight.fill_(1.0)
                head.bias.zero_()

    def losses(self, z: torch.Tensor | None = None):
        z = self.trunk(torch.ones(1, 32)) if z is None else z
        return [self.head_a(z).sum() * self.scale, self.head_b(z).sum() * self.scale]


@pytest.mark.parametrize(
    "parallel, factor_linear, features",
    [(True, False, False), (True, True, False), (False, False, False), (True, False, True)],
    ids=["blocked", "factored", "per-task-loop", "features"],
)
def test_mtl_backward_refuses_an_overflowing_direction_and_writes_nothing(
    parallel, factor_linear, features
):
    net = _Scaled(scale=HUGE)  # rows 3e38: finite; MGDA's direction 2 · 3e38
    if factor_linear:  # the factored path is the one taken on this model
        small = _Scaled(scale=1.0)
        r = mtl_backward(small.losses(), small.trunk, get_aggregator("mgda"), parallel=True)
        assert r.factored_params == 1
    kwargs = {}
    if features:
        z = net.trunk(torch.ones(1, 32))
        losses = net.losses(z=z)
        kwargs["features"] = z
    else:
        losses = net.losses()
    for L in losses:
        assert bool(torch.isfinite(L))
    with pytest.raises(ValueError, match=r"MGDA\(.*overflows float32"):
        mtl_backward(losses, net.trunk, get_aggregator("mgda"), parallel=parallel,
                     factor_linear=factor_linear, **kwargs)
    assert all(p.grad is None for p in net.parameters())


def test_multitask_optimizer_leaves_the_weights_unchanged_on_overflow():
    net = _Scaled(scale=HUGE)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=1e-3),
                             get_aggregator("came_grad"), net.trunk)
    with pytest.raises(ValueError, match="overflows float32"):
        opt.step(net.losses())
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]), n


# ------------------------------------------------------------------------------------------
# Non-finite gradients outside the shared parameters
# ------------------------------------------------------------------------------------------
class _SqrtHead(nn.Module):
    """Task 0's head has a parameter ``gate`` at 0 used through ``sqrt``: the loss is finite
    (0 · z), its gradient w.r.t. the trunk is finite (√0 = 0), its gradient w.r.t. ``gate`` is
    inf (d√g/dg = ∞ at 0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(3, 4)
        self.gate = nn.Parameter(torch.zeros(4))
        self.head_b = nn.Linear(4, 1)

    def losses(self) -> list[torch.Tensor]:
        z = self.trunk(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)))
        return [(self.gate.sqrt() * z).sum() + z.pow(2).mean(), self.head_b(z).pow(2).mean()]


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("as_task_param", [True, False])
def test_a_non_finite_head_gradient_is_refused_naming_parameter_and_task(parallel, as_task_param):
    net = _SqrtHead()
    losses = net.losses()
    assert all(bool(torch.isfinite(L)) for L in losses)
    task_params = [[net.gate], net.head_b] if as_task_param else None
    where = r"task 0 parameter #0 \(shape \(4,\)\), from the loss of task 0" if as_task_param else (
        r"the parameter of shape \(4,\) outside shared_params and task_params"
    )
    with pytest.raises(ValueError, match=rf"the gradient of {where}.* is not finite"):
        mtl_backward(losses, net.trunk, get_aggregator("mgda"), task_params=task_params,
                     parallel=parallel)
    assert all(p.grad is None for p in net.parameters())  # nothing written


def test_multitask_optimizer_does_not_step_a_non_finite_head_gradient():
    net = _SqrtHead()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), get_aggregator("ls"),
                             net.trunk, task_params=[[net.gate], net.head_b])
    with pytest.raises(ValueError, match="from the loss of task 0 is not finite"):
        opt.step(net.losses())
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) and bool(torch.isfinite(p).all()), n


# ------------------------------------------------------------------------------------------
# Seeds and stale graphs
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [2**70, 2**64, -(2**63) - 1])
def test_pcgrad_refuses_a_seed_that_torch_generators_cannot_take(seed):
    with pytest.raises(ValueError, match=r"PCGrad: seed must be an int in \[-2\*\*63, 2\*\*64\)"):
        get_aggregator("pcgrad", seed=seed)


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_pcgrad_accepts_every_seed_a_generator_takes(seed):
    agg = get_aggregator("pcgrad", seed=seed)
    G = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(agg(G)).all())


@pytest.mark.parametrize("parallel", ["auto", True, False])
def test_stepping_twice_on_the_same_losses_names_the_true_cause(parallel):
    w = nn.Parameter(torch.randn(3))
    h = nn.Parameter(torch.randn(3))
    opt = MultiTaskOptimizer(torch.optim.SGD([w, h], lr=0.1), get_aggregator("mgda"), [w],
                             parallel=parallel)
    opt.step([(w * h).sum(), (w**2).sum()])  # settles "auto"
    losses = [(w * h).sum(), (w**2).sum()]
    opt.step(losses)
    with pytest.raises(RuntimeError, match="fresh forward pass") as info:
        opt.step(losses)
    assert "parallel=False" not in str(info.value)


def test_a_second_backward_without_retain_graph_says_the_graph_was_freed():
    w = nn.Parameter(torch.randn(3))
    losses = [(w.sin()).sum(), (w**2).sum()]
    mtl_backward(losses, [w], get_aggregator("mgda"), parallel=True)
    with pytest.raises(RuntimeError, match="already freed by an earlier backward.*retain_graph"):
        mtl_backward(losses, [w], get_aggregator("mgda"), parallel=True)


def test_the_registry_is_covered():
    # A new method is covered by the single-call and batch checks through the base class; this
    # guards the list of methods expected to overflow above against silent removals.
    assert set(OVERFLOWING) <= set(mtl_opt.available_aggregators())


class _OwnAggregate(mtl_opt.GradientAggregator):
    """A general method that replaces aggregate() itself (and so skips the base class's check):
    the sum of the rows."""

    def aggregate(self, G, /, *, losses=None, task_weights=None):
        return mtl_opt.AggregationResult(direction=G.sum(dim=0))


def test_mtl_backward_checks_the_direction_of_a_method_with_its_own_aggregate():
    net = _Scaled(scale=HUGE)
    with pytest.raises(ValueError, match=r"_OwnAggregate.*overflows float32"):
        mtl_backward(net.losses(), net.trunk, _OwnAggregate())
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("method", ["ls", "uw"])
def test_the_one_backward_path_refuses_a_non_finite_gradient_and_clears_what_it_created(method):
    # LS and the loss weightings take one backward pass of Σ w_i L_i, which writes `.grad`
    # before anything can be checked: the call still raises before any optimizer step, names the
    # parameter, and leaves no `.grad` it created behind.
    net = _SqrtHead()
    losses = [L.abs() + 1 for L in net.losses()]  # positive, as UW's log needs
    with pytest.raises(ValueError, match=r"task 0 parameter .*from the loss of task 0 is not finite"):
        mtl_backward(losses, net.trunk, get_aggregator(method), task_params=[[net.gate], net.head_b])
    assert all(p.grad is None for p in net.parameters())
    net.zero_grad(set_to_none=False)  # .grad held zeros before the call: they keep the sum
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match=r"(?s)outside shared_params.*held a gradient before this call"):
        mtl_backward([L.abs() + 1 for L in net.losses()], net.trunk, get_aggregator(method))


def _seeded_methods() -> list[str]:
    import inspect

    from mtl_opt.registry import aggregator_class

    return [n for n in mtl_opt.available_aggregators()
            if "seed" in inspect.signature(aggregator_class(n).__init__).parameters]


@pytest.mark.parametrize("name", _seeded_methods())
def test_every_seeded_method_refuses_a_seed_its_generator_cannot_take(name):
    # One check for every seeded method (methods/_state.checked_seed): out of range is refused,
    # never reduced modulo 2**64; a non-int is a TypeError; 0 and 2**64 - 1 are taken.
    assert len(_seeded_methods()) >= 5  # pcgrad, gradvac, graddrop, rgw, rlw
    for seed in (2**70, 2**64):
        with pytest.raises(ValueError, match=r"seed must be an int in \["):
            get_aggregator(name, seed=seed)
    with pytest.raises(TypeError, match="seed must be an int"):
        get_aggregator(name, seed="1")
    for seed in (0, 2**64 - 1):
        get_aggregator(name, seed=seed)
