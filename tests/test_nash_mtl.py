"""Nash-MTL (Navon et al., 2022): the bargaining equations M α = 1/α, both solvers, state, edges."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import mtl_opt
from mtl_opt.methods import NashMTL, NashSolverError
import mtl_opt.solvers.nash as solvers

SIGMA = solvers.RIDGE


def random_jacobian(K: int, d: int = 30, *, seed: int = 0, dtype=torch.float64, spread: float = 1.0):
    """Gaussian rows with norms spread over exp(±spread)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(K, d, generator=gen, dtype=torch.float64)
    G = G * torch.exp(spread * torch.randn(K, 1, generator=gen, dtype=torch.float64))
    return G.to(dtype)


def nash_residual(M: torch.Tensor, alpha: torch.Tensor) -> float:
    """Relative residual ‖Mα − 1/α‖ / ‖1/α‖."""
    return float((M @ alpha - 1 / alpha).norm() / (1 / alpha).norm())


# ------------------------------------------------------------------------------------------
# The equations
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", range(2, 9))
def test_residual_is_tiny_on_random_jacobians(K, dtype):
    for seed in range(3):
        G = random_jacobian(K, seed=seed, dtype=dtype, spread=1.0)
        res = NashMTL(max_norm=0).aggregate(G)
        alpha = res.weights
        assert alpha.dtype == torch.float64 and bool((alpha > 0).all())
        # The solver saw res.gramian (float32 products for float32 G): it solves that exactly,
        # up to the documented ridge σ diag(M) (a relative ~σ β² ≲ 1e-8 here).
        assert nash_residual(res.gramian, alpha) < 1e-7
        # ‖αᵀG‖² = αᵀMα = Σ α_i (Mα)_i = K.
        assert float(alpha @ res.gramian @ alpha) == pytest.approx(K, rel=1e-7)
        assert res.direction.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        assert torch.allclose(res.direction, (alpha.to(dtype) @ G), rtol=tol, atol=tol)


def test_hand_checked_cases():
    # Orthogonal rows of norms 2 and 1/2: α = (1/2, 2), the direction is the sum of unit rows.
    G = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    res = NashMTL(max_norm=0).aggregate(G)
    assert res.weights.tolist() == pytest.approx([0.5, 2.0], rel=1e-8)
    assert res.direction.tolist() == pytest.approx([1.0, 1.0], rel=1e-8)
    # Unit rows at 60 degrees: cos = 1/2, α_i = 1/√(1.5).
    G = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    res = NashMTL(max_norm=0).aggregate(G)
    assert res.weights.tolist() == pytest.approx([1 / math.sqrt(1.5)] * 2, rel=1e-8)
    # Three orthonormal rows: α = 1, direction (1, 1, 1) of norm √3.
    G = torch.eye(3, dtype=torch.float64)
    res = NashMTL(max_norm=0).aggregate(G)
    assert res.weights.tolist() == pytest.approx([1.0] * 3, rel=1e-8)


def test_k2_closed_form_equals_newton_and_the_formula():
    gen = np.random.default_rng(3)
    J = gen.standard_normal((50, 2, 6)) * np.exp(gen.standard_normal((50, 2, 1)))
    M = J @ J.transpose(0, 2, 1)
    closed, info = solvers.nash_weights(M)
    assert info["iterations"] == 0
    form = solvers.cosine_form(M)
    beta, steps, residual = solvers.newton_cosine(form.C, np.tile([0.3, 2.0], (50, 1)))
    assert steps > 0 and residual < 1e-9
    np.testing.assert_allclose(closed, beta * form.inv_norm, rtol=1e-10)
    # α_i = 1 / (‖g_i‖ √(1 + cos θ + σ))
    norms = np.linalg.norm(J, axis=2)
    cos = M[:, 0, 1] / (norms[:, 0] * norms[:, 1])
    np.testing.assert_allclose(closed, 1 / (norms * np.sqrt(1 + cos + SIGMA)[:, None]), rtol=1e-12)
    # The single-call form (the same closed form on Python floats) gives the same numbers.
    for b in range(5):
        single, info = solvers.nash_weights(M[b])
        assert info["iterations"] == 0
        np.testing.assert_allclose(single, closed[b], rtol=1e-15)
        G = torch.from_numpy(J[b])
        np.testing.assert_allclose(NashMTL(max_norm=0).aggregate(G).weights.numpy(), closed[b], rtol=1e-12)


def test_newton_converges_quadratically_and_warm_starts():
    for K in (3, 5, 8):
        M = mtl_opt.aggregator.gramian_of(random_jacobian(K, seed=K, spread=2.0)).numpy()[None]
        alpha, info = solvers.nash_weights(M)
        assert info["iterations"] <= 10 and info["residual"] < 1e-9
        again, info2 = solvers.nash_weights(M, alpha)
        assert info2["iterations"] <= 1
        np.testing.assert_allclose(again, alpha, rtol=1e-9)


@pytest.mark.parametrize("K", [3, 4, 5, 8])
def test_single_solve_paths_agree_with_the_stacked_solver(K):
    """One Gramian is solved with direct LAPACK calls; the stacked solver serves batches. Both
    solve the same regularised equations."""
    cases = [mtl_opt.aggregator.gramian_of(random_jacobian(K, seed=s, spread=2.0)).numpy() for s in range(3)]
    # Pareto-stationary rows (weights grow to ~1/√σ: the damped phase and the rounding bound).
    rows = np.vstack([np.eye(3), -np.ones((1, 3)), np.random.default_rng(K).standard_normal((max(K - 4, 0), 3))])[:K]
    cases.append(rows @ rows.T)
    # A float32 Gramian of nearly opposing rows, possibly indefinite after rounding.
    g = np.random.default_rng(1).standard_normal((1, 40)).astype(np.float32)
    J = np.vstack([g, -g, np.random.default_rng(2).standard_normal((K - 2, 40)).astype(np.float32)])
    cases.append((J @ J.T).astype(np.float64))
    for n, M in enumerate(cases):
        # Near Pareto stationarity the weights (~1/√σ) are only determined to ~ε/σ·K.
        rtol = 1e-9 if n < 3 else 1e-5
        single, info = solvers.nash_weights(M)
        stacked, _ = solvers.nash_weights(M[None])
        np.testing.assert_allclose(single, stacked[0], rtol=rtol)
        warm, info_warm = solvers.nash_weights(M, single * 1.3)
        np.testing.assert_allclose(warm, single, rtol=rtol)


def _extended_residual(M: np.ndarray, alpha: np.ndarray) -> float:
    """max_i |α_i (M'α)_i − 1| with M' = M + σ diag(M), in extended precision."""
    Mr = M.astype(np.longdouble)
    Mr[np.diag_indices_from(Mr)] *= 1 + np.longdouble(SIGMA)
    a = alpha.astype(np.longdouble)
    return float(np.abs(a * (Mr @ a) - 1).max())


@pytest.mark.parametrize("K", [3, 4, 8])
def test_certified_last_newton_step_meets_the_tolerance(K):
    """Along a drifting sequence (directions drift, norms shrink 1% a step) the single solver
    returns its last Newton step without re-evaluating the residual; the residual it reports is
    a bound: the true residual, evaluated in extended precision, is within it and the tolerance."""
    gen = torch.Generator().manual_seed(K)
    G = torch.randn(K, 30, generator=gen, dtype=torch.float64)
    alpha, certified = None, 0
    rho_min = 8 * K * (K + 2) * np.finfo(np.float64).eps * (1 + K)  # ρ at tr H ≥ K
    for step in range(60):
        G = 0.99 * (G + 0.05 * torch.randn(K, 30, generator=gen, dtype=torch.float64))
        M = (G @ G.T).numpy()
        alpha, info = solvers.nash_weights(M, alpha)
        true = _extended_residual(M, alpha)
        assert true <= solvers.RESIDUAL_TOL
        assert true <= info["residual"] + 1e-15
        # A certified step reports a bound ≥ ρ_min; a computed residual is rarely that big.
        certified += info["residual"] >= rho_min
        stacked, _ = solvers.nash_weights(M[None], alpha[None])
        np.testing.assert_allclose(alpha, stacked[0], rtol=1e-9)
    assert certified >= 45


def test_newton_that_cannot_converge_raises_with_residual_and_iterations(monkeypatch):
    # A Pareto-stationary Gramian needs many steps (β must grow to 1/√σ); allow only two.
    G = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, 0.0]], dtype=torch.float64)
    monkeypatch.setattr(solvers, "MAX_NEWTON_ITERATIONS", 2)
    agg = NashMTL()
    with pytest.raises(NashSolverError, match=r"did not converge in 2 iterations: residual"):
        agg(G)
    assert agg.state_dict()["step"] == 0 and agg.alpha is None  # a failed solve changes nothing


# ------------------------------------------------------------------------------------------
# Scale
# ------------------------------------------------------------------------------------------
def test_scale_invariance_of_the_direction():
    G = random_jacobian(4, seed=7, spread=0.5)
    base = NashMTL(max_norm=0).aggregate(G)
    for s in (1e-6, 1e-2, 3.0, 1e4):
        scaled = NashMTL(max_norm=0).aggregate(s * G)
        np.testing.assert_allclose(scaled.weights.numpy(), base.weights.numpy() / s, rtol=1e-9)
        np.testing.assert_allclose(scaled.direction.numpy(), base.direction.numpy(), rtol=1e-8, atol=1e-12)
    # Rescaling one task's gradient alone does not change the direction either.
    per_task = torch.tensor([1e3, 1.0, 1e-3, 5.0], dtype=torch.float64)[:, None]
    other = NashMTL(max_norm=0).aggregate(per_task * G)
    np.testing.assert_allclose(other.direction.numpy(), base.direction.numpy(), rtol=1e-8, atol=1e-12)


def test_max_norm_clips_inside_the_aggregator():
    G = random_jacobian(5, seed=1)
    raw = NashMTL(max_norm=0).aggregate(G)
    assert float(raw.direction.norm()) == pytest.approx(math.sqrt(5), rel=1e-8)
    for max_norm in (1.0, 0.25):
        res = NashMTL(max_norm=max_norm).aggregate(G)
        assert float(res.direction.norm()) == pytest.approx(max_norm, rel=1e-8)
        np.testing.assert_allclose(res.direction.numpy(), (res.weights @ G).numpy(), rtol=1e-12)
        np.testing.assert_allclose(
            res.direction.numpy(), raw.direction.numpy() * max_norm / math.sqrt(5), rtol=1e-8
        )
    # A threshold above √K does nothing; K = 1 has norm 1 and is not clipped by the default.
    assert torch.allclose(NashMTL(max_norm=3.0)(G), raw.direction)
    g = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    assert NashMTL()(g).tolist() == pytest.approx([0.6, 0.8], rel=1e-12)


# ------------------------------------------------------------------------------------------
# The original's formulation in cvxpy
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [2, 3, 5, 8])
def test_exact_and_cvxpy_agree(K):
    """The acceptance test: both solvers give the same weights to 1e-5."""
    exact, sca = NashMTL(max_norm=0), NashMTL(max_norm=0, solver="cvxpy", optim_niter=50)
    for seed in range(2):
        G = random_jacobian(K, seed=100 + seed, spread=1.0)
        a = exact.aggregate(G).weights
        b = sca.aggregate(G).weights
        assert sca.last_info["solver"] == "cvxpy" and sca.last_info["iterations"] >= 1
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5)


def test_cvxpy_problem_is_built_once_and_resolved_warm():
    agg = NashMTL(solver="cvxpy", max_norm=0)
    G = random_jacobian(3, seed=5)
    agg(G)
    problem = agg._problems[3]
    agg(G * 1.01)
    assert agg._problems[3] is problem and len(agg._problems) == 1
    assert problem.problem.is_dpp()


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
def test_cvxpy_non_optimal_status_raises():
    agg = NashMTL(solver="cvxpy")
    agg.cvxpy_options = {"max_iter": 1}  # CLARABEL stops after one interior-point step
    with pytest.raises(NashSolverError, match="status 'user_limit'"):
        agg(random_jacobian(3, seed=2))
    assert agg.state_dict()["step"] == 0


def test_cvxpy_missing_solver_raises_instead_of_equal_weights():
    # The original asked for ECOS, which cvxpy >= 1.6 no longer installs, and then silently
    # kept all-ones weights. Asking for a solver that is not installed must raise.
    import cvxpy

    missing = next(s for s in ("ECOS", "MOSEK", "GUROBI", "CPLEX") if s not in cvxpy.installed_solvers())
    agg = NashMTL(solver="cvxpy")
    agg.cvxpy_solver = missing
    with pytest.raises(NashSolverError, match=missing):
        agg(random_jacobian(2, seed=2))


def test_importing_the_package_does_not_import_cvxpy():
    code = "import sys, mtl_opt; mtl_opt.get_aggregator('nash_mtl'); print('cvxpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------
# Degenerate Gramians: finite, documented answers (both solvers where they apply)
# ------------------------------------------------------------------------------------------
G3 = [1.0, 2.0, 2.0]  # norm 3
PARETO_STATIONARY = {
    "opposing pair": [G3, [-2 * v for v in G3]],
    "stationary triple": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, 0.0]],
    "opposing pair and a third task": [G3, [-v for v in G3], [0.0, 0.0, 1.0]],
}


def _run(rows, solver="exact"):
    G = torch.tensor(rows, dtype=torch.float64)
    res = NashMTL(max_norm=0, solver=solver).aggregate(G)
    assert bool(torch.isfinite(res.weights).all()) and bool(torch.isfinite(res.direction).all())
    return res


@pytest.mark.parametrize("solver", ["exact", "cvxpy"])
def test_degenerate_cases_with_a_nash_solution(solver):
    tol = 1e-12 if solver == "exact" else 1e-6
    # K = 1: α = 1/‖g‖ exactly.
    assert _run([G3], solver).weights.tolist() == pytest.approx([1 / 3], rel=tol)
    # A zero row is left out (α = 0); the rest is the K - 1 problem.
    res = _run([G3, [0.0, 0.0, 0.0]], solver)
    assert res.weights.tolist() == pytest.approx([1 / 3, 0.0], rel=tol, abs=0)
    res = _run([G3, [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], solver)
    expected = _run([G3, [0.0, 0.0, 1.0]]).weights.tolist()
    assert res.weights.tolist() == pytest.approx([expected[0], 0.0, expected[1]], rel=max(tol, 1e-9), abs=0)
    # Identical and positively collinear rows: α_i = 1/(√2 ‖g_i‖), direction √2 g/‖g‖.
    for c in (1.0, 2.0):
        res = _run([G3, [c * v for v in G3]], solver)
        assert res.weights.tolist() == pytest.approx([1 / (3 * math.sqrt(2)), 1 / (3 * c * math.sqrt(2))], rel=1e-6)
        assert res.direction.tolist() == pytest.approx([math.sqrt(2) * v / 3 for v in G3], rel=1e-6)
    res = _run([G3, G3, G3], solver)
    assert res.weights.tolist() == pytest.approx([1 / (3 * math.sqrt(3))] * 3, rel=1e-6)


def test_pareto_stationary_rows_give_the_documented_regularised_answer():
    # Exactly opposing rows: no Nash solution; α_i = 1/(‖g_i‖ √σ) and the direction is ~0.
    res = _run(PARETO_STATIONARY["opposing pair"])
    expected = [1 / (3 * math.sqrt(SIGMA)), 1 / (6 * math.sqrt(SIGMA))]
    assert res.weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(res.direction.norm()) < 1e-6
    # Zero in the convex hull of three rows: finite weights, direction of norm O(√σ).
    res = _run(PARETO_STATIONARY["stationary triple"])
    assert float(res.direction.norm()) < 1e-3
    # An opposing pair plus a third task: the pair cancels, the third keeps a unit direction.
    res = _run(PARETO_STATIONARY["opposing pair and a third task"])
    assert float(res.direction.norm()) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("case", sorted(PARETO_STATIONARY))
def test_cvxpy_near_pareto_stationarity_is_finite_or_raises(case):
    """Within the conic solver's tolerance of a Pareto-stationary point the SCA is at the limit
    of its precision: it must then return the regularised answer or raise, never NaN or stale
    weights."""
    G = torch.tensor(PARETO_STATIONARY[case], dtype=torch.float64)
    exact = NashMTL(max_norm=0).aggregate(G)
    try:
        res = NashMTL(max_norm=0, solver="cvxpy").aggregate(G)
    except NashSolverError as exc:
        assert "CLARABEL" in str(exc)
        return
    assert bool(torch.isfinite(res.weights).all())
    np.testing.assert_allclose(res.direction.numpy(), exact.direction.numpy(), atol=1e-3)


def test_all_zero_gradients_give_zero_weights_and_direction():
    res = NashMTL().aggregate(torch.zeros(3, 4))
    assert res.weights.tolist() == [0.0, 0.0, 0.0] and res.direction.tolist() == [0.0] * 4


def test_float32_gramian_that_rounding_made_indefinite():
    # Nearly opposing float32 rows: the float32 Gramian can have cos θ slightly below -1.
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        g = torch.randn(1, 64, generator=gen)
        G = torch.cat([g, -g * 1.0000001 + 1e-9 * torch.randn(1, 64, generator=gen)])
        res = NashMTL().aggregate(G)
        assert bool(torch.isfinite(res.weights).all()) and bool(torch.isfinite(res.direction).all())
        G3 = torch.cat([G, torch.randn(1, 64, generator=gen)])
        assert bool(torch.isfinite(NashMTL()(G3)).all())


# ------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------
def test_update_weights_every_reuses_the_cached_alpha():
    agg = NashMTL(update_weights_every=3, max_norm=0)
    Gs = [random_jacobian(3, seed=s) for s in range(7)]
    fresh = [NashMTL(max_norm=0).aggregate(G).weights for G in Gs]
    for t, G in enumerate(Gs):
        res = agg.aggregate(G)
        solved_at = 3 * (t // 3)
        assert agg.last_info["resolved"] == (t % 3 == 0)
        np.testing.assert_allclose(res.weights.numpy(), fresh[solved_at].numpy(), rtol=1e-9)
        np.testing.assert_allclose(res.direction.numpy(), (fresh[solved_at] @ G).numpy(), rtol=1e-8, atol=1e-10)
    # Reused weights are clipped against the new Jacobian.
    clipped = NashMTL(update_weights_every=2, max_norm=0.5)
    clipped(Gs[0])
    assert float(clipped(Gs[1]).norm()) == pytest.approx(0.5, rel=1e-9)


def test_state_dict_round_trip_and_reset():
    Gs = [random_jacobian(4, seed=s) for s in range(6)]
    agg = NashMTL(update_weights_every=2)
    for G in Gs[:3]:
        agg(G)
    state = agg.state_dict()
    assert state["step"] == 3 and state["alpha"].shape == (4,)
    other = NashMTL(update_weights_every=2)
    other.load_state_dict(state)
    state["alpha"].mul_(0)  # the returned state is a copy
    for G in Gs[3:]:
        assert torch.equal(agg(G), other(G))
    agg.reset()
    assert agg.state_dict() == {"step": 0, "alpha": None, "batch_step": 0, "batch_alpha": None}
    # A counter without cached weights (e.g. a hand-made state) solves at the next call.
    agg.load_state_dict({"step": 1, "alpha": None, "batch_step": 1, "batch_alpha": None})
    assert agg(Gs[0]).shape == (30,) and agg.last_info["resolved"]
    assert agg.aggregate_batch(torch.stack(Gs[:2])).shape == (2, 30) and agg.last_info["resolved"]
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"step": 1})
    with pytest.raises(ValueError, match="alpha"):
        other.load_state_dict({"step": 1, "alpha": torch.tensor([float("nan")]), "batch_step": 0, "batch_alpha": None})


@pytest.mark.parametrize("solver", ["exact", "cvxpy"])
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("K", [2, 3])
def test_resume_from_state_dict_is_bit_for_bit(solver, every, K, tmp_path):
    """N calls, state saved to disk (torch.save / weights_only load), a fresh instance loads it
    and makes M more calls: identical to N + M calls of one instance, single and batched."""
    N, M = 4, 5
    Gs = [random_jacobian(K, seed=200 + s) for s in range(N + M)]
    batches = [torch.stack([G, 2.0 * G.flip(0)]) for G in Gs]
    whole = NashMTL(solver=solver, update_weights_every=every)
    expected = [whole(G) for G in Gs]
    expected_batch = [whole.aggregate_batch(B) for B in batches]
    first = NashMTL(solver=solver, update_weights_every=every)
    for G, B in zip(Gs[:N], batches[:N]):
        first(G)
        first.aggregate_batch(B)
    torch.save(first.state_dict(), tmp_path / "nash.pt")
    resumed = NashMTL(solver=solver, update_weights_every=every)
    resumed.load_state_dict(torch.load(tmp_path / "nash.pt", weights_only=True))
    got = [resumed(G) for G in Gs[N:]]
    got_batch = [resumed.aggregate_batch(B) for B in batches[N:]]
    for want, have in zip(expected[N:] + expected_batch[N:], got + got_batch):
        assert torch.equal(want, have)


def test_changing_the_number_of_tasks_needs_a_reset():
    agg = NashMTL()
    agg(random_jacobian(3))
    with pytest.raises(ValueError, match="reset"):
        agg(random_jacobian(4))
    agg.reset()
    agg(random_jacobian(4))


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [2, 3, 5])
def test_batch_equals_loop_with_per_entry_state(K):
    B = 4
    batch = NashMTL(update_weights_every=2)
    loops = [NashMTL(update_weights_every=2) for _ in range(B)]
    for step in range(3):
        G = torch.stack([random_jacobian(K, seed=10 * step + b, spread=1.0) for b in range(B)])
        G[1, 0] = 0.0  # one entry with a zero-gradient task
        out = batch.aggregate_batch(G)
        expected = torch.stack([loops[b](G[b]) for b in range(B)])
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
    assert batch.state_dict()["batch_step"] == 3 and batch.state_dict()["batch_alpha"].shape == (B, K)
    with pytest.raises(ValueError, match="per batch entry"):
        batch.aggregate_batch(torch.randn(B + 1, K, 30, dtype=torch.float64))


def test_batch_with_cvxpy_matches_exact():
    G = torch.stack([random_jacobian(3, seed=s) for s in range(2)])
    a = NashMTL(solver="cvxpy").aggregate_batch(G)
    b = NashMTL().aggregate_batch(G)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Construction
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"update_weights_every": 0},
        {"optim_niter": 0},
        {"max_norm": -1.0},
        {"max_norm": float("inf")},
        {"solver": "ecos"},
    ],
)
def test_out_of_range_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError):
        NashMTL(**kwargs)


def test_non_integer_counts_raise():
    with pytest.raises(TypeError):
        NashMTL(update_weights_every=1.5)
    with pytest.raises(TypeError):
        NashMTL(optim_niter=True)


def test_registry_and_repr():
    agg = mtl_opt.get_aggregator("nash_mtl", solver="cvxpy", update_weights_every=4)
    assert isinstance(agg, NashMTL)
    assert repr(agg) == "NashMTL(update_weights_every=4, optim_niter=20, max_norm=1.0, solver='cvxpy')"
    assert mtl_opt.parse_method_spec("nash_mtl:max_norm=0,solver=exact") == (
        "nash_mtl", {"max_norm": 0, "solver": "exact"}
    )
