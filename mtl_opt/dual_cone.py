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

The answer is accepted only on its KKT certificate, checked in normalised units
``A = M / max_i M_ii`` (scale-free; ``w`` is unchanged by ``M → sM``):

    v ≥ 0,    (A w)_i ≥ −tol  for every i,    |(A w)_i| ≤ tol  where v_i > 0,

with ``tol = KKT_TOL · max(1, Σ_i |w_i|)``; otherwise :class:`DualConeError` names the Gramian and
the violation (never an uncertified answer). ``w`` may be non-unique when ``M`` is singular; the
direction ``Gᵀw`` (a Euclidean projection) is unique. All-zero Gramians return ``w = u``.

One formula serves both forms: :func:`dual_cone_weights` takes a stack ``M`` (B, K, K) with
targets ``U`` (B, R, K) (R projections per Gramian) and a single Gramian is the stack ``B = 1``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KKT_TOL", "DualConeError", "dual_cone_weights", "dual_cone_weights_single"]

#: Tolerance of the KKT certificate, in normalised units (relative to ``max_i M_ii``).
KKT_TOL = 1e-10
_MAX_STEPS_PER_TASK = 6


class DualConeError(RuntimeError):
    """The dual-cone projection could not certify its answer."""


def dual_cone_weights(M: np.ndarray, U: np.ndarray) -> np.ndarray:
    """Weights ``W`` (B, R, K) with ``Gᵀ W[b, r] = π_C(Gᵀ U[b, r])`` for Gramians ``M`` (B, K, K).

    ``M`` must be symmetric positive semi-definite (float64); ``U`` (B, R, K) float64.
    """
    B, K, _ = M.shape
    W = np.empty(U.shape, dtype=np.float64)
    scale = np.diagonal(M, axis1=1, axis2=2).max(axis=1)
    for b in range(B):
        if not scale[b] > 0.0:  # every gradient is zero: C is the whole space
            W[b] = U[b]
            continue
        A = M[b] / scale[b]
        for r in range(U.shape[1]):
            W[b, r] = _project(A, U[b, r])
    return W


def dual_cone_weights_single(M: np.ndarray, U: np.ndarray) -> np.ndarray:
    """The single-Gramian form: ``M`` (K, K), ``U`` (R, K) -> (R, K)."""
    return dual_cone_weights(M[None], U[None])[0]


def _project(A: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``u + v*`` for one normalised Gramian ``A`` and one target ``u`` (see the module doc)."""
    K = A.shape[0]
    c = A @ u
    v = np.zeros(K)
    free = np.zeros(K, dtype=bool)
    steps = 0
    while True:
        grad = c + A @ v  # = A (u + v)
        candidates = np.where(free, np.inf, grad)
        j = int(np.argmin(candidates))
        if not candidates[j] < -_entry_tol(A, u + v):
            break
        free[j] = True
        while True:  # minimise over the free coordinates, staying in v ≥ 0
            steps += 1
            if steps > _MAX_STEPS_PER_TASK * K + 10:
                raise DualConeError(
                    f"dual-cone projection: the active set did not settle within {steps - 1} steps "
                    f"for the normalised Gramian {A.tolist()} and target {u.tolist()}"
                )
            P = np.flatnonzero(free)
            z = np.zeros(K)
            z[P] = np.linalg.lstsq(A[np.ix_(P, P)], -c[P], rcond=None)[0]
            if np.all(z[P] > 0.0):
                v = z
                break
            # Move from v toward z until the first free coordinate reaches zero; fix it there.
            neg = P[z[P] <= 0.0]
            ratios = v[neg] / (v[neg] - z[neg])
            t = float(ratios.min())
            v = v + t * (z - v)
            hit = neg[ratios <= t]
            v[hit] = 0.0
            free[hit] = False
            v[~free] = 0.0
            if not free.any():
                break
    w = u + v
    _certify(A, u, v, w)
    return w


def _entry_tol(A: np.ndarray, w: np.ndarray) -> float:
    return KKT_TOL * max(1.0, float(np.abs(w).sum()))


def _certify(A: np.ndarray, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> None:
    grad = A @ w
    tol = _entry_tol(A, w)
    bad_sign = float(grad.min()) < -tol
    slack = np.abs(grad[v > 0.0])
    bad_slack = slack.size > 0 and float(slack.max()) > tol
    if bad_sign or bad_slack or float(v.min()) < 0.0 or not np.isfinite(w).all():
        raise DualConeError(
            f"dual-cone projection failed its KKT certificate (tolerance {tol:.1e}): gradient "
            f"A w = {grad.tolist()}, multipliers v = {v.tolist()}, for the normalised Gramian "
            f"{A.tolist()} and target {u.tolist()}"
        )
