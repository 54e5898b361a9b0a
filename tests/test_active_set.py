"""The single-Gramian active-set solvers on Python floats (``mtl_opt.solvers._active_set``).

They must return only certified optima (checked here independently of their own certificate),
agree with the batched NumPy solvers, really run (not fall back) on generic problems, and hand
the cases they cannot certify to the batched path (``None``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtl_opt.solvers import _active_set as active
from mtl_opt.solvers._active_set import ACTIVE_SET_MAX_K, conflict_averse_floats, min_norm_floats
from mtl_opt.methods import CAGrad, CAMEGrad, MGDA
from mtl_opt.solvers.cagrad_dual import _conflict_averse_batch as conflict_averse_batch_np
from mtl_opt.solvers.min_norm import _min_norm_batch as min_norm_batch_np


def _problems(seed: int, n: int, *, generic: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """(G, M) pairs, K = 3..8: shared components (conflict or agreement), mixed row scales,
    and unless ``generic``, duplicate rows and rank-deficient Jacobians (d < K)."""
    rng = np.random.default_rng(seed)
    out = []
    for trial in range(n):
        K = int(rng.integers(3, ACTIVE_SET_MAX_K + 1))
        d = int(rng.integers(K + 2, 40)) if generic else int(rng.integers(1, 40))
        G = rng.standard_normal((K, d)) + rng.uniform(-1.0, 2.0) * rng.standard_normal(d)
        if trial % 3 == 0:
            G *= 10.0 ** rng.uniform(-2, 2, size=(K, 1))
        if not generic and trial % 5 == 0:
            G[1] = G[0]
        M = G @ G.T
        out.append((G, 0.5 * (M + M.T)))
    return out


def _ca_value(M: np.ndarray, w: np.ndarray, c: float) -> tuple[float, float]:
    """``F(w) = wᵀM1/K + c‖g0‖√(wᵀMw)`` and ``s = c‖g0‖``."""
    K = M.shape[0]
    s = c * math.sqrt(max(M.sum() / K**2, 0.0))
    return float(w @ M.sum(axis=1) / K + s * math.sqrt(max(w @ M @ w, 0.0))), s


# ------------------------------------------------------------------------------------------------
# Min-norm point
# ------------------------------------------------------------------------------------------------
def test_min_norm_is_certified_and_no_worse_than_the_batched_solver() -> None:
    for G, M in _problems(0, 600, generic=True):
        assert min_norm_floats(M.tolist()) is not None  # generic problems: never handed over
    handed_over = 0
    for G, M in _problems(0, 600):  # duplicates and d < K included
        alpha = min_norm_floats(M.tolist())
        if alpha is None:  # a non-unique minimiser α (ties off the support, singular faces)
            handed_over += 1
            continue
        a = np.array(alpha)
        scale = M.diagonal().max()
        assert a.min() >= 0.0 and abs(a.sum() - 1.0) < 1e-12
        grad = M @ a
        assert grad.min() >= a @ grad - 1e-9 * scale  # KKT, independently of the solver
        ref = min_norm_batch_np(M[None])[0]
        assert a @ M @ a <= ref @ M @ ref + 1e-13 * scale
    assert handed_over < 300  # the degenerate share, not everything


def test_min_norm_hands_over_non_unique_minimisers() -> None:
    """The point αᵀG is unique, α is not: a duplicated row, or rows through the origin of the
    hull (d = 1). MGDA applies α to other rows than the normalised ones, so these go to the
    batched solver that every call path shares."""
    duplicate = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert min_norm_floats((duplicate @ duplicate.T).tolist()) is None
    collinear = np.array([[2.0], [1.0], [-1.0]])
    assert min_norm_floats((collinear @ collinear.T).tolist()) is None


def test_mgda_normalised_single_call_matches_batched_on_degenerate_jacobians() -> None:
    """Opposing pairs, zero rows, d < K and rows of sizes 1e-4 … 1e4: with normalisation the
    direction depends on which minimiser α is used, so both paths must pick the same."""
    rng = np.random.default_rng(123)
    for normalization in ("l2", "loss+"):
        agg = MGDA(normalization)
        for _ in range(400):
            K = int(rng.integers(3, ACTIVE_SET_MAX_K + 1))
            d = int(rng.integers(1, 30))
            G = rng.standard_normal((K, d)) * 10.0 ** rng.uniform(-4, 4, size=(K, 1))
            G += rng.uniform(-2, 2) * rng.standard_normal(d)
            if rng.random() < 0.3:
                G[int(rng.integers(K))] = 0.0
            if rng.random() < 0.3:
                G[1] = -G[0] * rng.uniform(0.1, 10)
            M = torch.from_numpy(0.5 * (G @ G.T + (G @ G.T).T))
            losses = torch.from_numpy(rng.uniform(0.5, 2.0, size=K))
            fast = agg._weights(M, losses=losses, task_weights=None).numpy() @ G
            ref = agg._batch_weights(M[None], losses=losses[None], task_weights=None)[0].numpy() @ G
            scale = K * np.linalg.norm(G, axis=1).max()
            assert np.abs(fast - ref).max() <= 1e-6 * scale


@pytest.mark.parametrize(
    "rows, point",
    [
        ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [1 / 3, 1 / 3, 1 / 3]),  # interior: the centroid
        ([[1, 0, 0], [0, 1, 0], [3, 3, 0]], [0.5, 0.5, 0.0]),  # the third row is not used
        ([[1, 0, 0, 0], [0, 2, 0, 0], [5, 5, 5, 0], [0, 0, 0, 4]], [16 / 21, 8 / 21, 0, 4 / 21]),  # α ∝ 1/‖g_i‖²
        ([[1, 0], [0, 1], [-1, -1]], [0.0, 0.0]),  # the origin is in the hull (α unique)
    ],
)
def test_min_norm_known_points(rows: list[list[float]], point: list[float]) -> None:
    G = np.array(rows, dtype=np.float64)
    alpha = min_norm_floats((G @ G.T).tolist())
    assert alpha is not None
    np.testing.assert_allclose(np.array(alpha) @ G, point, atol=1e-12)


def test_wolfe_iterations_alone_reach_the_optimum() -> None:
    """The iterative method without the interior guess (which would otherwise answer first)."""
    for G, M in _problems(1, 300, generic=True):
        scale = M.diagonal().max()
        A = (M / scale).tolist()
        x = active._wolfe(A, len(A))
        assert x is not None
        alpha = active._min_norm_certified(A, x)
        assert alpha is not None
        ref = min_norm_batch_np(M[None])[0]
        assert np.array(alpha) @ M @ np.array(alpha) <= ref @ M @ ref + 1e-13 * scale


def test_min_norm_degenerate_inputs() -> None:
    assert min_norm_floats([[0.0] * 3 for _ in range(3)]) == [1 / 3] * 3  # as the batched solver
    assert min_norm_floats([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]) is None
    assert min_norm_floats([[math.nan] * 3 for _ in range(3)]) is None


# ------------------------------------------------------------------------------------------------
# Conflict-averse weights
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("c", [0.1, 0.4, 0.8, 2.0])
def test_conflict_averse_has_zero_duality_gap_and_matches_the_batched_solver(c: float) -> None:
    for G, M in _problems(2, 300, generic=True):
        solved = conflict_averse_floats(M.tolist(), c)
        assert solved is not None  # full-rank problems away from the origin: never a fallback
        w, gamma = np.array(solved[0]), np.array(solved[1])
        scale = M.diagonal().max()
        F, s = _ca_value(M, w, c)
        u = gamma @ G  # the mean-scale direction
        g0 = G.mean(axis=0)
        assert np.linalg.norm(u - g0) <= s * (1 + 1e-9) + 1e-12 * math.sqrt(scale)  # in the ball
        primal = float((G @ u).min())  # the worst task's directional derivative
        assert abs(F - primal) <= 1e-8 * scale * (1 + c)  # strong duality: optimal
        w_ref, gamma_ref = conflict_averse_batch_np(M[None], c)
        F_ref, _ = _ca_value(M, w_ref[0], c)
        assert F <= F_ref + 1e-9 * scale * (1 + c)
        np.testing.assert_allclose(u, gamma_ref[0] @ G, atol=1e-7 * math.sqrt(scale))


def test_conflict_averse_iterations_alone_reach_the_optimum(monkeypatch: pytest.MonkeyPatch) -> None:
    """The active set without the interior guess; includes problems where F has no minimiser on
    a face's affine hull (s ≤ κ), so that a minor step follows a ray (counted: the branch runs)."""
    rays = []
    step_along = active._step_along
    monkeypatch.setattr(active, "_step_along", lambda *a: rays.append(1) or step_along(*a))
    for seed in (3, 14, 16, 19, 24):
        for c in (0.2, 0.6, 3.0):
            for G, M in _problems(seed, 200, generic=True):
                K = M.shape[0]
                scale = M.diagonal().max()
                A = (M / scale).tolist()
                b = [sum(row) / K for row in A]
                s = c * math.sqrt(max(sum(b) / K, 0.0))
                w = active._conflict_averse_active_set(A, b, s, K)
                assert w is not None
                assert active._ca_certified(A, b, s, w, K) is not None
    assert rays  # the ray branch was exercised


def test_conflict_averse_hands_over_what_it_cannot_certify() -> None:
    g = [1.0, -2.0, 0.5]
    at_origin = np.array([g, [-x for x in g], [0.0, 1.0, 1.0]])  # g and −g: 0 is in the hull
    assert conflict_averse_floats((at_origin @ at_origin.T).tolist(), 0.5) is None
    assert conflict_averse_floats([[0.0] * 3 for _ in range(3)], 0.5) is None
    # c = 0: a linear objective; the direction is the mean gradient whatever the vertex
    G = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    w, gamma = conflict_averse_floats((G @ G.T).tolist(), 0.0)
    assert gamma == [1 / 3] * 3 and sorted(w) == [0.0, 0.0, 1.0]


def test_bordered_solve_reports_singular_supports() -> None:
    A = [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # rows 0 and 1 identical
    assert active._bordered_solve(A, [0, 1], None) is None
    a, _ = active._bordered_solve(A, [0, 2], None)
    assert a == pytest.approx([0.5, 0.5])


# ------------------------------------------------------------------------------------------------
# The methods' single calls (floats) against their batched paths (NumPy)
# ------------------------------------------------------------------------------------------------
def _single_vs_batched(agg, M: np.ndarray, **ctx) -> None:
    Mt = torch.from_numpy(M)
    fast = agg._weights(Mt, losses=ctx.get("losses"), task_weights=ctx.get("task_weights"))
    losses = ctx.get("losses")
    ref = agg._batch_weights(  # two copies: the vectorised solvers (a batch of one is a single call)
        Mt.expand(2, -1, -1), losses=None if losses is None else losses.expand(2, -1),
        task_weights=ctx.get("task_weights"),
    )[0]
    scale = max(float(ref.abs().max()), 1e-300)
    assert float((fast - ref).abs().max()) <= 1e-7 * scale, (fast.tolist(), ref.tolist())


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_single_call_matches_batched(normalization: str) -> None:
    agg = MGDA(normalization)
    for G, M in _problems(4, 150, generic=True):
        losses = torch.linspace(0.5, 2.0, M.shape[0], dtype=torch.float64)
        _single_vs_batched(agg, M, losses=losses)


def test_cagrad_single_call_matches_batched() -> None:
    for c in (0.1, 0.5, 1.0):
        agg = CAGrad(c=c)
        for G, M in _problems(5, 150, generic=True):
            _single_vs_batched(agg, M)


@pytest.mark.parametrize("switches", [(True, True, True), (True, False, True), (True, True, False), (False, True, True)])
def test_came_grad_single_call_matches_batched(switches: tuple[bool, bool, bool]) -> None:
    rectify, inject, fuse = switches
    agg = CAMEGrad(rectify=rectify, inject=inject, fuse=fuse)
    for G, M in _problems(6, 150, generic=True):
        weights = torch.linspace(1.0, 4.0, M.shape[0], dtype=torch.float64)
        _single_vs_batched(agg, M, task_weights=weights)
        _single_vs_batched(agg, M)


def test_methods_fall_back_to_the_batched_path_at_the_origin() -> None:
    g = [1.0, -2.0, 0.5]
    G = np.array([g, [-x for x in g], [0.0, 1.0, 1.0]])
    M = G @ G.T
    for agg in (CAGrad(c=0.5), CAMEGrad()):
        _single_vs_batched(agg, M)
