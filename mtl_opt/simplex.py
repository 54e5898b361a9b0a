"""Exact K × K solvers on the probability simplex ``Δ = {α ≥ 0, Σ α_i = 1}``.

Two sub-problems recur across multi-task methods, and both only need the Gramian ``M = G Gᵀ``:

* **Min-norm point** (MGDA, Désidéri 2012; Sener & Koltun 2018): ``min_{α∈Δ} αᵀMα``, the point
  of smallest norm in the convex hull of the rows of ``G``. :func:`min_norm_weights`.
* **Conflict-averse weights** (CAGrad, Liu et al. 2021; CAME-Grad's rectification stage):
  with ``g0 = Gᵀ1/K`` the mean row and ``s = c‖g0‖``,
  ``min_{w∈Δ} F(w) = wᵀG g0 + s ‖Gᵀw‖`` (``= wᵀM1/K + s √(wᵀMw)``).
  :func:`conflict_averse_weights` and :func:`conflict_averse_coefficients`.

Both are solved *exactly* (to rounding), never by a fixed number of iterations:

* ``K = 1``: the only point of the simplex.
* ``K = 2``: closed forms, vectorised over a batch (no Python loop over the batch).
* ``K = 3``: vectorised over the batch too: the optimum lies in the relative interior of one of
  the triangle's 7 faces, where it is that face's stationary point (closed form on vertices and
  edges, a bordered 4 × 4 solve on the triangle); the best candidate is kept and must pass the
  test below (min-norm: KKT; conflict-averse: the primal/dual certificate), and an entry that
  fails it is re-solved by the general method.
* ``K = 4, 5``: the same enumeration over all ``2^K − 1`` faces, vectorised over the batch
  *and* the faces: each face's bordered system, padded to ``(K + 1) × (K + 1)`` with identity
  rows/columns off its support, goes into one batched solve (:func:`_face_systems`); the
  candidates (min-norm: the face's affine minimiser; conflict-averse: ``w = a + t e``,
  ``t = √(m²/(s² − κ²))``) that are points of the simplex are compared by their true objective
  value, and the winner passes the same KKT test / certificate or goes to the general method.
* ``K ≥ 6`` (and the K ≤ 5 fallback): the min-norm point comes from a non-negative
  least-squares problem (Lawson–Hanson active set, :func:`scipy.optimize.nnls`): with
  ``M = LLᵀ``, ``v* = argmin_{v≥0} ‖Lᵀv‖² + (1 − 1ᵀv)²`` gives ``α* = v*/1ᵀv*`` (the KKT
  conditions of the NNLS problem are those of the min-norm problem scaled by ``1ᵀv*``). The
  support is then re-solved exactly (bordered equality-constrained system) and the KKT
  conditions are verified: ``(Mα)_i ≥ αᵀMα − tol`` for every ``i`` (which bounds the objective
  gap by ``2·tol``).
  The conflict-averse problem is reduced to a one-dimensional root: for ``t ≥ 0`` let
  ``x(t) = proj_C(−t g0)`` (``C`` the convex hull of the rows; a min-norm problem on the shifted
  Gramian of the rows ``g_i + t g0``); the optimum is ``x* = x(t*)`` with ``‖x(t*)‖ = s t*``
  (``‖x(t)‖/t`` is non-increasing, so the root is unique and bracketed). The bracket only
  identifies the support; on a support ``S`` the root is closed form —
  ``x(t) = Gᵀ(a + t e)`` with ``a``/``e`` from the bordered system, ``‖x(t)‖² = m² + t²κ²``, so
  ``t* = m / √(s² − κ²)`` — and the result is accepted only on a primal/dual certificate
  (:func:`_ca_certificate`): the candidate's direction ``u = γᵀG``, ``γ = 1/K + (s/r) w``
  (``r = ‖Gᵀw‖``), is primal-feasible and its primal value is the worst task's directional
  derivative ``min_i g_i·u = min_i (Mγ)_i``; by weak duality ``F(w) − min_i (Mγ)_i ≥ 0`` bounds
  both ``F(w) − F*`` and CAGrad's primal gap. A candidate is accepted when this gap is
  ``≤ tol = 1e-10·(1 + s)`` plus the float64 rounding of the gap itself,
  ``4Kε(1 + s·max_i(|M|w)_i/r + s·ρ/r²)`` with ``ρ = |w|ᵀ|M||w|`` (normalised units). That
  allowance is ``~Kε(1 + s)`` whenever ``x = Gᵀw`` is not a cancelling combination of longer
  rows, however different the rows' sizes (a tiny row alone has ``ρ = r²``); it only grows
  where ``x`` is much shorter than the rows it combines, where the Gramian itself has lost
  those digits. When the optimum has ``r = 0`` (the origin is in the hull),
  optimality is certified exactly by ``‖proj_{cone(rows)}(−g0)‖ ≤ s`` (an NNLS problem); the
  returned direction is then the primal optimum closest to ``g0`` (see
  :func:`conflict_averse_coefficients`).

A solver that cannot certify its answer raises :class:`RuntimeError`; it never returns an
unverified point. Precision: the Gramian squares the rows, so a combination ``‖Gᵀw‖`` near zero
is only known to about ``√(ε · max_i M_ii)`` (``ε`` the float64 unit roundoff); the min-norm
objective ``αᵀMα`` is exact to ``~1e-10 · max_i M_ii``, and ``F`` to ``1e-10 · (1 + s) · max_i M_ii``
(``s`` in units of ``max_i ‖g_i‖``) unless its optimum ``x*`` is a cancelling combination much
shorter than the rows it combines (near the origin of the hull): there ``x*/‖x*‖``, hence the
direction, depends on digits the Gramian does not hold, and the certificate's rounding allowance
(see :func:`_ca_certificate`) grows accordingly. Task gradients of very
different sizes are fine: the PSD repair and the NNLS factor work on the correlation matrix
``D⁻¹MD⁻¹`` (``D = diag(√M_ii)``), so a small row's entries keep their relative precision.
(Measured on 5000 random problems, K = 3 … 8, row-norm ratios 1e2 … 1e6: duality gap on the
rows ≤ 8e-12 · max_i M_ii away from cancelling combinations, ≤ 7e-8 · max_i M_ii with them.)
All arithmetic is float64 on the CPU; tolerances are relative to ``max_i M_ii``.

``min_norm_batch_np`` and ``conflict_averse_batch_np`` are the unchecked numpy entry points
(symmetric float64 ``(B, K, K)`` in, numpy out) used by the methods' batched paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor

__all__ = [
    "ZERO_NORM_RTOL",
    "gramian_precision",
    "zero_norm_rtol",
    "conflict_averse_batch_np",
    "conflict_averse_coefficients",
    "conflict_averse_weights",
    "min_norm_batch_np",
    "min_norm_weights",
]

#: A combination ``x = Gᵀw`` with ``‖x‖² ≤ ZERO_NORM_RTOL · max_i M_ii`` counts as the zero vector
#: (below this the Gramian's float64 rounding dominates ``wᵀMw``). This is the floor: a Gramian
#: formed from a less precise or wider Jacobian raises the threshold for its solve (see
#: :func:`zero_norm_rtol`).
ZERO_NORM_RTOL = 1e-14

_ZERO_NORM_RTOL: ContextVar[float] = ContextVar("zero_norm_rtol", default=ZERO_NORM_RTOL)


def zero_norm_rtol() -> float:
    """The zero-norm threshold of the solve in progress (relative to ``max_i M_ii``).

    ``ZERO_NORM_RTOL`` unless the solve runs inside :func:`gramian_precision`: the aggregators
    pass the relative precision of the Gramian and of the direction they will form from it
    (:func:`mtl_opt._validation.gramian_rtol`), so that a combination that is zero to that
    precision is treated as zero instead of being divided by (a float32 Gramian's rounding
    noise would otherwise pass for a direction and get weights ~1e6).
    """
    return _ZERO_NORM_RTOL.get()


@contextmanager
def gramian_precision(rtol: float | None) -> Iterator[None]:
    """Run the solves inside with the zero-norm threshold ``max(ZERO_NORM_RTOL, rtol)``."""
    if rtol is None or not rtol > ZERO_NORM_RTOL:
        yield
        return
    token = _ZERO_NORM_RTOL.set(float(rtol))
    try:
        yield
    finally:
        _ZERO_NORM_RTOL.reset(token)

_KKT_RTOL = 1e-10  # KKT tolerance relative to max_i M_ii (objective gap ≤ 2 · this · scale)
_EPS = float(np.finfo(np.float64).eps)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def min_norm_weights(M: Tensor | np.ndarray) -> Tensor:
    """The exact min-norm weights ``α* = argmin_{α∈Δ} αᵀMα``.

    Args:
        M: a Gramian (K, K) or a batch of them (B, K, K); symmetric positive semi-definite.

    Returns:
        ``α*`` as float64 CPU, shape (K,) or (B, K). When the minimiser is not unique (affinely
        dependent rows) one minimiser is returned; the point ``α*ᵀG`` is always unique. When every
        row is zero the uniform weights are returned.
    """
    Ms, batched = _as_batch(M, "min_norm_weights")
    out = min_norm_batch_np(Ms)
    result = torch.from_numpy(np.ascontiguousarray(out))
    return result if batched else result[0]


def conflict_averse_weights(M: Tensor | np.ndarray, c: float) -> Tensor:
    """The exact minimiser ``w*`` of ``F(w) = wᵀM1/K + c‖g0‖ √(wᵀMw)`` over the simplex.

    ``‖g0‖² = 1ᵀM1/K²``. This is the dual problem of CAGrad (Liu et al. 2021, eq. 4) and of
    CAME-Grad's rectification stage. When ``c‖g0‖ = 0`` the objective is linear and a vertex
    minimising ``(M1)_i`` is returned (the methods' directions do not depend on ``w`` then).

    Args:
        M: (K, K) or (B, K, K) Gramian(s).
        c: the radius factor ``c ≥ 0``.

    Returns:
        ``w*`` float64 CPU, (K,) or (B, K).
    """
    w, _ = _conflict_averse(M, c)
    return w


def conflict_averse_coefficients(M: Tensor | np.ndarray, c: float) -> Tensor:
    """Row coefficients ``γ`` of the conflict-averse direction ``u = g0 + c‖g0‖ · g_w/‖g_w‖``.

    ``u = γᵀG`` with ``γ = 1/K + (c‖g0‖/r) w*`` and ``r = ‖g_w*‖ = √(w*ᵀMw*)`` (``w*`` from
    :func:`conflict_averse_weights`); this is on the scale of the *mean* gradient. By strong
    duality ``u`` solves CAGrad's primal problem ``max_d min_i g_i·d  s.t.  ‖d − g0‖ ≤ c‖g0‖``.

    Edge cases: ``c‖g0‖ = 0`` gives ``u = g0`` (the ball is a point). When the optimum sits at
    the origin (``r² ≤ ZERO_NORM_RTOL · max_i M_ii``) the unit vector ``g_w/‖g_w‖`` is undefined
    and every ``d`` of the ball with ``g_i·d ≥ 0`` for all ``i`` is primal-optimal; the one closest
    to ``g0`` is returned: ``u = proj_{d: Gd ≥ 0}(g0) = g0 + Gᵀv*`` with
    ``v* = argmin_{v≥0} ‖g0 + Gᵀv‖`` (an NNLS problem; ``u`` lies in the ball by the optimality
    certificate). The original CAGrad code returns ``≈ g0`` there (``c/(‖g_w‖ + 1e-8)`` times a
    zero vector), which is not primal-optimal when some ``g_i·g0 < 0``; the two agree when no task
    conflicts with ``g0`` (e.g. a zero row beside agreeing rows).
    """
    w, coef = _conflict_averse(M, c)
    return coef


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _as_batch(M: Tensor | np.ndarray, who: str) -> tuple[np.ndarray, bool]:
    if isinstance(M, Tensor):
        arr = M.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        arr = np.asarray(M, dtype=np.float64)
    if arr.ndim == 2:
        arr, batched = arr[None], False
    elif arr.ndim == 3:
        batched = True
    else:
        raise ValueError(f"{who}: expected a Gramian (K, K) or a batch (B, K, K), got shape {arr.shape}")
    if arr.shape[1] != arr.shape[2] or arr.shape[1] == 0:
        raise ValueError(f"{who}: Gramians must be square with K ≥ 1, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{who}: the Gramian is not finite (NaN or inf entries)")
    return 0.5 * (arr + arr.transpose(0, 2, 1)), batched


def _min_norm_2(M: np.ndarray) -> np.ndarray:
    """Closed form at K = 2: ``α1 = clip((M22 − M12)/(M11 + M22 − 2M12), 0, 1)``.

    Identical rows (zero denominator) give ``α = (½, ½)``; every ``α`` is optimal then.
    """
    a, c, m = M[:, 0, 0], M[:, 1, 1], M[:, 0, 1]
    D = a + c - 2.0 * m
    pos = D > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        a1 = np.where(pos, np.clip((c - m) / np.where(pos, D, 1.0), 0.0, 1.0), 0.5)
    return np.stack([a1, 1.0 - a1], axis=1)


def _correlation_eigh(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(d, λ, V)`` with ``A = D C D``, ``D = diag(d)``, ``d_i = √A_ii`` and ``C = V diag(λ) Vᵀ``.

    Decomposing the correlation matrix ``C`` (entries ≤ 1) instead of ``A`` keeps every entry's
    rounding relative to ``√(A_ii A_jj)``: with task gradients of very different sizes a plain
    eigendecomposition of ``A`` would add errors of order ``ε · max_i A_ii`` to the small rows'
    entries and wipe out their digits. Zero rows (``A_ii = 0``) stay zero.
    """
    d = np.sqrt(np.clip(np.diag(A), 0.0, None))
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
    C = A * inv[:, None] * inv[None, :]
    lam, V = np.linalg.eigh(0.5 * (C + C.T))
    return d, lam, V


def _psd_part(A: np.ndarray) -> np.ndarray:
    """A positive semi-definite matrix equal to ``A`` up to ``A``'s own rounding.

    A Gramian computed in float32 (or of rank below K) can have eigenvalues slightly below zero;
    the min-norm and conflict-averse problems are only convex on a PSD Gramian. The negative
    eigenvalues of the correlation matrix (see :func:`_correlation_eigh`) are set to zero, which
    changes each entry by a relative amount of the order of ``C``'s most negative eigenvalue
    (tiny rows keep their digits). Returned unchanged when already PSD.
    """
    d, lam, V = _correlation_eigh(A)  # PSD exactly when A is (a congruence)
    if lam.min() >= 0.0:
        return A
    C = (V * np.clip(lam, 0.0, None)) @ V.T
    return C * d[:, None] * d[None, :]


def _factor(A: np.ndarray) -> np.ndarray:
    """``R`` with ``RᵀR = A`` (A PSD), from the correlation eigendecomposition (rounding stays
    relative to each row's size); negative rounding clipped."""
    d, lam, V = _correlation_eigh(A)
    return (np.sqrt(np.clip(lam, 0.0, None))[:, None] * V.T) * d[None, :]


def _bordered_solve(A_SS: np.ndarray, rhs_top: np.ndarray, rhs_bottom: float) -> np.ndarray:
    """Solve ``[[A_SS, 1], [1ᵀ, 0]] [x; ν] = [rhs_top; rhs_bottom]`` (least squares if singular)."""
    n = A_SS.shape[0]
    Bm = np.zeros((n + 1, n + 1))
    Bm[:n, :n] = A_SS
    Bm[:n, n] = 1.0
    Bm[n, :n] = 1.0
    rhs = np.append(rhs_top, rhs_bottom)
    try:
        sol = np.linalg.solve(Bm, rhs)
        if not np.isfinite(sol).all() or np.abs(Bm @ sol - rhs).max() > 1e-9 * (1 + np.abs(rhs).max()):
            raise np.linalg.LinAlgError
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(Bm, rhs, rcond=1e-13)[0]
    return sol[:n]


def _min_norm_kkt_ok(A: np.ndarray, alpha: np.ndarray, tol: float) -> bool:
    if not np.isfinite(alpha).all() or alpha.min() < -tol:
        return False
    grad = A @ alpha
    return float(alpha @ grad - grad.min()) <= tol


def _clean_simplex(alpha: np.ndarray) -> np.ndarray:
    alpha = np.clip(alpha, 0.0, None)
    total = alpha.sum()
    return alpha / total


def _min_norm_general(M: np.ndarray) -> np.ndarray:
    """Exact min-norm weights for one Gramian (any K): NNLS, exact re-solve, KKT check."""
    K = M.shape[0]
    scale = float(np.max(np.diag(M)))
    if scale <= 0.0:
        return np.full(K, 1.0 / K)
    A = _psd_part(M / scale)
    R = _factor(A)
    design = np.vstack([R, np.ones((1, K))])
    target = np.zeros(K + 1)
    target[-1] = 1.0
    v, _ = nnls(design, target, maxiter=50 * K)
    candidates = []
    if v.sum() > 0:
        raw = v / v.sum()
        support = np.flatnonzero(raw > 0)
        polished = np.zeros(K)
        polished[support] = _bordered_solve(A[np.ix_(support, support)], np.zeros(support.size), 1.0)
        candidates = [polished, raw]
    for alpha in candidates:
        if _min_norm_kkt_ok(A, alpha, _KKT_RTOL):
            return _clean_simplex(alpha)
    raise RuntimeError(
        f"min-norm solver could not certify an optimum (KKT check failed) for the Gramian {M.tolist()}"
    )


def _conflict_averse(M: Tensor | np.ndarray, c: float) -> tuple[Tensor, Tensor]:
    c = float(c)
    if not np.isfinite(c) or c < 0:
        raise ValueError(f"the conflict-averse radius factor c must be finite and >= 0, got {c!r}")
    Ms, batched = _as_batch(M, "conflict_averse_weights")
    w, coef = conflict_averse_batch_np(Ms, c)
    w_t, coef_t = torch.from_numpy(np.ascontiguousarray(w)), torch.from_numpy(np.ascontiguousarray(coef))
    return (w_t, coef_t) if batched else (w_t[0], coef_t[0])


def conflict_averse_batch_np(M: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Unchecked fast path for callers that already hold a symmetric float64 batch (B, K, K):
    ``(w*, γ)`` as numpy arrays (see :func:`conflict_averse_weights` / ``_coefficients``)."""
    B, K = M.shape[0], M.shape[1]
    if K <= 2:
        return _conflict_averse_small(M, c)
    if K == 3:
        return _conflict_averse_3(M, c)
    if K <= _FACE_MAX_K:
        return _conflict_averse_faces(M, c)
    pairs = [_conflict_averse_general(M[b], c) for b in range(B)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def min_norm_batch_np(M: np.ndarray) -> np.ndarray:
    """Unchecked fast path of :func:`min_norm_weights` for a symmetric float64 batch (B, K, K)."""
    B, K = M.shape[0], M.shape[1]
    if K == 1:
        return np.ones((B, 1))
    if K == 2:
        return _min_norm_2(M)
    if K == 3:
        return _min_norm_3(M)
    if K <= _FACE_MAX_K:
        return _min_norm_faces(M)
    return np.stack([_min_norm_general(M[b]) for b in range(B)])


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
    R = _factor(M / scale)
    design = np.vstack([R, np.sqrt(1e-13) * np.eye(K)])
    target = np.concatenate([-R @ np.full(K, 1.0 / K), np.zeros(K)])
    v, _ = nnls(design, target, maxiter=50 * K)
    return v, float(np.sum((R @ v) ** 2)) * scale


def _conflict_averse_small(M: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """K ≤ 2, vectorised: the optimum is a vertex or the edge's stationary point; keep the best.

    On the edge ``w = (w1, 1 − w1)``, with ``D = M11 + M22 − 2M12``: the affine min-norm
    coefficients ``a1 = (M22 − M12)/D``, the shift direction ``e = ε(1, −1)`` with
    ``ε = (M22 − M11)/(2D)``, ``m² = (M11 M22 − M12²)/D`` and ``κ² = ε² D``. Stationarity
    ``‖x(t)‖ = s t`` is the quadratic ``m² + κ² t² = s² t²``, so
    ``t² = m²/(s² − κ²) = 4(M11 M22 − M12²)/(4Ds² − (M22 − M11)²)`` (no stationary point when
    ``s ≤ κ``), ``w1 = a1 + t ε``, ``r = ‖g_w‖ = s t`` and ``F = w·b + s² t``. Convexity of ``F``
    on the edge makes the smallest of the (at most three) candidate values the minimum.
    """
    B, K = M.shape[0], M.shape[1]
    if K == 1:
        m11 = M[:, 0, 0]
        s = c * np.sqrt(np.maximum(m11, 0.0))
        w = np.ones((B, 1))
        return w, _coefficients(M, w, s)
    m11, m22, m12 = M[:, 0, 0], M[:, 1, 1], M[:, 0, 1]
    b1, b2 = 0.5 * (m11 + m12), 0.5 * (m12 + m22)
    s = c * np.sqrt(np.maximum(0.5 * (b1 + b2), 0.0))
    r1, r2 = np.sqrt(np.maximum(m11, 0.0)), np.sqrt(np.maximum(m22, 0.0))
    F1, F2 = b1 + s * r1, b2 + s * r2
    D = m11 + m22 - 2.0 * m12
    dm = m22 - m11
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        den = 4.0 * D * s * s - dm * dm
        t = np.sqrt(np.maximum(4.0 * (m11 * m22 - m12 * m12), 0.0) / den)
        w1e = (m22 - m12 + 0.5 * t * dm) / D
        Fe = b2 + w1e * (b1 - b2) + s * s * t
    ok = (D > 1e-15 * np.maximum(m11, m22)) & (den > 0.0) & (w1e > 0.0) & (w1e < 1.0)
    Fe = np.where(ok, Fe, np.inf)
    pick1 = (F1 <= F2) & (F1 <= Fe)
    pick2 = ~pick1 & (F2 <= Fe)
    w1 = np.where(pick1, 1.0, np.where(pick2, 0.0, w1e))
    w = np.stack([w1, 1.0 - w1], axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = np.where(pick1, r1, np.where(pick2, r2, s * t))
        live = (r * r > zero_norm_rtol() * np.maximum(m11, m22)) & (s > 0.0)
        factor = np.where(live, s / r, 0.0)
    coef = 0.5 + factor[:, None] * w
    at_origin = ~live & (s > 0.0)
    if at_origin.any():
        coef[at_origin] += _cone_projection(M[at_origin])
    # The closed form can lose digits when the rows' sizes differ a lot (e.g. m22 ≪ m11 on the
    # edge); an edge answer off the primal/dual certificate is re-solved by the general solver.
    edge = live & ~pick1 & ~pick2
    if edge.any():
        A, scale = _normalised(M[edge])
        b = A.sum(axis=2) / 2.0
        s_n = s[edge] / np.sqrt(np.where(scale > 0, scale, 1.0))
        gap, allowance, ok = _ca_certificate(A, b, s_n, w[edge])
        for idx in np.flatnonzero(edge)[ok & (gap > _KKT_RTOL * (1.0 + s_n) + allowance)]:
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
    a = _bordered_solve(A_SS, np.zeros(support.size), 1.0)
    e = _bordered_solve(A_SS, -b[support], 0.0)
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
    allowance = 4.0 * K * _EPS * (1.0 + s * q / r + s * rho / (r * r))
    return np.where(live, dual - primal, np.inf), allowance, live


def _ca_certified(A: np.ndarray, b: np.ndarray, s: float, w: np.ndarray, tol: float) -> bool:
    """True when the candidate ``w`` (projected onto Δ) has a primal/dual gap ≤ ``tol`` + rounding."""
    if not np.isfinite(w).all() or w.min() < -tol:
        return False
    w = _clean_simplex(w)
    gap, allowance, live = _ca_certificate(A[None], b[None], np.array([s]), w[None])
    return bool(live[0] and gap[0] <= tol + allowance[0])


def _conflict_averse_general(M: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact conflict-averse weights for one Gramian with K ≥ 3 (see the module docstring)."""
    K = M.shape[0]
    scale = float(np.max(np.diag(M)))
    if scale <= 0.0:  # every row is zero: F ≡ 0, the direction is zero
        w = np.full(K, 1.0 / K)
        return w, np.full(K, 1.0 / K)
    A = _psd_part(M / scale)
    M = A * scale  # solve, verify and build the direction on the same PSD Gramian
    b = A.sum(axis=1) / K
    s = c * np.sqrt(max(float(b.sum()) / K, 0.0))
    if s <= 0.0:  # linear objective: a vertex minimising b_i (the direction is g0 regardless)
        w = np.zeros(K)
        w[int(np.argmin(b))] = 1.0
        return w, _coefficients(M[None], w[None], np.zeros(1))[0]
    tol = _KKT_RTOL * (1.0 + s)

    def finish(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = _clean_simplex(w)
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
    raise RuntimeError(
        f"conflict-averse solver could not certify an optimum (KKT check failed) for c={c} and "
        f"the Gramian {M.tolist()}"
    )


# ------------------------------------------------------------------------------------------------
# K = 3, vectorised over the batch: every face of the triangle, in closed form
# ------------------------------------------------------------------------------------------------
_PAIRS_3 = ((0, 1), (0, 2), (1, 2))


def _normalised(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.max(np.diagonal(M, axis1=1, axis2=2), axis=1)
    safe = np.where(scale > 0, scale, 1.0)
    return M / safe[:, None, None], scale


def _triangle_systems(A: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Affine min-norm coefficients ``a`` (and shift direction ``e`` for right-hand side ``−b``)
    of the whole triangle from the bordered 4 × 4 system; ``ok`` marks well-posed entries."""
    B = A.shape[0]
    Bm = np.zeros((B, 4, 4))
    Bm[:, :3, :3] = A
    Bm[:, :3, 3] = 1.0
    Bm[:, 3, :3] = 1.0
    ok = np.abs(np.linalg.det(Bm)) > 1e-10
    Bm[~ok] = np.eye(4)
    rhs = np.zeros((B, 4, 2))
    rhs[:, 3, 0] = 1.0
    if b is not None:
        rhs[:, :3, 1] = -b
    sol = np.linalg.solve(Bm, rhs)
    return sol[:, :3, 0], (sol[:, :3, 1] if b is not None else None), ok


def _certified_min_norm(M: np.ndarray, A: np.ndarray, scale: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Project the enumerated candidates onto Δ and keep those that pass the KKT test
    ``(Aα)_i ≥ αᵀAα − tol`` (A = M / scale); the others are re-solved by the general solver.
    All-zero Gramians get the uniform weights."""
    K = M.shape[-1]
    alpha = np.clip(alpha, 0.0, None)
    alpha /= alpha.sum(axis=1, keepdims=True)
    grad = np.einsum("bij,bj->bi", A, alpha)
    f = np.einsum("bi,bi->b", alpha, grad)
    bad = (grad.min(axis=1) < f - _KKT_RTOL) & (scale > 0)
    for idx in np.flatnonzero(bad):
        alpha[idx] = _min_norm_general(M[idx])
    alpha[scale <= 0] = 1.0 / K
    return alpha


def _min_norm_3(M: np.ndarray) -> np.ndarray:
    """Exact min-norm weights at K = 3 for a batch: the best of the affine minimisers of the 7
    faces (vertices, clipped edge closed forms, the triangle's bordered solve), then the KKT test;
    an entry that fails it (ill-conditioned face) is re-solved by the general solver."""
    B = M.shape[0]
    A, scale = _normalised(M)
    cands = [np.broadcast_to(np.eye(3)[i], (B, 3)) for i in range(3)]
    for i, j in _PAIRS_3:
        pair = A[:, [i, j]][:, :, [i, j]]
        gamma = _min_norm_2(pair)
        w = np.zeros((B, 3))
        w[:, i], w[:, j] = gamma[:, 0], gamma[:, 1]
        cands.append(w)
    a, _, ok = _triangle_systems(A, None)
    ok &= (a >= 0).all(axis=1)
    cands.append(np.where(ok[:, None], a, cands[0]))
    W = np.stack(cands, axis=1)  # (B, 7, 3)
    values = np.einsum("bci,bij,bcj->bc", W, A, W)
    return _certified_min_norm(M, A, scale, W[np.arange(B), np.argmin(values, axis=1)])


def _conflict_averse_3(M: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact conflict-averse weights at K = 3 for a batch: the best stationary point over the
    7 faces (vertices; on edge (i, j) ``t² = (M_ii M_jj − M_ij²)/(D s² − (b_j − b_i)²)``,
    ``w_i = (M_jj − M_ij)/D + t (b_j − b_i)/D``; on the triangle ``w = a + t e`` from the bordered
    system), then the primal/dual certificate (:func:`_ca_certificate`); failing entries go to
    the general solver."""
    B = M.shape[0]
    A, scale = _normalised(M)
    b = A.sum(axis=2) / 3.0
    s = c * np.sqrt(np.maximum(b.sum(axis=1) / 3.0, 0.0))
    s2 = s * s
    cands, values = [], []
    for i in range(3):
        cands.append(np.broadcast_to(np.eye(3)[i], (B, 3)))
        values.append(b[:, i] + s * np.sqrt(np.maximum(A[:, i, i], 0.0)))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i, j in _PAIRS_3:
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
        a, e, ok = _triangle_systems(A, b)
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
    bad = live & (gap > _KKT_RTOL * (1.0 + s) + allowance)
    for idx in np.flatnonzero(bad):
        w[idx], coef[idx] = _conflict_averse_general(M[idx], c)
    return w, coef


# ------------------------------------------------------------------------------------------------
# K = 4, 5, vectorised over the batch: every face of the simplex, in one batched solve
# ------------------------------------------------------------------------------------------------
_FACE_MAX_K = 5  # 2^K − 1 faces; beyond K = 5 the enumeration outgrows the general solvers
_FACE_CONSTANTS: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _face_constants(K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-K constants of the face enumeration: the boolean supports of the ``2^K − 1`` faces
    (F, K), the support products ``1_S 1_Sᵀ`` (F, K, K) and the padded bordered matrices without
    the Gramian block (F, K + 1, K + 1): identity off the support, the border ``1_S``."""
    if K not in _FACE_CONSTANTS:
        codes = np.arange(1, 2**K)
        mask = ((codes[:, None] >> np.arange(K)[None, :]) & 1).astype(bool)
        fm = mask.astype(np.float64)
        pair = fm[:, :, None] * fm[:, None, :]
        base = np.zeros((mask.shape[0], K + 1, K + 1))
        base[:, np.arange(K), np.arange(K)] = 1.0 - fm
        base[:, :K, K] = fm
        base[:, K, :K] = fm
        _FACE_CONSTANTS[K] = (mask, pair, base)
    return _FACE_CONSTANTS[K]


def _face_systems(A: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Affine stationary data of every face at once (normalised ``A``, shape (B, K, K)).

    For the face with support ``S`` the bordered system ``[[A_SS, 1], [1ᵀ, 0]] [x; ν] = [y; z]``
    is padded to ``(K + 1) × (K + 1)`` with identity rows/columns off ``S`` (so ``x_i = 0`` there),
    giving a (B, F, K + 1, K + 1) stack solved by one batched ``np.linalg.solve`` for two
    right-hand sides: ``(0, 1)`` (the affine min-norm coefficients ``a``) and ``(−b_S, 0)`` (the
    shift direction ``e``). Each face's block is divided by its largest diagonal entry first
    (``a`` and ``e`` are unchanged by that), so faces of small rows keep their conditioning.
    Only an exactly singular bordered matrix (a zero pivot, which stops the batched solve; then
    the faces of zero determinant are replaced by the identity and the solve repeated) is marked
    not ``ok``; an ill-conditioned face (nearly
    affinely dependent rows, or rows of very different sizes, whose determinant can be tiny
    yet the face the optimal one) is solved anyway. That is safe because the callers compare
    candidates only by their true objective value at a point of the simplex, and the winner must
    still pass the KKT test or the primal/dual certificate, else the general solver is used: an
    inaccurate face can lose, or send an entry to the fallback, never return an unverified point.
    Entries off the support are set to exactly zero. Returns ``(a, e, ok)`` of shapes (B, F, K),
    (B, F, K) and (B, F).
    """
    B, K = A.shape[0], A.shape[1]
    mask, pair, base = _face_constants(K)
    F = mask.shape[0]
    diag = np.diagonal(A, axis1=1, axis2=2)  # (B, K), ≥ 0 on a Gramian
    top = np.max(diag[:, None, :] * mask, axis=2)  # (B, F): each face's largest diagonal entry
    top[top <= 0] = 1.0
    inv_top = 1.0 / top
    Bm = np.empty((B, F, K + 1, K + 1))
    Bm[...] = base
    Bm[:, :, :K, :K] += A[:, None] * pair * inv_top[:, :, None, None]
    rhs = np.zeros((B, F, K + 1, 2))
    rhs[:, :, K, 0] = 1.0
    if b is not None:
        rhs[:, :, :K, 1] = -b[:, None, :] * mask * inv_top[:, :, None]
    try:
        sol = np.linalg.solve(Bm, rhs)
    except np.linalg.LinAlgError:  # some face exactly singular: take it out and solve again
        singular = np.linalg.det(Bm) == 0.0
        Bm[singular] = np.eye(K + 1)
        sol = np.linalg.solve(Bm, rhs)
        sol[singular] = np.nan
    ok = np.isfinite(sol).all(axis=(2, 3))
    on = mask & ok[:, :, None]
    a = np.where(on, sol[:, :, :K, 0], 0.0)
    e = np.where(on, sol[:, :, :K, 1], 0.0) if b is not None else None
    return a, e, ok


def _min_norm_faces(M: np.ndarray) -> np.ndarray:
    """Exact min-norm weights for a batch with 3 ≤ K ≤ 5: the optimum lies in the relative
    interior of one of the ``2^K − 1`` faces, where it is that face's affine minimiser ``a``
    (:func:`_face_systems`). Each face's ``a`` that is a point of the simplex (``a ≥ 0``,
    rescaled to ``Σ a = 1``; the vertices always are) is a candidate; the one of smallest
    ``aᵀAa`` is kept and must pass the KKT test of :func:`_certified_min_norm`; an entry that fails it is
    re-solved by the general solver."""
    B = M.shape[0]
    A, scale = _normalised(M)
    a, _, ok = _face_systems(A, None)
    total = a.sum(axis=2)
    ok &= (a >= 0).all(axis=2) & (total > 0)
    a = a / np.where(ok, total, 1.0)[:, :, None]  # points of Δ where ok
    values = np.where(ok, ((a @ A) * a).sum(axis=2), np.inf)
    return _certified_min_norm(M, A, scale, a[np.arange(B), np.argmin(values, axis=1)])


def _conflict_averse_faces(M: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact conflict-averse weights for a batch with 3 ≤ K ≤ 5: on every face ``w = a + t e``
    with ``t = √(m²/(s² − κ²))`` (``m² = aᵀAa``, ``κ² = eᵀAe``; vertices are ``w = e_i``), the
    feasible candidate of smallest ``F(w) = w·b + s√(wᵀAw)`` (evaluated directly, so a
    candidate's value is always a true objective value), then the primal/dual certificate
    (:func:`_ca_certificate`) as at K = 3, and an optimum at the origin is certified by the cone
    projection (as in :func:`_conflict_averse_general`); failing entries go to the general
    solver."""
    B, K = M.shape[0], M.shape[1]
    A, scale = _normalised(M)
    b = A.sum(axis=2) / K
    s = c * np.sqrt(np.maximum(b.sum(axis=1) / K, 0.0))
    s2 = (s * s)[:, None]
    a, e, ok = _face_systems(A, b)
    vertex = _face_constants(K)[0].sum(axis=1) == 1  # (F,)
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
    bad = live & (s > 0) & (scale > 0) & (gap > _KKT_RTOL * (1.0 + s) + allowance)
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
