"""The conflict-averse problem: CAGrad's dual (and CAME-Grad's rectification stage).

CAGrad (Liu et al., NeurIPS 2021, eq. 4): with ``g0 = Gᵀ1/K`` the mean row and ``s = c‖g0‖``,

    w* = argmin_{w∈Δ} F(w) = wᵀG g0 + s ‖Gᵀw‖        (= wᵀM1/K + s √(wᵀMw)),

and the direction ``u = g0 + s · g_w*/‖g_w*‖ = γᵀG`` with ``γ = 1/K + (s/r) w*``,
``r = ‖g_w*‖``, solves the primal "maximise the worst task's improvement ``min_i g_i·u`` within
the ball ``‖u − g0‖ ≤ s``" (strong duality). One entry point, :func:`conflict_averse`, returns
``(w*, γ)``, solved *exactly*:

* ``K = 1``: the only point of the simplex. ``K = 2``: the best of the two vertices and the
  edge's stationary point (:func:`conflict_averse_2`, written once and evaluated on floats for a
  single Gramian, on arrays for a batch; an edge answer must pass the certificate below).
* A single Gramian with ``3 ≤ K ≤ 8``: the active set on Python floats
  (:mod:`mtl_opt.solvers._active_set`), accepted only on the certificate; what it cannot certify,
  and an optimum at the origin of the hull, go to the batched solver on a batch of one.
* A batch with ``K = 3`` (the triangle's 7 faces) or ``K = 4, 5`` (all ``2^K − 1`` faces in one
  batched solve): on every face ``w = a + t e`` with ``t = √(m²/(s² − κ²))`` (``a``, ``e`` from
  the bordered system, ``m² = aᵀAa``, ``κ² = eᵀAe``), the best feasible candidate by its true
  objective value, then the certificate; failing entries go to the general method.
* ``K ≥ 6`` (and the fallback): a one-dimensional root. For ``t ≥ 0`` let
  ``x(t) = proj_C(−t g0)`` (``C`` the convex hull of the rows; a min-norm problem on the shifted
  Gramian of the rows ``g_i + t g0``); the optimum is ``x* = x(t*)`` with ``‖x(t*)‖ = s t*``
  (``‖x(t)‖/t`` is non-increasing, so the root is unique and bracketed). The bracket only
  identifies the support; on a support the root is the closed form above.

Certificate (:func:`_ca_certificate`): the candidate's direction ``u = γᵀG`` is primal-feasible
and its primal value is ``min_i (Mγ)_i``; by weak duality ``F(w) − min_i (Mγ)_i ≥ 0`` bounds both
``F(w) − F*`` and CAGrad's primal gap. A candidate is accepted when this gap is
``≤ 1e-10·(1 + s)`` plus the float64 rounding of the gap itself,
``4Kε(1 + s·max_i(|M|w)_i/r + s·ρ/r²)`` with ``ρ = |w|ᵀ|M||w|`` (normalised units): ``~Kε(1 + s)``
unless ``x = Gᵀw`` is a cancelling combination of much longer rows, where the Gramian itself has
lost those digits. When the optimum has ``r = 0`` (the origin is in the hull), optimality is
certified exactly by ``‖proj_{cone(rows)}(−g0)‖ ≤ s`` (an NNLS problem) and ``γ`` gives the
primal optimum closest to ``g0``: ``u = proj_{d: Gd ≥ 0}(g0) = g0 + Gᵀv*`` with
``v* = argmin_{v≥0} ‖g0 + Gᵀv‖``. (The original CAGrad code returns ``≈ g0`` there, which is not
primal-optimal when some ``g_i·g0 < 0``.) A candidate that cannot be certified raises
:class:`ConflictAverseSolverError`, never an unverified point.

Precision: ``F`` is exact to ``1e-10 · (1 + s) · max_i M_ii`` unless ``x*`` is a cancelling
combination much shorter than the rows it combines (measured on 5000 random problems, K = 3 … 8,
row-norm ratios 1e2 … 1e6: duality gap ≤ 8e-12 · max_i M_ii away from cancelling combinations,
≤ 7e-8 · max_i M_ii with them). A combination with ``r² ≤ rtol · max_i M_ii`` counts as zero
(:func:`mtl_opt.solvers.zero_norm_rtol`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import nnls
from torch import Tensor

from mtl_opt.solvers._active_set import ACTIVE_SET_MAX_K, _ca_certified_radius, conflict_averse_floats
from mtl_opt.solvers._linalg import (
    ARRAY_OPS,
    FACE_MAX_K,
    FLOAT_OPS,
    PAIRS_3,
    answer,
    bordered_solve,
    checked_rows,
    checked_stack,
    clean_simplex,
    face_constants,
    face_systems,
    factor,
    normalised,
    psd_part,
    stack_of,
    triangle_systems,
)
from mtl_opt.solvers._precision import EPS, KKT_RTOL, SolverError, zero_norm_rtol
from mtl_opt.solvers.min_norm import _min_norm_general

__all__ = ["ConflictAverseSolverError", "conflict_averse", "conflict_averse_2"]


class ConflictAverseSolverError(SolverError):
    """The conflict-averse solver could not certify an optimum."""


def conflict_averse(
    M: Tensor | np.ndarray, c: float, *, checked: bool = False
) -> tuple[Tensor | np.ndarray, Tensor | np.ndarray]:
    """``(w*, γ)``: the exact minimiser of ``F(w) = wᵀM1/K + c‖g0‖ √(wᵀMw)`` over the simplex and
    the row coefficients ``γ = 1/K + (c‖g0‖/r) w*`` of the direction ``u = γᵀG`` (mean scale).

    ``‖g0‖² = 1ᵀM1/K²``. When ``c‖g0‖ = 0`` the objective is linear: a vertex minimising
    ``(M1)_i`` and ``γ = 1/K`` (``u = g0``: the ball is a point). At the origin of the hull
    (``r = 0``) ``γ = 1/K + v*`` with the cone projection ``v*`` (see the module docstring).

    Args:
        M: a Gramian (K, K) or a batch (B, K, K) (symmetrised here; checked finite).
        c: the radius factor ``c ≥ 0``.
        checked: ``M`` is already known finite and symmetric (the aggregators' Gramians, checked
            once in :mod:`mtl_opt._validation`): no second check.

    Returns:
        ``(w*, γ)`` float64, each (K,) or (B, K): CPU tensors for a tensor input, NumPy arrays
        otherwise.

    Raises:
        ValueError: bad ``M`` or ``c``.
        ConflictAverseSolverError: no candidate passed the certificate.
    """
    c = float(c)
    if not math.isfinite(c) or c < 0:
        raise ValueError(f"the conflict-averse radius factor c must be finite and >= 0, got {c!r}")
    Ms, batched, tensor = stack_of(M, "conflict_averse")
    K = Ms.shape[1]
    solved = None
    if Ms.shape[0] == 1 and K <= ACTIVE_SET_MAX_K:
        rows = Ms[0].tolist() if checked else checked_rows(Ms[0], "conflict_averse")
        solved = _conflict_averse_single(rows, c)
        if solved is None:
            w, coef = _conflict_averse_batch(np.array([rows]), c)
        else:
            w, coef = np.array([solved[0]]), np.array([solved[1]])
    else:
        w, coef = _conflict_averse_batch(Ms if checked else checked_stack(Ms, "conflict_averse"), c)
    return answer(w, batched, tensor), answer(coef, batched, tensor)


def conflict_averse_2(m11, m12, m22, c, xp=ARRAY_OPS):  # type: ignore[no-untyped-def]
    """The K = 2 closed form on floats (``xp = FLOAT_OPS``) or arrays (``xp = ARRAY_OPS``, under
    ``np.errstate``): ``(w1, factor, live, edge, s)`` with ``w* = (w1, 1 − w1)``,
    ``γ = ½ + factor · w*``; ``live``: ``s > 0`` and ``r`` is not zero to the Gramian's precision
    (else, with ``s > 0``, the optimum is at the origin and ``γ`` needs the cone projection);
    ``edge``: the answer is the edge's stationary point (to be certified).

    The optimum is a vertex or the edge's stationary point; the best is kept. On the edge
    ``w = (w1, 1 − w1)``, with ``D = M11 + M22 − 2M12``: the affine min-norm coefficients
    ``a1 = (M22 − M12)/D``, the shift direction ``e = ε(1, −1)`` with ``ε = (M22 − M11)/(2D)``,
    ``m² = (M11 M22 − M12²)/D`` and ``κ² = ε² D``. Stationarity ``‖x(t)‖ = s t`` is the quadratic
    ``m² + κ² t² = s² t²``, so ``t² = 4(M11 M22 − M12²)/(4Ds² − (M22 − M11)²)`` (no stationary
    point when ``s ≤ κ``), ``w1 = a1 + t ε``, ``r = s t`` and ``F = w·b + s² t``. Convexity of
    ``F`` on the edge makes the smallest of the (at most three) candidate values the minimum.
    """
    b1, b2 = 0.5 * (m11 + m12), 0.5 * (m12 + m22)
    s = c * xp.sqrt(xp.maximum(0.5 * (b1 + b2), 0.0))
    r1, r2 = xp.sqrt(xp.maximum(m11, 0.0)), xp.sqrt(xp.maximum(m22, 0.0))
    F1, F2 = b1 + s * r1, b2 + s * r2
    D = m11 + m22 - 2.0 * m12
    dm = m22 - m11
    den = 4.0 * D * s * s - dm * dm
    t = xp.sqrt(xp.div(xp.maximum(4.0 * (m11 * m22 - m12 * m12), 0.0), den))
    w1e = xp.div(m22 - m12 + 0.5 * t * dm, D)
    Fe = b2 + w1e * (b1 - b2) + s * s * t
    ok = (D > 1e-15 * xp.maximum(m11, m22)) & (den > 0.0) & (w1e > 0.0) & (w1e < 1.0)
    Fe = xp.where(ok, Fe, math.inf)
    pick1 = (F1 <= F2) & (F1 <= Fe)
    pick2 = xp.not_(pick1) & (F2 <= Fe)
    w1 = xp.where(pick1, 1.0, xp.where(pick2, 0.0, w1e))
    r = xp.where(pick1, r1, xp.where(pick2, r2, s * t))
    live = (r * r > zero_norm_rtol() * xp.maximum(m11, m22)) & (s > 0.0)
    factor = xp.where(live, xp.div(s, xp.where(live, r, 1.0)), 0.0)
    edge = live & xp.not_(pick1) & xp.not_(pick2)
    return w1, factor, live, edge, s


def _conflict_averse_single(m: list[list[float]], c: float) -> tuple[list[float], list[float]] | None:
    """One Gramian on Python floats: the K = 2 closed form (an edge answer certified as in the
    batched path) or the certified active set; ``None`` (the batched solver decides) at K = 1,
    at the origin of the hull, or when the answer cannot be certified here."""
    K = len(m)
    if K == 1:
        return None
    if K >= 3:
        return conflict_averse_floats(m, c)
    m11, m12, m22 = m[0][0], m[0][1], m[1][1]
    w1, fac, live, edge, s = conflict_averse_2(m11, m12, m22, c, FLOAT_OPS)
    if not live and s > 0.0:
        return None  # at the origin of the hull: the cone projection
    w = [w1, 1.0 - w1]
    if edge:  # the primal/dual certificate, as in the batched path
        scale = max(m11, m22)
        A = [[m11 / scale, m12 / scale], [m12 / scale, m22 / scale]]
        b = [0.5 * (A[0][0] + A[0][1]), 0.5 * (A[1][0] + A[1][1])]
        s_n = c * math.sqrt(max(0.5 * (b[0] + b[1]), 0.0))
        if _ca_certified_radius(A, b, s_n, w, 2) is None:
            return None
    return w, [0.5 + fac * w[0], 0.5 + fac * w[1]]


def _conflict_averse_batch(M: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """The vectorised solvers for a checked, symmetric float64 batch (B, K, K)."""
    B, K = M.shape[0], M.shape[1]
    if K <= 2:
        return _conflict_averse_small(M, c)
    if K == 3:
        return _conflict_averse_3(M, c)
    if K <= FACE_MAX_K:
        return _conflict_averse_faces(M, c)
    pairs = [_conflict_averse_general(M[b], c) for b in range(B)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _coefficients(M: np.ndarray, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``1/K + (s/r) w`` batched, with the zero-norm rule of :func:`conflict_averse_coefficients`."""
    K = M.shape[-1]
    r2 = np.einsum("bi,bij,bj->b", w, M, w)
    scale = np.max(np.diagonal(M, axis1=1, axis2=2), axis=1)
    live = (r2 > zero_norm_rtol() * scale) & (s > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(live, s / np.sqrt(np.where(live, r2, 1.0)), 0.0)
    coef = 1.0 / K + factor[:, None] * w
    at_origin = (~live) & (s > 0)
    if at_origin.any():
        coef[at_origin] += _cone_projection(M[at_origin])
    return coef


def _cone_projection(M: np.ndarray) -> np.ndarray:
    """``v* = argmin_{v≥0} ‖g0 + Gᵀv‖`` batched (B, K) — so that ``g0 + Gᵀv*`` is the projection of
    ``g0`` onto ``{d : Gd ≥ 0}`` and ``Gᵀv*`` that of ``−g0`` onto the cone of the rows."""
    B, K = M.shape[0], M.shape[1]
    if K > 2:
        return np.stack([_cone_nnls(M[i])[0] for i in range(B)])
    b = M.sum(axis=2) / K  # (B, K): g_i · g0
    if K == 1:
        diag = M[:, 0, 0]
        v = np.where(diag > 0, np.clip(-b[:, 0] / np.where(diag > 0, diag, 1.0), 0.0, None), 0.0)
        return v[:, None]
    # K = 2: the best of the four active sets (a collinear pair always has a 1-sparse optimum).
    def q(v: np.ndarray) -> np.ndarray:  # ‖g0 + Gᵀv‖² − ‖g0‖²
        return 2 * np.einsum("bi,bi->b", v, b) + np.einsum("bi,bij,bj->b", v, M, v)

    cands = [np.zeros((B, 2))]
    for i in range(2):
        diag = M[:, i, i]
        vi = np.where(diag > 0, np.clip(-b[:, i] / np.where(diag > 0, diag, 1.0), 0.0, None), 0.0)
        cand = np.zeros((B, 2))
        cand[:, i] = vi
        cands.append(cand)
    det = M[:, 0, 0] * M[:, 1, 1] - M[:, 0, 1] ** 2
    ok = det > 1e-12 * np.maximum(M[:, 0, 0] * M[:, 1, 1], 1e-300)
    dsafe = np.where(ok, det, 1.0)
    v1 = (-b[:, 0] * M[:, 1, 1] + b[:, 1] * M[:, 0, 1]) / dsafe
    v2 = (-b[:, 1] * M[:, 0, 0] + b[:, 0] * M[:, 0, 1]) / dsafe
    ok &= (v1 >= 0) & (v2 >= 0)
    cands.append(np.where(ok[:, None], np.stack([v1, v2], axis=1), 0.0))
    values = np.stack([q(cand) for cand in cands], axis=1)
    best = np.argmin(values, axis=1)
    return np.stack(cands, axis=1)[np.arange(B), best]


def _cone_nnls(M: np.ndarray) -> tuple[np.ndarray, float]:
    """``v* = argmin_{v≥0} ‖g0 + Gᵀv‖`` for one Gramian, and ``‖Gᵀv*‖²``.

    Conflicting collinear rows make ``v*`` non-unique (``v1 g1 + v2 g2`` can cancel), which lets
    an active-set NNLS drift to huge, cancelling values; a ridge of ``1e-13 · max_i M_ii`` on
    ``‖v‖²`` selects the small solution and perturbs the point ``Gᵀv*`` only at that level.
    """
    K = M.shape[0]
    scale = max(float(np.max(np.diag(M))), 1e-300)
    R = factor(M / scale)
    design = np.vstack([R, np.sqrt(1e-13) * np.eye(K)])
    target = np.concatenate([-R @ np.full(K, 1.0 / K), np.zeros(K)])
    v, _ = nnls(design, target, maxiter=50 * K)
    return v, float(np.sum((R @ v) ** 2)) * scale


def _conflict_averse_small(M: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """K ≤ 2, vectorised: K = 1 directly, K = 2 by :func:`conflict_averse_2`; at the origin of
    the hull the cone projection; an edge answer off the certificate goes to the general solver."""
    B, K = M.shape[0], M.shape[1]
    if K == 1:
        m11 = M[:, 0, 0]
        s = c * np.sqrt(np.maximum(m11, 0.0))
        w = np.ones((B, 1))
        return w, _coefficients(M, w, s)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        w1, fac, live, edge, s = conflict_averse_2(M[:, 0, 0], M[:, 0, 1], M[:, 1, 1], c)
    w = np.stack([w1, 1.0 - w1], axis=1)
    coef = 0.5 + fac[:, None] * w
    at_origin = ~live & (s > 0.0)
    if at_origin.any():
        coef[at_origin] += _cone_projection(M[at_origin])
    # The closed form can lose digits when the rows' sizes differ a lot (e.g. m22 ≪ m11 on the
    # edge); an edge answer off the primal/dual certificate is re-solved by the general solver.
    if edge.any():
        A, scale = normalised(M[edge])
        b = A.sum(axis=2) / 2.0
        s_n = s[edge] / np.sqrt(np.where(scale > 0, scale, 1.0))
        gap, allowance, ok = _ca_certificate(A, b, s_n, w[edge])
        for idx in np.flatnonzero(edge)[ok & (gap > KKT_RTOL * (1.0 + s_n) + allowance)]:
            w[idx], coef[idx] = _conflict_averse_general(M[idx], c)
    return w, coef


def _ca_on_support(
    A: np.ndarray, b: np.ndarray, s: float, support: np.ndarray
) -> tuple[np.ndarray, float] | None:
    """Closed-form stationary point of ``F`` on the affine hull of the rows in ``support``.

    Returns ``(w, t)`` or ``None`` when the face has no stationary point with ``r > 0``.
    """
    K = A.shape[0]
    A_SS = A[np.ix_(support, support)]
    a = bordered_solve(A_SS, np.zeros(support.size), 1.0)
    e = bordered_solve(A_SS, -b[support], 0.0)
    msq = max(float(a @ A_SS @ a), 0.0)
    ksq = max(float(e @ A_SS @ e), 0.0)
    if s * s <= ksq or msq <= zero_norm_rtol():
        return None
    t = np.sqrt(msq / (s * s - ksq))
    w = np.zeros(K)
    w[support] = a + t * e
    return w, float(t)


def _ca_certificate(
    A: np.ndarray, b: np.ndarray, s: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Primal/dual certificate of a candidate ``w ∈ Δ`` (batched, normalised units ``max_i A_ii = 1``).

    With ``r = √(wᵀAw)`` the candidate's direction is ``u = Gᵀγ``, ``γ = 1/K + (s/r) w``; it is
    primal-feasible (``‖u − g0‖ = s``) and its primal value is the worst task's directional
    derivative ``p(w) = min_i g_i·u = min_i (Aγ)_i``. By weak duality (for any ``w' ∈ Δ``:
    ``min_i g_i·u ≤ w'ᵀGu ≤ w'ᵀG g0 + s‖Gᵀw'‖ = F(w')``) the gap ``F(w) − p(w) ≥ 0`` bounds both
    ``F(w) − F*`` and ``p* − p(w)``.

    Returns ``(gap, allowance, live)``: ``allowance`` bounds the float64 rounding of ``gap`` —
    ``(Aw)_i`` to ``Kε·(|A|w)_i`` and ``r²`` to ``Kε·ρ`` with ``ρ = |w|ᵀ|A||w|`` — giving
    ``4Kε(1 + s·max_i(|A|w)_i/r + s·ρ/r²)``. It is of order ``Kε(1 + s)`` unless ``x = Gᵀw`` is a
    cancelling combination of larger rows (``ρ ≫ r²``), where the Gramian itself has lost those
    digits. ``live`` is False where ``r² ≤ ZERO_NORM_RTOL`` (no direction to certify).
    """
    K = A.shape[-1]
    absA = np.abs(A)
    Aw = np.einsum("bij,bj->bi", A, w)
    r2 = np.einsum("bi,bi->b", w, Aw)
    live = (r2 > zero_norm_rtol()) & np.isfinite(w).all(axis=1)
    r = np.sqrt(np.where(live, r2, 1.0))
    gamma = 1.0 / K + (s / r)[:, None] * w
    primal = np.einsum("bij,bj->bi", A, gamma).min(axis=1)
    dual = np.einsum("bi,bi->b", w, b) + s * r
    absw = np.abs(w)
    q = np.einsum("bij,bj->bi", absA, absw).max(axis=1)
    rho = np.einsum("bi,bij,bj->b", absw, absA, absw)
    allowance = 4.0 * K * EPS * (1.0 + s * q / r + s * rho / (r * r))
    return np.where(live, dual - primal, np.inf), allowance, live


def _ca_certified(A: np.ndarray, b: np.ndarray, s: float, w: np.ndarray, tol: float) -> bool:
    """True when the candidate ``w`` (projected onto Δ) has a primal/dual gap ≤ ``tol`` + rounding."""
    if not np.isfinite(w).all() or w.min() < -tol:
        return False
    w = clean_simplex(w)
    gap, allowance, live = _ca_certificate(A[None], b[None], np.array([s]), w[None])
    return bool(live[0] and gap[0] <= tol + allowance[0])


def _conflict_averse_general(M: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact conflict-averse weights for one Gramian with K ≥ 3 (see the module docstring)."""
    K = M.shape[0]
    scale = float(np.max(np.diag(M)))
    if scale <= 0.0:  # every row is zero: F ≡ 0, the direction is zero
        w = np.full(K, 1.0 / K)
        return w, np.full(K, 1.0 / K)
    A = psd_part(M / scale)
    M = A * scale  # solve, verify and build the direction on the same PSD Gramian
    b = A.sum(axis=1) / K
    s = c * np.sqrt(max(float(b.sum()) / K, 0.0))
    if s <= 0.0:  # linear objective: a vertex minimising b_i (the direction is g0 regardless)
        w = np.zeros(K)
        w[int(np.argmin(b))] = 1.0
        return w, _coefficients(M[None], w[None], np.zeros(1))[0]
    tol = KKT_RTOL * (1.0 + s)

    def finish(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = clean_simplex(w)
        return w, _coefficients(M[None], w[None], np.array([s * np.sqrt(scale)]))[0]

    alpha0 = _min_norm_general(A)
    if float(alpha0 @ A @ alpha0) <= zero_norm_rtol():
        # The origin is in the hull: x* = 0 is optimal iff ‖proj_{cone(rows)}(−g0)‖ ≤ s.
        v, p2 = _cone_nnls(A)
        if p2 <= s * s * (1.0 + 1e-9):
            return alpha0, np.full(K, 1.0 / K) + v

    def shifted_min_norm(t: float) -> np.ndarray:
        At = A + t * (b[:, None] + b[None, :]) + (t * t) * float(b.sum()) / K
        return _min_norm_general(At)

    lo, hi = 0.0, 1.0 / s  # ‖x(t)‖ ≤ max_i ‖g_i‖ = 1 after scaling, so h(1/s) ≤ 0
    t = 0.5 * hi
    tried: set[tuple[int, ...]] = set()
    for _ in range(300):
        wt = shifted_min_norm(t)
        support = np.flatnonzero(wt > 0)
        key = tuple(support.tolist())
        suggestion = None
        if key not in tried:
            tried.add(key)
            cand = _ca_on_support(A, b, s, support)
            if cand is not None:
                if _ca_certified(A, b, s, cand[0], tol):
                    return finish(cand[0])
                suggestion = cand[1]
        h = np.sqrt(max(float(wt @ A @ wt), 0.0)) - s * t
        if h > 0:
            lo = t
        else:
            hi = t
        if _ca_certified(A, b, s, wt, tol) and abs(h) <= tol:
            return finish(wt)
        if suggestion is not None and lo < suggestion < hi:
            t = suggestion
        else:
            t = 0.5 * (lo + hi)
        if hi - lo <= 1e-16 * hi:
            break
    raise ConflictAverseSolverError(
        f"conflict-averse solver could not certify an optimum (KKT check failed) for c={c} and "
        f"the Gramian {M.tolist()}"
    )


def _conflict_averse_3(M: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact conflict-averse weights at K = 3 for a batch: the best stationary point over the
    7 faces (vertices; on edge (i, j) ``t² = (M_ii M_jj − M_ij²)/(D s² − (b_j − b_i)²)``,
    ``w_i = (M_jj − M_ij)/D + t (b_j − b_i)/D``; on the triangle ``w = a + t e`` from the bordered
    system), then the primal/dual certificate (:func:`_ca_certificate`); failing entries go to
    the general solver."""
    B = M.shape[0]
    A, scale = normalised(M)
    b = A.sum(axis=2) / 3.0
    s = c * np.sqrt(np.maximum(b.sum(axis=1) / 3.0, 0.0))
    s2 = s * s
    cands, values = [], []
    for i in range(3):
        cands.append(np.broadcast_to(np.eye(3)[i], (B, 3)))
        values.append(b[:, i] + s * np.sqrt(np.maximum(A[:, i, i], 0.0)))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i, j in PAIRS_3:
            mii, mjj, mij = A[:, i, i], A[:, j, j], A[:, i, j]
            D = mii + mjj - 2.0 * mij
            db = b[:, j] - b[:, i]
            den = D * s2 - db * db
            t = np.sqrt(np.maximum(mii * mjj - mij * mij, 0.0) / den)
            wi = (mjj - mij + t * db) / D
            ok = (D > 1e-15 * np.maximum(mii, mjj)) & (den > 0) & (wi > 0) & (wi < 1)
            w = np.zeros((B, 3))
            w[:, i], w[:, j] = np.where(ok, wi, 1.0), np.where(ok, 1.0 - wi, 0.0)
            cands.append(w)
            values.append(np.where(ok, wi * b[:, i] + (1 - wi) * b[:, j] + s2 * t, np.inf))
        a, e, ok = triangle_systems(A, b)
        msq = np.maximum(np.einsum("bi,bij,bj->b", a, A, a), 0.0)
        ksq = np.maximum(np.einsum("bi,bij,bj->b", e, A, e), 0.0)
        t = np.sqrt(msq / (s2 - ksq))
        w = a + t[:, None] * e
        ok &= (s2 > ksq) & (w > 0).all(axis=1)
        cands.append(np.where(ok[:, None], w, cands[0]))
        values.append(np.where(ok, np.einsum("bi,bi->b", w, b) + s2 * t, np.inf))
    W = np.stack(cands, axis=1)
    best = np.argmin(np.stack(values, axis=1), axis=1)
    w = W[np.arange(B), best]
    w = np.clip(w, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    coef = _coefficients(M, w, s * np.sqrt(scale))
    # Primal/dual certificate where the optimum is away from the origin (the enumeration covers
    # the rest); failing entries are re-solved by the general solver.
    gap, allowance, live = _ca_certificate(A, b, s, w)
    live &= (s > 0) & (scale > 0)
    bad = live & (gap > KKT_RTOL * (1.0 + s) + allowance)
    for idx in np.flatnonzero(bad):
        w[idx], coef[idx] = _conflict_averse_general(M[idx], c)
    return w, coef


def _conflict_averse_faces(M: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact conflict-averse weights for a batch with 3 ≤ K ≤ 5: on every face ``w = a + t e``
    with ``t = √(m²/(s² − κ²))`` (``m² = aᵀAa``, ``κ² = eᵀAe``; vertices are ``w = e_i``), the
    feasible candidate of smallest ``F(w) = w·b + s√(wᵀAw)`` (evaluated directly, so a
    candidate's value is always a true objective value), then the primal/dual certificate
    (:func:`_ca_certificate`) as at K = 3, and an optimum at the origin is certified by the cone
    projection (as in :func:`_conflict_averse_general`); failing entries go to the general
    solver."""
    B, K = M.shape[0], M.shape[1]
    A, scale = normalised(M)
    b = A.sum(axis=2) / K
    s = c * np.sqrt(np.maximum(b.sum(axis=1) / K, 0.0))
    s2 = (s * s)[:, None]
    a, e, ok = face_systems(A, b)
    vertex = face_constants(K)[0].sum(axis=1) == 1  # (F,)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        msq = np.maximum(((a @ A) * a).sum(axis=2), 0.0)
        ksq = np.maximum(((e @ A) * e).sum(axis=2), 0.0)
        t = np.sqrt(msq / (s2 - ksq))
        w = a + t[:, :, None] * e
        total = w.sum(axis=2)
        ok &= (s2 > ksq) & np.isfinite(w).all(axis=2) & (w >= 0).all(axis=2) & (total > 0)
        w = np.where(ok[:, :, None], w / np.where(ok, total, 1.0)[:, :, None], 0.0)  # points of Δ
    w = np.where(vertex[None, :, None], a, w)
    ok |= vertex[None]
    r2 = np.maximum(((w @ A) * w).sum(axis=2), 0.0)
    values = np.where(ok, np.einsum("bfi,bi->bf", w, b) + s[:, None] * np.sqrt(r2), np.inf)
    w = w[np.arange(B), np.argmin(values, axis=1)]
    w = np.clip(w, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    coef = _coefficients(M, w, s * np.sqrt(scale))
    gap, allowance, live = _ca_certificate(A, b, s, w)
    bad = live & (s > 0) & (scale > 0) & (gap > KKT_RTOL * (1.0 + s) + allowance)
    # At the origin (r = 0, so F(w) = 0): certified as in the general solver by
    # ‖proj_{cone(rows)}(−g0)‖ ≤ s, with v = γ − 1/K the cone projection's coefficients.
    origin = ~live & (s > 0) & (scale > 0)
    if origin.any():
        v = coef[origin] - 1.0 / K
        p2 = np.einsum("bi,bij,bj->b", v, A[origin], v)
        bad[np.flatnonzero(origin)[p2 > s[origin] ** 2 * (1.0 + 1e-9)]] = True
    for idx in np.flatnonzero(bad):
        w[idx], coef[idx] = _conflict_averse_general(M[idx], c)
    return w, coef
