"""The exact min-norm and conflict-averse solvers (mtl_opt.solvers): known answers, KKT
certificates, batching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_opt.solvers import ZERO_NORM_RTOL, conflict_averse, min_norm_weights
import mtl_opt.solvers.cagrad_dual as conflict_averse_module
import mtl_opt.solvers.min_norm as min_norm_module


def gramian(G: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(G @ G.T)


@st.composite
def jacobians(draw, k_min=2, k_max=8):
    """Random Jacobians, including rank-deficient, collinear, duplicate and zero rows."""
    K = draw(st.integers(k_min, k_max))
    d = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(K, d)) * rng.uniform(0.05, 20.0, size=(K, 1))
    kind = draw(st.sampled_from(["plain", "opposite", "duplicate", "zero", "scaled"]))
    if kind == "opposite":
        G[1] = -rng.uniform(0.1, 3.0) * G[0]
    elif kind == "duplicate":
        G[-1] = G[0]
    elif kind == "zero":
        G[0] = 0.0
    elif kind == "scaled":
        G *= 10.0 ** rng.integers(-6, 7)
    return G


def min_norm_by_enumeration(M: np.ndarray) -> float:
    """Smallest αᵀMα over every face of the simplex (each face's equality-constrained minimiser
    by least squares, kept when feasible): an exhaustive, independent reference."""
    K = M.shape[0]
    best = np.inf
    for size in range(1, K + 1):
        for S in itertools.combinations(range(K), size):
            S = list(S)
            n = len(S)
            A = np.zeros((n + 1, n + 1))
            A[:n, :n] = M[np.ix_(S, S)]
            A[:n, n] = A[n, :n] = 1.0
            rhs = np.zeros(n + 1)
            rhs[n] = 1.0
            sol = np.linalg.lstsq(A, rhs, rcond=None)[0][:n]
            if sol.min() >= -1e-12:
                a = np.zeros(K)
                a[S] = np.clip(sol, 0, None) / np.clip(sol, 0, None).sum()
                best = min(best, float(a @ M @ a))
    return best


# ---------------------------------------------------------------------------------- min-norm
def test_min_norm_two_rows_closed_form():
    g1, g2 = np.array([2.0, 0.0]), np.array([-1.0, 1.0])
    M = gramian(np.stack([g1, g2]))
    gamma = ((g2 - g1) @ g2) / ((g2 - g1) @ (g2 - g1))  # α1 minimising ‖α1 g1 + (1−α1) g2‖
    torch.testing.assert_close(min_norm_weights(M), torch.tensor([gamma, 1 - gamma], dtype=torch.float64))
    # non-conflicting case: the shorter row is the vertex
    M2 = gramian(np.array([[1.0, 0.2], [3.0, 1.0]]))
    torch.testing.assert_close(min_norm_weights(M2), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_min_norm_orthogonal_rows():
    norms2 = np.array([1.0, 4.0, 0.25, 9.0])
    M = torch.from_numpy(np.diag(norms2))
    expected = (1 / norms2) / (1 / norms2).sum()
    torch.testing.assert_close(min_norm_weights(M), torch.from_numpy(expected), rtol=1e-12, atol=1e-14)


def test_min_norm_degenerate_inputs():
    assert torch.equal(min_norm_weights(torch.ones(1, 1)), torch.ones(1, dtype=torch.float64))
    zero = min_norm_weights(torch.zeros(4, 4))
    torch.testing.assert_close(zero, torch.full((4,), 0.25, dtype=torch.float64))
    identical = min_norm_weights(gramian(np.ones((3, 5))))
    assert torch.isfinite(identical).all() and abs(float(identical.sum()) - 1) < 1e-12
    with pytest.raises(ValueError, match="finite"):
        min_norm_weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        min_norm_weights(torch.ones(3))


@settings(max_examples=120, deadline=None, derandomize=True)
@given(jacobians())
def test_min_norm_kkt_and_objective(G):
    M = G @ G.T
    scale = M.diagonal().max()
    alpha = min_norm_weights(torch.from_numpy(M)).numpy()
    assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-12
    f = alpha @ M @ alpha
    grad = M @ alpha
    support = alpha > 1e-9
    assert np.all(grad >= f - 1e-9 * scale)  # (Mα)_i ≥ αᵀMα everywhere ...
    assert np.all(np.abs(grad[support] - f) <= 1e-9 * scale)  # ... with equality on the support
    assert f - min_norm_by_enumeration(M) <= 1e-9 * scale


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 10**6))
def test_min_norm_batch_equals_single(K, B, seed):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(B, K, 4))
    M = torch.from_numpy(G @ G.transpose(0, 2, 1))
    batched = min_norm_weights(M)
    assert batched.shape == (B, K)
    for b in range(B):  # a single Gramian takes the active set on floats: rounding may differ
        single = min_norm_weights(M[b])
        scale = float(M[b].diagonal().max())
        assert abs(float(single @ M[b] @ single - batched[b] @ M[b] @ batched[b])) <= 1e-12 * scale
        np.testing.assert_allclose(single.numpy() @ G[b], batched[b].numpy() @ G[b], atol=1e-7 * np.sqrt(scale))


# ---------------------------------------------------------------------------- conflict-averse
def F(M: np.ndarray, w: np.ndarray, c: float) -> float:
    K = M.shape[0]
    s = c * np.sqrt(max(M.sum() / K**2, 0.0))
    return float(w @ M.sum(axis=1) / K + s * np.sqrt(max(w @ M @ w, 0.0)))


def test_conflict_averse_orthonormal_pair_by_hand():
    # g1 = e1, g2 = e2: by symmetry w = (½, ½); g0 = (½, ½), ‖g0‖ = 1/√2, u = g0 + c‖g0‖ g_w/‖g_w‖
    c = 0.4
    M = torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(conflict_averse(M, c)[0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    gamma = conflict_averse(M, c)[1]  # u = γᵀG = γ here
    torch.testing.assert_close(gamma, torch.tensor([0.5 + c / 2, 0.5 + c / 2], dtype=torch.float64))


def test_conflict_averse_two_rows_matches_fine_grid():
    rng = np.random.default_rng(3)
    grid = np.linspace(0.0, 1.0, 200001)
    for _ in range(20):
        G = rng.normal(size=(2, 3))
        M = G @ G.T
        c = float(rng.uniform(0.0, 2.0))
        s = c * np.sqrt(M.sum() / 4)
        b = M.sum(axis=1) / 2
        quad = grid**2 * M[0, 0] + 2 * grid * (1 - grid) * M[0, 1] + (1 - grid) ** 2 * M[1, 1]
        values = grid * b[0] + (1 - grid) * b[1] + s * np.sqrt(np.clip(quad, 0, None))
        w = conflict_averse(torch.from_numpy(M), c)[0].numpy()
        assert F(M, w, c) <= values.min() + 1e-12 * M.diagonal().max()
        assert abs(w[0] - grid[values.argmin()]) < 1e-3 or abs(F(M, w, c) - values.min()) < 1e-10


@settings(max_examples=120, deadline=None, derandomize=True)
@given(jacobians(), st.sampled_from([0.0, 0.05, 0.4, 0.99, 1.0, 1.5, 5.0]))
def test_conflict_averse_kkt_and_duality(G, c):
    """KKT of F on the simplex, and a zero duality gap with CAGrad's primal (eq. 3)."""
    M = G @ G.T
    K = M.shape[0]
    scale = M.diagonal().max()
    w = conflict_averse(torch.from_numpy(M), c)[0].numpy()
    gamma = conflict_averse(torch.from_numpy(M), c)[1].numpy()
    assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
    s = c * np.sqrt(max(M.sum() / K**2, 0.0))
    r2 = w @ M @ w
    value = F(M, w, c)
    if s > 0 and r2 > ZERO_NORM_RTOL * scale:
        grad = M.sum(axis=1) / K + s * (M @ w) / np.sqrt(r2)
        assert np.all(grad >= w @ grad - 1e-8 * scale)
    # Dual certificate: d = γᵀG is in the ball ‖d − g0‖ ≤ s and min_i g_i·d = F(w*) (strong duality).
    d = gamma @ G
    g0 = G.mean(axis=0)
    assert np.linalg.norm(d - g0) <= s + 1e-9 * np.sqrt(scale)
    if s > 0:  # (see the tolerance note below)
        assert (G @ d).min() >= value - 1e-8 * scale - 1e-7 * s * np.sqrt(scale)
    # ... and no vertex or random feasible point does better. Near g_w = 0 the Gramian (which
    # squares the rows) knows ‖g_w‖ only to √(ε max_i‖g_i‖²), hence the second tolerance term.
    tol = 1e-9 * scale + 1e-7 * s * np.sqrt(scale)
    assert value <= min(F(M, e, c) for e in np.eye(K)) + tol
    rng = np.random.default_rng(0)
    for v in rng.dirichlet(np.ones(K), size=50):
        assert value <= F(M, v, c) + tol


def test_conflict_averse_zero_norm_optimum_is_certified():
    # g1 = 0: F(w) = w2 (g0·g2 + s‖g2‖) ≥ 0, so w* = e1, g_w* = 0 and u = g0.
    G = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, -1.0], [0.5, 1.0, -0.5]])
    M = torch.from_numpy(G @ G.T)
    for c in (0.2, 0.4, 2.0):
        torch.testing.assert_close(conflict_averse(M, c)[1], torch.full((3,), 1 / 3, dtype=torch.float64))
    # collinear, conflicting rows with c ≥ 1: the origin is optimal; every d ⊥ the rows in the
    # ball is primal-optimal and the one closest to g0 = (−1/6, 0) is d = proj_{Gd ≥ 0}(g0) = 0.
    G2 = np.array([[1.0, 0.0], [-2.0, 0.0], [0.5, 0.0]])
    for K in (2, 3):  # the K = 2 closed form and the general solver
        rows = G2[:K]
        gamma = conflict_averse(torch.from_numpy(rows @ rows.T), 1.2)[1].numpy()
        np.testing.assert_allclose(gamma @ rows, np.zeros(2), atol=1e-12)


def test_conflict_averse_rejects_bad_c():
    with pytest.raises(ValueError, match="c"):
        conflict_averse(torch.eye(2), -0.1)[0]
    with pytest.raises(ValueError, match="c"):
        conflict_averse(torch.eye(2), float("nan"))[0]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 10**6), st.sampled_from([0.0, 0.4, 1.3]))
def test_conflict_averse_batch_equals_single(K, B, seed, c):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(B, K, 4))
    M = torch.from_numpy(G @ G.transpose(0, 2, 1))
    batched = conflict_averse(M, c)[1]
    for b in range(B):  # vectorised and single-entry arithmetic may round differently
        torch.testing.assert_close(batched[b], conflict_averse(M[b], c)[1], rtol=1e-12, atol=1e-14)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(jacobians(k_min=2, k_max=2), st.sampled_from([0.0, 0.3, 1.0, 2.5]))
def test_two_task_closed_forms_agree_with_the_general_solvers(G, c):
    """The K = 2 closed forms and the general (NNLS / root-search) solvers give the same answer."""
    from mtl_opt.solvers.cagrad_dual import _conflict_averse_general, _conflict_averse_small
    from mtl_opt.solvers.min_norm import _min_norm_batch, _min_norm_general

    M = G @ G.T
    scale = M.diagonal().max()
    a_closed, a_general = _min_norm_batch(M[None])[0], _min_norm_general(M)
    assert abs(a_closed @ M @ a_closed - a_general @ M @ a_general) <= 1e-10 * scale
    np.testing.assert_allclose(a_closed @ G, a_general @ G, atol=1e-7 * np.sqrt(scale))
    w_closed, gamma_closed = (x[0] for x in _conflict_averse_small(M[None], c))
    w_general, gamma_general = _conflict_averse_general(M, c)
    s = c * np.sqrt(max(M.sum() / 4, 0.0))
    assert abs(F(M, w_closed, c) - F(M, w_general, c)) <= 1e-9 * scale + 1e-7 * s * np.sqrt(scale)
    # The direction is unique unless the origin is in the hull (then CAGrad's primal can have a
    # whole face of optima, e.g. c = 1 with opposing collinear rows).
    a = _min_norm_general(M)
    if a @ M @ a > 1e-12 * scale:
        np.testing.assert_allclose(gamma_closed @ G, gamma_general @ G, atol=1e-6 * np.sqrt(scale))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(jacobians(k_min=3, k_max=3), st.sampled_from([0.0, 0.3, 1.0, 2.5]))
def test_three_task_face_enumeration_agrees_with_the_general_solvers(G, c):
    """The vectorised K = 3 face enumeration and the general (NNLS / root-search) solvers agree."""
    from mtl_opt.solvers.cagrad_dual import _conflict_averse_3, _conflict_averse_general
    from mtl_opt.solvers.min_norm import _min_norm_3, _min_norm_general

    M = G @ G.T
    scale = M.diagonal().max()
    a_enum, a_general = _min_norm_3(M[None])[0], _min_norm_general(M)
    assert abs(a_enum @ M @ a_enum - a_general @ M @ a_general) <= 1e-10 * scale
    np.testing.assert_allclose(a_enum @ G, a_general @ G, atol=1e-7 * np.sqrt(scale))
    w_enum, gamma_enum = (x[0] for x in _conflict_averse_3(M[None], c))
    w_general, gamma_general = _conflict_averse_general(M, c)
    s = c * np.sqrt(max(M.sum() / 9, 0.0))
    assert abs(F(M, w_enum, c) - F(M, w_general, c)) <= 1e-9 * scale + 1e-7 * s * np.sqrt(scale)
    # The direction is unique unless the origin is in the hull (then CAGrad's primal can have a
    # whole face of optima, e.g. c = 1 with opposing collinear rows).
    a = _min_norm_general(M)
    if a @ M @ a > 1e-12 * scale:
        np.testing.assert_allclose(gamma_enum @ G, gamma_general @ G, atol=1e-6 * np.sqrt(scale))


# ------------------------------------------------------------------ mixed gradient scales
def primal_dual_gap(G: np.ndarray, c: float, w: np.ndarray, gamma: np.ndarray) -> tuple[float, float]:
    """``(F(w) − min_i g_i·u, ‖u − g0‖ − s)`` for ``u = γᵀG``, evaluated on the rows (never on M).

    By weak duality ``min_i g_i·u ≤ F(w')`` for every feasible ``u`` and every ``w' ∈ Δ``, so a
    small non-negative gap certifies both ``u`` (primal) and ``w`` (dual) independently of the
    solver.
    """
    g0 = G.mean(axis=0)
    s = c * np.linalg.norm(g0)
    u = gamma @ G
    dual = float(w @ (G @ g0) + s * np.linalg.norm(w @ G))
    return dual - float((G @ u).min()), float(np.linalg.norm(u - g0) - s)


# A reviewer's reproducer: row norms ≈ 1e3, 4e-3, 2e2, 2. The old KKT test added an allowance
# of 100·s·ε/r² (r² relative to the largest row), ≈ 1e-3 near the tiny row, and certified
# w = e₂, whose direction has g_4·u ≈ −145; the optimum has min_i g_i·u ≈ −0.215.
REPRODUCER_G = np.array(
    [
        [-629.354924, 231.511064, 700.151751, 663.657571],
        [0.001972, 0.000209, -0.000592, -0.000126],
        [-72.498546, 108.737383, -30.027813, 173.965939],
        [-1.67085, 0.829629, -0.574739, -1.173159],
    ]
)


def test_conflict_averse_mixed_scale_reproducer():
    G, c = REPRODUCER_G, 0.4
    M = torch.from_numpy(G @ G.T)
    scale = float(M.diagonal().max())
    w = conflict_averse(M, c)[0].numpy()
    gamma = conflict_averse(M, c)[1].numpy()
    gap, infeasibility = primal_dual_gap(G, c, w, gamma)
    assert infeasibility <= 1e-12 * np.linalg.norm(G.mean(axis=0))
    assert -1e-12 * scale <= gap <= 1e-10 * scale
    # the worst task's directional derivative (Clarabel on the primal: −0.21504538)
    assert abs(float((G @ (gamma @ G)).min()) + 0.2150454) < 1e-6


def mixed_scale_jacobian(K: int, d: int, seed: int) -> np.ndarray:
    """Gaussian rows whose norms span a ratio of 1e2 … 1e6 (log-uniform, both ends present)."""
    rng = np.random.default_rng(seed)
    ratio = 10.0 ** rng.uniform(2.0, 6.0)
    norms = np.exp(rng.uniform(0.0, np.log(ratio), size=K))
    norms[rng.permutation(K)[:2]] = [1.0, ratio]
    G = rng.normal(size=(K, d))
    return G / np.linalg.norm(G, axis=1, keepdims=True) * norms[:, None] * 10.0 ** rng.integers(-3, 4)


@pytest.mark.parametrize("K", range(2, 9))
@pytest.mark.parametrize("c", [0.1, 0.4, 0.9, 2.0])
def test_conflict_averse_mixed_scales_have_zero_duality_gap(K, c):
    """Row-norm ratios up to 1e6, K = 2 (closed form), 3 (face enumeration) to 8 (root search):
    the returned pair is certified on the rows to the solver's tolerance
    ``1e-10 · (1 + s/max_i‖g_i‖) · max_i‖g_i‖²`` (plus 1e-12 of it for the check's own rounding)."""
    for seed in range(8):
        G = mixed_scale_jacobian(K, 12 if seed % 2 else K - 1, 100 * K + seed)
        M = G @ G.T
        scale = M.diagonal().max()
        w = conflict_averse(torch.from_numpy(M), c)[0].numpy()
        gamma = conflict_averse(torch.from_numpy(M), c)[1].numpy()
        if w @ M @ w <= ZERO_NORM_RTOL * scale:
            continue  # origin optimum: covered by the zero-norm tests
        gap, infeasibility = primal_dual_gap(G, c, w, gamma)
        s = c * np.linalg.norm(G.mean(axis=0))
        assert infeasibility <= 1e-10 * s
        tol = 1e-10 * (1.0 + s / np.sqrt(scale)) * scale + 1e-12 * scale
        assert -1e-12 * scale <= gap <= tol, (K, c, seed, gap / scale)


@pytest.mark.parametrize("K", range(3, 9))
def test_min_norm_mixed_scales_are_certified(K):
    """MGDA's min-norm point with row-norm ratios up to 1e6: the Wolfe duality gap on the rows,
    ``‖x‖² − min_i g_i·x`` for ``x = αᵀG``, is at most 2e-10 · max_i‖g_i‖²."""
    for seed in range(8):
        G = mixed_scale_jacobian(K, 12 if seed % 2 else K - 1, 7 + 100 * K + seed)
        M = G @ G.T
        alpha = min_norm_weights(torch.from_numpy(M)).numpy()
        x = alpha @ G
        assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-12
        assert x @ x - (G @ x).min() <= 2e-10 * M.diagonal().max()


def test_two_tasks_without_radius_emit_no_warning():
    """c = 0 at K = 2 (a linear objective): no division warnings reach the user (equal row norms
    once made the edge's closed form compute 0 · ∞ outside its error-state guard)."""
    import warnings

    G = np.array([[1.0, 2.0], [-2.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gamma = conflict_averse(gramian(G), 0.0)[1]
    torch.testing.assert_close(gamma, torch.full((2,), 0.5, dtype=torch.float64))


# ------------------------------------------------- K = 4, 5: face enumeration in one batched solve
def _assert_enumeration_matches_general(G: np.ndarray, c: float) -> None:
    """The K = 4, 5 face enumeration and the general (NNLS / root-search) solvers agree: the
    min-norm objective to the KKT tolerance (gap ≤ 2e-10 · max_i M_ii) and F to the certificate's
    ``1e-10 · (1 + s)`` (test margins as at K = 3)."""
    from mtl_opt.solvers.cagrad_dual import _conflict_averse_faces, _conflict_averse_general
    from mtl_opt.solvers.min_norm import _min_norm_faces, _min_norm_general

    M = G @ G.T
    K = M.shape[0]
    scale = M.diagonal().max()
    a_enum, a_general = _min_norm_faces(M[None])[0], _min_norm_general(M)
    assert a_enum.min() >= 0 and abs(a_enum.sum() - 1) < 1e-12
    assert abs(a_enum @ M @ a_enum - a_general @ M @ a_general) <= 2e-10 * scale
    w_enum, gamma_enum = (x[0] for x in _conflict_averse_faces(M[None], c))
    w_general, gamma_general = _conflict_averse_general(M, c)
    assert w_enum.min() >= 0 and abs(w_enum.sum() - 1) < 1e-12
    s = c * np.sqrt(max(M.sum() / K**2, 0.0))
    assert abs(F(M, w_enum, c) - F(M, w_general, c)) <= 1e-9 * scale + 1e-7 * s * np.sqrt(scale)
    if a_general @ M @ a_general > 1e-12 * scale:  # unique direction away from the origin
        np.testing.assert_allclose(gamma_enum @ G, gamma_general @ G, atol=1e-6 * np.sqrt(scale))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(jacobians(k_min=4, k_max=5), st.sampled_from([0.0, 0.3, 1.0, 2.5]))
def test_four_and_five_task_face_enumeration_agrees_with_the_general_solvers(G, c):
    _assert_enumeration_matches_general(G, c)


def _degenerate_jacobian(K: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(K)
    G = rng.normal(size=(K, 6))
    if kind == "zero":
        G[2] = 0.0
    elif kind == "duplicate":
        G[3] = G[1]
    elif kind == "opposite":
        G[1] = -0.7 * G[0]
    elif kind == "near-opposite":
        G[1] = -2.0 * G[0] + 1e-6 * rng.normal(size=6)
    elif kind == "collinear":
        G = np.outer(rng.normal(size=K), rng.normal(size=6))
    elif kind == "all-zero":
        G[:] = 0.0
    return G


@pytest.mark.parametrize("K", [4, 5])
@pytest.mark.parametrize("kind", ["zero", "duplicate", "opposite", "near-opposite", "collinear", "all-zero"])
@pytest.mark.parametrize("c", [0.0, 0.4, 1.5])
def test_face_enumeration_degenerate_gramians(K, kind, c):
    _assert_enumeration_matches_general(_degenerate_jacobian(K, kind), c)


@pytest.mark.parametrize("K", [4, 5])
@pytest.mark.parametrize("c", [0.1, 0.4, 2.0])
def test_face_enumeration_mixed_scales(K, c):
    """Row-norm ratios up to 1e6 (faces of tiny rows have tiny bordered determinants)."""
    for seed in range(6):
        _assert_enumeration_matches_general(mixed_scale_jacobian(K, 12 if seed % 2 else K - 1, 900 + seed), c)


def _recording(monkeypatch, name: str) -> list:
    """Wrap the general solver ``name`` (of mtl_opt.solvers.min_norm or .conflict_averse, where
    the batched solvers call it) so that its calls are recorded."""
    module = min_norm_module if name == "_min_norm_general" else conflict_averse_module
    calls: list = []
    original = getattr(module, name)

    def wrapped(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize("K", [4, 5])
def test_face_enumeration_certifies_random_problems_without_fallback(K, monkeypatch):
    """The public batched entry points take the enumeration at K = 4, 5 and certify it on
    well-conditioned problems (no general-solver call), with KKT / duality holding."""
    mn_calls = _recording(monkeypatch, "_min_norm_general")
    ca_calls = _recording(monkeypatch, "_conflict_averse_general")
    rng = np.random.default_rng(K)
    G = rng.normal(size=(16, K, 20)) * rng.uniform(0.1, 10.0, size=(16, K, 1))
    M = G @ G.transpose(0, 2, 1)
    alpha = min_norm_weights(torch.from_numpy(M)).numpy()
    w = conflict_averse(torch.from_numpy(M), 0.4)[0].numpy()
    assert mn_calls == [] and ca_calls == []
    for b in range(16):
        scale = M[b].diagonal().max()
        grad = M[b] @ alpha[b]
        assert grad.min() >= alpha[b] @ grad - 1e-10 * scale
        assert F(M[b], w[b], 0.4) <= min(F(M[b], v, 0.4) for v in rng.dirichlet(np.ones(K), 30)) + 1e-12 * scale


@pytest.mark.parametrize("K", [4, 5])
def test_face_enumeration_falls_back_when_it_cannot_certify(K, monkeypatch):
    """An enumeration that cannot certify its candidate hands the entry to the general solver.

    Simulated: only the vertex faces are offered (the others marked not solvable), while the
    optimum of orthogonal rows is on no vertex; the vertex fails the KKT test / certificate, so the
    general solver must be called, and its certified answer returned."""
    from mtl_opt.solvers._linalg import face_constants, face_systems

    def vertices_only(A, b):
        a, e, ok = face_systems(A, b)
        ok = ok & (face_constants(A.shape[1])[0].sum(axis=1) == 1)
        return a, e, ok

    for module in (min_norm_module, conflict_averse_module):
        monkeypatch.setattr(module, "face_systems", vertices_only)
    mn_calls = _recording(monkeypatch, "_min_norm_general")
    ca_calls = _recording(monkeypatch, "_conflict_averse_general")
    M = np.diag(np.arange(1.0, K + 1.0))[None]
    alpha = min_norm_module._min_norm_batch(M)[0]
    assert len(mn_calls) == 1
    expected = (1 / np.arange(1.0, K + 1.0)) / (1 / np.arange(1.0, K + 1.0)).sum()
    np.testing.assert_allclose(alpha, expected, rtol=1e-10)
    w, _ = conflict_averse_module._conflict_averse_batch(M, 0.4)
    assert len(ca_calls) == 1
    assert F(M[0], w[0], 0.4) < min(F(M[0], v, 0.4) for v in np.eye(K)) - 1e-3  # not a vertex


@pytest.mark.parametrize("K", [4, 5])
def test_face_enumeration_natural_fallback_near_opposite_rows(K, monkeypatch):
    """Near-opposite rows (origin almost in the hull, objective ~1e-12 of the scale): on some of
    these the enumeration's best candidate fails the KKT test (about 1–2 % of them); those entries
    go to the general solver, and every returned point is certified."""
    from mtl_opt.solvers.min_norm import _min_norm_faces

    calls = _recording(monkeypatch, "_min_norm_general")
    Gs = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        G = rng.normal(size=(K, 3))
        G[1] = -2.0 * G[0] + 1e-6 * rng.normal(size=3)
        Gs.append(G)
    G = np.stack(Gs)
    M = G @ G.transpose(0, 2, 1)
    alpha = _min_norm_faces(M)
    assert 1 <= len(calls) <= 20
    for b in range(len(M)):
        grad = M[b] @ alpha[b]
        assert grad.min() >= alpha[b] @ grad - 1e-10 * M[b].diagonal().max()


@pytest.mark.parametrize("K", [4, 5])
def test_face_enumeration_origin_optimum_is_certified_by_the_cone_projection(K, monkeypatch):
    """Collinear conflicting rows with c ≥ 1: the origin is optimal and certified by
    ‖proj_{cone(rows)}(−g0)‖ ≤ s without the general solver; the direction is the primal optimum
    closest to g0 (here d = 0, as at K = 2, 3)."""
    calls = _recording(monkeypatch, "_conflict_averse_general")
    rows = np.array([[1.0, 0.0], [-2.0, 0.0], [0.5, 0.0], [-1.0, 0.0], [3.0, 0.0]])[:K]
    gamma = conflict_averse(torch.from_numpy(rows @ rows.T), 1.2)[1].numpy()
    np.testing.assert_allclose(gamma @ rows, np.zeros(2), atol=1e-12)
    assert calls == []
