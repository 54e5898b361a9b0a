"""Projection onto the dual cone of the task gradients, solved exactly from the Gramian.

For a Jacobian ``G`` (K × d) the dual cone of its rows is ``C = {x : G x ≥ 0}``: the directions
that conflict with no task. Quinton & Rey ("Jacobian Descent for Multi-Objective Optimization",
arXiv 2406.16232, Proposition 1) show that the projection of ``Gᵀu`` (a weighting ``u`` of the
rows) onto ``C`` is again a weighting of the rows, ``π_C(Gᵀu) = Gᵀw``, with

    w = u + v,     v = argmin_{v ≥ 0} ½ (u + v)ᵀ M (u + v),     M = G Gᵀ,

the dual of ``min_x ½‖x − Gᵀu‖²`` s.t. ``Gx ≥ 0`` (``v`` are the multipliers of the constraints).
This is a K-variable non-negative quadratic program; it is solved here exactly by a primal
active-set method (Lawson & Hanson's NNLS, written on the QP): start from ``v = 0``; while some
free coordinate ``j`` has a negative gradient ``(M w)_j < 0``, free the most negative one and
minimise the quadratic over the free coordinates (``M_PP z = −(M u)_P``, solved in the
least-squares sense so a singular ``M_PP`` is fine: the right-hand side lies in its range), moving
back to the boundary and fixing coordinates that reach zero when the minimiser leaves ``v ≥ 0``.
Every step decreases the objective and no free set repeats, so it stops after finitely many steps.

The solve runs in normalised units ``A = M / max_i M_ii`` (scale-free; ``w`` is unchanged by
``M → sM``), on the positive semi-definite part of ``A`` (negative eigenvalues, which only
rounding produces, set to zero: along such a direction inside ``v ≥ 0`` the QP would be unbounded)
with its diagonal scaled by ``1 + RIDGE`` (10⁻¹²): with linearly dependent rows the QP has many
minimisers and the active set could cycle among them; the ridge makes the minimiser unique and
every face system positive definite, and moves the direction by a relative ~10⁻¹² (TorchJD adds
``10⁻⁴ I`` to ``M / tr M``, which is not relative to each task's scale).
The answer is accepted only on its KKT certificate (for the ridged ``A``):

    v ≥ 0,    (A w)_i ≥ −tol  for every i,    |(A w)_i| ≤ tol  where v_i > 0,

with ``tol = KKT_TOL · max(1, Σ_i |w_i|)``; otherwise :class:`DualConeError` names the Gramian and
the violation (never an uncertified answer). ``w`` may be non-unique when ``M`` is singular; the
direction ``Gᵀw`` (a Euclidean projection) is unique. All-zero Gramians return ``w = u``.

One entry point serves both forms: :func:`dual_cone_weights` takes one Gramian ``M`` (K, K) with
targets ``U`` (R, K), or a stack ``M`` (B, K, K) with ``U`` (B, R, K) (R projections per
Gramian); the solve runs per Gramian on Python floats (for K ≤ 8 a NumPy call costs more than
the arithmetic it runs). The PSD repair is :func:`mtl_opt.solvers._linalg.psd_part` (on the
correlation matrix); it runs only when a Cholesky factorisation on floats finds a pivot that is
not positive (a singular or indefinite Gramian), so a well-posed Gramian costs no eigensolve.
"""

from __future__ import annotations

import math
from operator import mul

import numpy as np

from mtl_opt.solvers._linalg import psd_part
from mtl_opt.solvers._precision import SolverError

__all__ = ["KKT_TOL", "RIDGE", "DualConeError", "dual_cone_weights"]

#: Tolerance of the KKT certificate, in normalised units (relative to ``max_i M_ii``).
KKT_TOL = 1e-10
#: Relative ridge on the diagonal (``A_ii → (1 + RIDGE) A_ii``): every face system of non-zero
#: rows is then positive definite, the solution is unique and the active set cannot cycle on
#: dependent rows; relative to each diagonal entry, so that every task's scale stays free.
RIDGE = 1e-12
_MAX_STEPS_PER_TASK = 6


class DualConeError(SolverError):
    """The dual-cone projection could not certify its answer."""


def dual_cone_weights(M: np.ndarray | list[list[float]], U: np.ndarray | list[list[float]]) -> np.ndarray | list[list[float]]:
    """Weights ``W`` with ``Gᵀ W[..., r, :] = π_C(Gᵀ U[..., r, :])``.

    Args:
        M: one Gramian (K, K) or a stack (B, K, K); symmetric positive semi-definite, float64.
            One Gramian may also be given as nested lists of floats (with ``U`` as lists too):
            the answer is then lists, and no array is created on the common path (the
            single call of a method costs a few µs instead of tens).
        U: the targets, (R, K) for one Gramian or (B, R, K) for a stack.

    Returns:
        ``W`` of ``U``'s shape (float64 NumPy, or nested lists for list input).

    Raises:
        ValueError: shapes that do not match.
        DualConeError: an answer failed its KKT certificate.
    """
    if isinstance(M, list):
        K = len(M)
        if any(len(row) != K for row in M) or not isinstance(U, list) or any(len(u) != K for u in U):
            raise ValueError(
                f"dual_cone_weights: lists must be a square Gramian and targets of its size, got "
                f"{K} rows of lengths {[len(row) for row in M]} and targets of lengths "
                f"{[len(u) for u in U] if isinstance(U, list) else type(U).__name__}"
            )
        return _weights_one(M, U)
    M = np.asarray(M, dtype=np.float64)
    U = np.asarray(U, dtype=np.float64)
    single = M.ndim == 2
    if single:
        M, U = M[None], U[None]
    if M.ndim != 3 or M.shape[1] != M.shape[2] or U.ndim != 3 or U.shape[0] != M.shape[0] or U.shape[2] != M.shape[1]:
        raise ValueError(
            f"dual_cone_weights: expected M (K, K) with U (R, K), or M (B, K, K) with U (B, R, K); "
            f"got {M.shape} and {U.shape}"
        )
    W = np.empty(U.shape, dtype=np.float64)
    for b in range(M.shape[0]):
        W[b] = _weights_one(M[b].tolist(), U[b].tolist())
    return W[0] if single else W


def _weights_one(rows: list[list[float]], targets: list[list[float]]) -> list[list[float]]:
    """The projections of one Gramian (nested lists) for each target, on Python floats."""
    K = len(rows)
    scale = max(rows[i][i] for i in range(K))
    if not scale > 0.0:  # every gradient is zero: C is the whole space
        return [list(u) for u in targets]
    A = [[x / scale for x in row] for row in rows]
    if not _positive_definite(A):
        A = psd_part(np.array(rows, dtype=np.float64) / scale).tolist()
    for i in range(K):
        A[i][i] *= 1.0 + RIDGE
    return [_project(A, u) for u in targets]


def _positive_definite(A: list[list[float]]) -> bool:
    """Whether the Cholesky factorisation of ``A`` on floats has only positive pivots (then ``A``
    is positive definite to rounding and needs no PSD repair)."""
    return _cholesky(A, 0.0) is not None


def _cholesky(A: list[list[float]], relative_floor: float) -> list[list[float]] | None:
    """``L`` with ``LLᵀ = A`` on floats, or ``None`` when a pivot is not above
    ``relative_floor · A_ii``."""
    n = len(A)
    L = [[0.0] * n for _ in range(n)]
    for i in range(n):
        Li = L[i]
        for k in range(i + 1):
            Lk = L[k]
            acc = A[i][k] - sum(map(mul, Li[:k], Lk[:k]))
            if i == k:
                if not acc > relative_floor * A[i][i]:
                    return None
                Li[i] = math.sqrt(acc)
            else:
                Li[k] = acc / Lk[k]
    return L


def _project(A: list[list[float]], u: list[float]) -> list[float]:
    """``u + v*`` for one normalised Gramian ``A`` and one target ``u`` (see the module doc).

    Written on Python floats: for K ≤ 8 a NumPy call costs more than the arithmetic it runs.
    """
    K = len(u)
    c = [sum(map(mul, row, u)) for row in A]  # A u
    v = [0.0] * K
    free = [False] * K
    steps = 0
    while True:
        grad = [ci + sum(map(mul, row, v)) for ci, row in zip(c, A)]  # A (u + v)
        tol = _entry_tol([a + b for a, b in zip(u, v)])
        j, best = -1, -tol
        for i in range(K):
            if not free[i] and grad[i] < best:
                j, best = i, grad[i]
        if j < 0:
            break
        free[j] = True
        while True:  # minimise over the free coordinates, staying in v ≥ 0
            steps += 1
            if steps > _MAX_STEPS_PER_TASK * K + 10:
                raise DualConeError(
                    f"dual-cone projection: the active set did not settle within {steps - 1} steps "
                    f"for the normalised Gramian {A} and target {u}"
                )
            P = [i for i in range(K) if free[i]]
            zP = _solve_face([[A[i][k] for k in P] for i in P], [-c[i] for i in P])
            if min(zP) > 0.0:
                v = [0.0] * K
                for i, z in zip(P, zP):
                    v[i] = z
                break
            # Move from v toward z until the first free coordinate reaches zero; fix it there.
            ratios = {i: v[i] / (v[i] - z) for i, z in zip(P, zP) if z <= 0.0}
            t = min(ratios.values())
            for i, z in zip(P, zP):
                v[i] += t * (z - v[i])
            for i in P:
                if v[i] <= 0.0 or ratios.get(i, math.inf) <= t:
                    free[i] = False
                    v[i] = 0.0
            if not any(free):
                break
    w = [a + b for a, b in zip(u, v)]
    _certify(A, u, v, w)
    return w


def _solve_face(A_PP: list[list[float]], rhs: list[float]) -> list[float]:
    """The minimiser of the quadratic on a face: ``A_PP z = rhs`` by Cholesky on floats (the
    ridge keeps every pivot above ``RIDGE · A_ii``; a smaller one, only possible through
    rounding, falls back to a least-squares solve)."""
    n = len(rhs)
    L = _cholesky(A_PP, 0.5 * RIDGE)
    if L is None:
        return np.linalg.lstsq(np.array(A_PP), np.array(rhs), rcond=None)[0].tolist()
    y = [0.0] * n
    for i in range(n):
        y[i] = (rhs[i] - sum(map(mul, L[i][:i], y[:i]))) / L[i][i]
    z = [0.0] * n
    for i in reversed(range(n)):
        z[i] = (y[i] - sum(L[k][i] * z[k] for k in range(i + 1, n))) / L[i][i]
    return z


def _entry_tol(w: list[float]) -> float:
    return KKT_TOL * max(1.0, sum(map(abs, w)))


def _certify(A: list[list[float]], u: list[float], v: list[float], w: list[float]) -> None:
    grad = [sum(map(mul, row, w)) for row in A]
    tol = _entry_tol(w)
    bad_sign = min(grad) < -tol
    bad_slack = any(vi > 0.0 and abs(g) > tol for vi, g in zip(v, grad))
    if bad_sign or bad_slack or min(v) < 0.0 or not all(map(math.isfinite, w)):
        raise DualConeError(
            f"dual-cone projection failed its KKT certificate (tolerance {tol:.1e}): gradient "
            f"A w = {grad}, multipliers v = {v}, for the normalised Gramian {A} and target {u}"
        )
