"""Synthetic problems: values equal pymoo's, closed-form gradients equal autograd, true Pareto
sets are Pareto-stationary, options are checked."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_opt.experiments.runner import pareto_stationarity
from mtl_opt.problems import (
    DTLZ2,
    NASH_TOY_STARTS,
    Toy,
    available_problems,
    get_problem,
    parse_problem_spec,
)

pymoo_problems = pytest.importorskip("pymoo.problems")


def _rand(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "name, options, pymoo_kwargs",
    [
        ("zdt1", {}, {}),
        ("zdt2", {}, {}),
        ("zdt3", {}, {}),
        ("zdt1", {"n_var": 7}, {"n_var": 7}),
        ("dtlz2", {}, {}),
        ("dtlz2", {"n_var": 12, "n_obj": 5}, {"n_var": 12, "n_obj": 5}),
    ],
)
def test_values_equal_pymoo(name, options, pymoo_kwargs):
    problem = get_problem(name, **options)
    reference = pymoo_problems.get_problem(name, **pymoo_kwargs)
    assert problem.dim == reference.n_var and problem.n_tasks == reference.n_obj
    x = _rand((256, problem.dim), seed=1)
    ours = problem.losses(x).numpy()
    np.testing.assert_allclose(ours, reference.evaluate(x.numpy()), rtol=1e-12, atol=1e-12)
    # batched over two leading dimensions, same values
    xb = x.reshape(16, 16, problem.dim)
    assert problem.losses(xb).shape == (16, 16, problem.n_tasks)
    np.testing.assert_allclose(problem.losses(xb).reshape(256, -1).numpy(), ours, rtol=0, atol=0)


def test_pymoo_default_sizes():
    assert get_problem("zdt1").dim == 30 and get_problem("zdt3").dim == 30
    d = get_problem("dtlz2")
    assert (d.n_tasks, d.dim) == (3, 10)
    assert set(["toy", "zdt1", "zdt2", "zdt3", "dtlz2", "quadratic"]) <= set(available_problems())


@pytest.mark.parametrize("name", ["zdt1", "zdt2", "zdt3"])
def test_zdt_fronts_equal_pymoo(name):
    ours = get_problem(name).pareto_front(100).numpy()
    theirs = pymoo_problems.get_problem(name).pareto_front(100) if name != "zdt3" else \
        pymoo_problems.get_problem(name).pareto_front(100)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_dtlz2_front_is_the_unit_sphere_and_pymoo_front_is_at_distance_zero():
    problem = get_problem("dtlz2")
    ours = problem.pareto_front(200)
    assert torch.allclose(torch.linalg.vector_norm(ours, dim=-1), torch.ones(len(ours), dtype=torch.float64))
    theirs = torch.as_tensor(pymoo_problems.get_problem("dtlz2").pareto_front())
    assert float(problem.front_distance(theirs).max()) < 1e-12
    off = problem.losses(_rand((50, 10), seed=3))
    g = ((_rand((50, 10), seed=3)[:, 2:] - 0.5) ** 2).sum(-1)
    assert torch.allclose(problem.front_distance(off), g)


@pytest.mark.parametrize("name", ["toy", "zdt1", "zdt2", "zdt3", "dtlz2", "quadratic",
                                  "quadratic_imbalanced", "quadratic_many"])
def test_closed_form_jacobian_equals_autograd(name):
    problem = get_problem(name)
    if problem.bounds is not None:
        x = 0.02 + 0.96 * _rand((3, 7, problem.dim), seed=2)  # interior (ZDT's √x₁ is singular at 0)
    else:
        x = 8 * (2 * _rand((3, 7, problem.dim), seed=2) - 1)
    F, J = problem.losses_and_jacobian(x)
    F_ad, J_ad = problem._autograd_losses_and_jacobian(x)
    assert F.shape == (3, 7, problem.n_tasks) and J.shape == (3, 7, problem.n_tasks, problem.dim)
    torch.testing.assert_close(F, F_ad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(J, J_ad, rtol=1e-10, atol=1e-10)


def _toy_reference(x1: float, x2: float, s: float) -> tuple[float, float]:
    """The toy of the authors' code, transcribed in scalar math (note f₂'s ``+ tanh(−x₂)``)."""
    low = 0.000005
    f1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), low)) + 6
    f2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), low)) + 6
    c1 = max(math.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c2 = max(math.tanh(-x2 * 0.5), 0)
    return s * (f1 * c1 + f1_sq * c2), f2 * c1 + f2_sq * c2


@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_toy_matches_the_published_code(scale):
    problem = Toy(first_loss_scale=scale)
    pts = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0), (1.3, 2.2), (-3.0, -8.3)]
    F = problem.losses(torch.tensor(pts, dtype=torch.float64))
    for (x1, x2), row in zip(pts, F.tolist()):
        assert row == pytest.approx(_toy_reference(x1, x2, scale), abs=1e-12)
    torch.testing.assert_close(F, problem.losses_and_jacobian(torch.tensor(pts, dtype=torch.float64))[0])


def test_toy_protocol_and_pareto_set():
    problem = get_problem("toy")
    assert problem.first_loss_scale == 0.1  # Nash-MTL's variant by default
    assert problem.protocol_starts().tolist() == [list(p) for p in NASH_TOY_STARTS]
    ps = problem.pareto_set(41)
    assert ps[:, 0].min() == -7 and ps[:, 0].max() == 7
    assert ps[20, 1].item() == pytest.approx(-8.3552, abs=2e-4)  # the papers' x₂ ≈ −8.3552 at x₁ = 0
    assert torch.all((ps[:, 1] < -8.35) & (ps[:, 1] > -8.44))
    _, J = problem.losses_and_jacobian(ps)
    assert float(pareto_stationarity(J).max()) < 1e-9
    # off the set, the start points are not stationary
    _, J0 = problem.losses_and_jacobian(problem.protocol_starts())
    assert float(pareto_stationarity(J0).min()) > 1e-4
    # the front is the image of the set; its own points are at distance 0
    assert float(problem.front_distance(problem.pareto_front(41)).max()) < 1e-2


@pytest.mark.parametrize("name", ["zdt1", "zdt2", "zdt3", "dtlz2"])
def test_bounded_pareto_sets_are_stationary_on_the_active_face(name):
    problem = get_problem(name)
    X = problem.pareto_set(60)[1:-1]
    F, J = problem.losses_and_jacobian(X)
    blocked = problem.blocked_coordinates(X, J)
    Jm = J.masked_fill(blocked.unsqueeze(-2), 0.0)
    assert float(pareto_stationarity(Jm).max()) < 1e-7  # ZDT3 region ends are given to 10 digits
    assert float(problem.front_distance(F).max()) < 1e-9
    # an interior point is neither on the front nor stationary
    x = 0.3 + 0.4 * _rand((5, problem.dim), seed=4)
    F, J = problem.losses_and_jacobian(x)
    assert float(problem.front_distance(F).min()) > 1e-2
    assert float(pareto_stationarity(J).min()) > 1e-3


@pytest.mark.parametrize("options", [{}, {"imbalance": 1000.0}, {"n_tasks": 4, "dim": 6}])
def test_quadratic_front_is_analytic_and_stationary(options):
    problem = get_problem("quadratic", **options)
    X = problem.pareto_set(25)
    # Pareto set = convex hull of the centres, whatever the scales
    _, J = problem.losses_and_jacobian(X)
    assert float(pareto_stationarity(J).max()) < 1e-9
    assert float(problem.front_distance(problem.losses(X)).max()) < 1e-9
    x = problem.initial_points(5, seed=0)
    _, J = problem.losses_and_jacobian(x)
    assert float(pareto_stationarity(J).min()) > 1e-2
    # closed form: f_i = s_i/2 (x - c_i)ᵀ A (x - c_i)
    c, A, s = problem.centers, problem.A, problem.scales
    r = x[0] - c[0]
    assert problem.losses(x)[0, 0].item() == pytest.approx(0.5 * s[0].item() * (r @ A @ r).item())
    assert torch.linalg.eigvalsh(A).min() > 0


def test_noisy_gradient_is_the_gradient_of_the_stochastic_loss():
    problem = get_problem("quadratic_noisy")
    assert problem.gradient_noise_std == 1.0
    x = torch.randn(4, problem.dim, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(4, problem.n_tasks, problem.dim, dtype=torch.float64)
    f = problem.stochastic_losses(x, eps)
    g = torch.autograd.grad(f[:, 1].sum(), x)[0]
    _, J = problem.losses_and_jacobian(x.detach())
    torch.testing.assert_close(g, J[:, 1] + eps[:, 1])


def test_bad_problem_options_fail_clearly():
    with pytest.raises(ValueError, match="unknown problem 'zdt9'"):
        get_problem("zdt9")
    with pytest.raises(ValueError, match="unknown option"):
        get_problem("zdt1", n_obj=3)
    with pytest.raises(ValueError, match="n_var must be >= 2"):
        get_problem("zdt1", n_var=1)
    with pytest.raises(ValueError, match="imbalance must be > 0"):
        get_problem("quadratic", imbalance=0)
    with pytest.raises(ValueError, match="first_loss_scale"):
        get_problem("toy", first_loss_scale=-1)
    with pytest.raises(ValueError, match="n_var must be >= n_obj"):
        DTLZ2(n_var=2, n_obj=3)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 30\)"):
        get_problem("zdt1").losses(torch.zeros(4, 3))
    assert parse_problem_spec("quadratic:imbalance=1000,n_tasks=3") == (
        "quadratic", {"imbalance": 1000, "n_tasks": 3})
    with pytest.raises(ValueError, match="expected key=value"):
        parse_problem_spec("quadratic:imbalance")


def test_toy_torch_and_numpy_paths_agree():
    """On the CPU the toy's closed form runs in NumPy; the torch path (other devices) must agree."""
    problem = Toy()
    x = 8 * (2 * _rand((64, 2), seed=5) - 1)
    F_np, J_np = problem.losses_and_jacobian(x)
    F_t, J_t = problem._closed_form(x, torch, torch.tanh, torch.log, torch.clamp)
    torch.testing.assert_close(F_np, F_t, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(J_np, J_t, rtol=1e-13, atol=1e-13)
    F32, J32 = problem.losses_and_jacobian(x.float())
    assert F32.dtype == torch.float32 and J32.dtype == torch.float32


@pytest.mark.parametrize("name", ["toy", "zdt1", "dtlz2", "quadratic", "quadratic_many"])
def test_initial_points_are_reproducible_per_seed_and_differ_across_seeds(name):
    """What per-seed starts rely on: a seed fixes the draw, another seed draws elsewhere, the
    draw lies in the box (where there is one) and is finite."""
    problem = get_problem(name)
    a = problem.initial_points(4, seed=1001)
    assert a.shape == (4, problem.dim) and a.dtype == torch.float64 and bool(torch.isfinite(a).all())
    assert torch.equal(a, problem.initial_points(4, seed=1001))
    assert not torch.equal(a, problem.initial_points(4, seed=1002))
    assert torch.unique(a, dim=0).shape[0] == 4
    if problem.bounds is not None:
        lo, hi = problem.bounds
        assert bool(((a >= lo) & (a <= hi)).all())
    with pytest.raises(ValueError, match="must be >= 1"):
        problem.initial_points(0, seed=1)
