"""Exact solver of the α-fair equations ``M w = w^{-1/α}`` (element-wise), ``w > 0``.

Used by :class:`mtl_opt.methods.FairGrad`. With ``p = 1/α`` the equations are the stationarity
conditions of the strictly convex potential

    f(w) = ½ wᵀ M w − Σ_i h(w_i),     h(w) = log w (p = 1),   h(w) = w^{1−p}/(1−p) (p ≠ 1),

on ``w > 0`` (``h`` is strictly concave with ``h' = w^{-p}``). At ``p = 1`` this is the Nash
bargaining system of :mod:`mtl_opt.solvers.nash`, and the same documented
regularisation is used: ``M' = M + σ diag(M)`` from :func:`~mtl_opt.solvers.nash.cosine_form`
(``σ = 10⁻⁹``, plus the most negative eigenvalue of the cosine matrix when rounding made it
indefinite), which makes ``f`` coercive, so a unique solution always exists (at a
Pareto-stationary point the unregularised system has none). Zero-gradient tasks cannot satisfy
``0 = w_i^{-p}``; they get ``w_i = 0`` and are left out, as in Nash-MTL.

Scale: ``M → cM`` gives ``w → c^{-1/(1+p)} w``, so the solve runs on ``A = M'/max_i M'_ii``.

Newton's method on ``f`` in the scaled variable ``w = w_k ∘ y`` (``y = 1`` at the iterate):
scaled gradient ``g = w ∘ (A w) − w^{1−p}``, scaled Hessian ``H = W A W + p diag(w^{1−p})``
(positive definite), step ``s = H⁻¹ g`` and ``w ← w ∘ (1 − t s)`` with ``t`` the largest of
1, ½, ¼, … that keeps ``w > 0`` and gives Armijo decrease of ``f`` (once the Newton decrement
``gᵀs`` is below 1/16 only positivity is required: near the solution the full step converges
quadratically, and near Pareto-stationary points, where ``w`` is large, ``f`` cannot resolve the
decrease of a step). It stops on
the scale-free residual ``max_i |w_i^p (A w)_i − 1| ≤ RESIDUAL_TOL + 4Kε w_i^p (|A| w)_i`` (the
second term is the rounding of ``(Aw)_i``, which only matters near Pareto-stationary points) and
raises :class:`FairGradSolverError` otherwise: there is no fallback to fixed weights.
It starts from each task's solution when alone, ``w_i = A_ii^{-1/(1+p)}``, at the best common scale.

Known limit (measured): for large α (α ≥ 5) with gradient norms that differ by 10³ or more, the
solution has weights spread over tens of orders of magnitude (e.g. α = 10, norms 10⁻⁸ and 10⁸:
``w ≈ (10²⁹, 10⁻¹²⁶)``); the uniform damped step then stalls on positivity and the solver raises
:class:`FairGradSolverError` after ``MAX_ITERATIONS`` (in a sweep of 2250 inputs, all failures
were of this kind or α = 10 at Pareto-stationary points). For α ≤ 2 no input of that sweep failed
except rows spanning sixteen decades at a Pareto-stationary point.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mtl_opt.solvers._precision import SolverError
from mtl_opt.solvers.nash import cosine_form, nash_weights

__all__ = ["FairGradSolverError", "alpha_fair_weights"]

RESIDUAL_TOL = 1e-10
MAX_ITERATIONS = 200
_EPS = float(np.finfo(np.float64).eps)
#: Below this Newton decrement ``gᵀH⁻¹g`` full (positivity-keeping) Newton steps are taken: there
#: ``f`` changes by less than its own rounding near large weights, so Armijo cannot judge a step.
_NEWTON_PHASE = 1.0 / 16.0


class FairGradSolverError(SolverError):
    """The α-fair solver did not reach its certified residual."""


def alpha_fair_weights(M: np.ndarray, p: float) -> tuple[np.ndarray, dict[str, Any]]:
    """``w`` (K,) with ``(M + σ diag M) w = w^{-p}`` on the tasks with non-zero gradients.

    At ``p = 1`` this is the Nash bargaining system with the same regularisation, solved by
    :func:`mtl_opt.solvers.nash_weights` (its closed form at K = 2, its Newton method with
    Chebyshev's correction beyond): the system is solved in one place. Other ``p`` use the
    Newton method of this module (:func:`_alpha_fair_newton`).
    """
    if p == 1.0:
        return nash_weights(np.asarray(M, dtype=np.float64))
    return _alpha_fair_newton(M, p)


def _alpha_fair_newton(M: np.ndarray, p: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Newton's method on the potential ``f`` (see the module docstring), any ``p > 0``."""
    K = M.shape[0]
    form = cosine_form(M[None])
    inv_norm = form.inv_norm[0]
    active = inv_norm > 0.0
    w = np.zeros(K)
    if not active.any():
        return w, {"iterations": 0, "residual": 0.0}
    norms = 1.0 / inv_norm[active]
    M_reg = form.C[0][np.ix_(active, active)] * norms[:, None] * norms[None, :]
    c = float(M_reg.diagonal().max())
    sub, info = _newton(M_reg / c, p)
    w[active] = sub * c ** (-1.0 / (1.0 + p))
    return w, info


def _h(w: np.ndarray, p: float) -> float:
    return float(np.log(w).sum()) if p == 1.0 else float((w ** (1.0 - p)).sum() / (1.0 - p))


def _potential(A: np.ndarray, w: np.ndarray, p: float) -> float:
    return 0.5 * float(w @ A @ w) - _h(w, p)


def _newton(A: np.ndarray, p: float) -> tuple[np.ndarray, dict[str, Any]]:
    K = A.shape[0]
    absA = np.abs(A)
    w = A.diagonal() ** (-1.0 / (1.0 + p))  # each task's solution when alone: A_ii w = w^{-p}
    # The best common scale of the start: d/ds f(s w) = 0 at s^{1+p} = Σ w^{1-p} / wᵀAw.
    w = w * (float((w ** (1.0 - p)).sum()) / float(w @ A @ w)) ** (1.0 / (1.0 + p))
    worst = math.inf
    for it in range(MAX_ITERATIONS + 1):
        Aw = A @ w
        wp = w ** p
        resid = wp * Aw - 1.0
        slack = RESIDUAL_TOL + 4.0 * K * _EPS * wp * (absA @ w)
        worst = float(np.abs(resid).max())
        if np.all(np.abs(resid) <= slack):
            return w, {"iterations": it, "residual": worst}
        if it == MAX_ITERATIONS:
            break
        w1p = w ** (1.0 - p)
        g = w * Aw - w1p
        H = (w[:, None] * A) * w[None, :]
        H[np.diag_indices(K)] += p * w1p
        s = np.linalg.solve(H, g)
        decrement = float(g @ s)
        t = 1.0
        f0 = _potential(A, w, p)
        while True:
            trial = w * (1.0 - t * s)
            if np.all(trial > 0.0) and (
                decrement <= _NEWTON_PHASE
                or _potential(A, trial, p) <= f0 - 1e-4 * t * decrement + 1e-14 * abs(f0)
            ):
                break
            t *= 0.5
            if t < 1e-20:
                raise FairGradSolverError(
                    f"FairGrad Newton line search failed at iteration {it} (residual {worst:.3e}) "
                    f"for the normalised Gramian {A.tolist()} and p = 1/α = {p}"
                )
        w = trial
    raise FairGradSolverError(
        f"FairGrad Newton solver did not converge in {MAX_ITERATIONS} iterations: residual "
        f"max|w^p ∘ (Aw) − 1| = {worst:.3e} (tolerance {RESIDUAL_TOL:.1e}) for the normalised, "
        f"regularised Gramian {A.tolist()} and p = 1/α = {p}"
    )
