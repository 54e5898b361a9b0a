"""Solvers of the Nash bargaining equations ``M α = 1/α`` (element-wise), ``α > 0``.

Used by :class:`mtl_opt.methods.NashMTL`. Everything here works on stacks of Gramians
``M`` of shape ``(B, K, K)`` (float64 numpy arrays) so one call serves a single aggregation
(``B = 1``) and a batch of independent runs alike.

The problem in cosine form
--------------------------
With ``D = diag(M)`` and the cosine matrix ``C = D^{-1/2} M D^{-1/2}`` (unit diagonal), ``α``
solves ``M α = 1/α`` exactly when ``β = D^{1/2} α`` solves ``C β = 1/β``. So the Nash direction
``αᵀG = Σ_i β_i g_i/‖g_i‖`` only depends on the *unit* gradients: it is invariant to rescaling any
single task's gradient (``g_i → s_i g_i`` gives ``α_i → α_i/s_i``), in particular to a common
scale ``G → sG`` (``α → α/s``). Solving in ``β`` makes the solvers free of the gradients' units.

Existence and the documented regularisation
-------------------------------------------
``C β = 1/β`` is the stationarity condition of the strictly convex

    f(β) = ½ βᵀ C β − Σ_i log β_i        on β > 0,

which has a minimiser exactly when no non-zero ``v ≥ 0`` has ``vᵀ C v = 0``, i.e. when the zero
vector is not in the convex hull of the (unit) task gradients. At a Pareto-stationary point
(exactly opposing gradients, ``g_2 = −c g_1``) ``f`` is unbounded below and no Nash solution
exists. We therefore always solve the regularised system

    (C + σ I) β = 1/β,     σ = RIDGE + max(0, −λ_min(C)),     RIDGE = 1e-9,

which always has a unique solution (``σ = 0`` when fewer than two tasks bargain: a lone task
has the exact ``α = 1/‖g‖``). The second term only acts on a cosine matrix that rounding
made slightly indefinite (e.g. a Gramian computed in float32). For a non-degenerate problem
``σ = 1e-9`` moves ``β`` by a relative ``≈ σ β_i²`` (below 1e-8 on well-conditioned problems);
at a Pareto-stationary point the weights become large (``β ≈ 1/√σ``) but finite and the direction
tends to zero (norm ``O(√σ)``). Equivalently, in the units of ``M``: ``(M + σ diag(M)) α = 1/α``.

A task whose gradient is exactly zero (``M_ii = 0``) cannot bargain (its utility ``g_iᵀd`` is
zero for every ``d``); it is left out of the bargaining and gets ``α_i = 0``. It contributes
nothing to the direction either way. When every gradient is zero all weights are zero.

The exact solver
----------------
Damped Newton on ``f`` in the scaled variable ``β = diag(β) y`` (``y = 1`` at the iterate): the
scaled gradient is the dimensionless residual ``r = β ∘ (C'β) − 1`` and the scaled Hessian
``H = I + diag(β) C' diag(β)`` (``C' = C + σI``); the Newton step is ``β ← β ∘ (1 − t s)`` with
``s = H⁻¹ r``. ``f`` is self-concordant (a convex quadratic plus a log barrier), so the classic
damped step ``t = 1/(1 + λ)`` with the Newton decrement ``λ² = rᵀ s`` both decreases ``f`` and
keeps ``β > 0`` (``H ⪰ I`` bounds each relative change ``|t s_i| < 1``); in this damped phase
(``λ > 1/4``) the full step ``t = 1`` is taken instead whenever it keeps ``β > 0`` and decreases
``f`` (the positivity-keeping line search; it matters when ``β`` must grow by orders of magnitude
near a Pareto-stationary point). Once ``λ ≤ 1/4`` the step is Newton's plus Chebyshev's
third-order correction: the third derivative of ``f`` is diagonal (``−2/β_i³``), so the
correction is ``β ∘ H⁻¹(s ∘ s)``, one more solve with the same factorisation, and convergence is
cubic (``|s_i| ≤ 1/4`` and ``‖H⁻¹(s∘s)‖ ≤ 1/16`` keep ``β > 0``). From a warm start (the
previous step's weights, rescaled to the best common scale ``s² = K / βᵀC'β``, which absorbs
any change of the gradients' scale between steps) this usually takes two iterations.

It stops when every ``|r_i| ≤ RESIDUAL_TOL + 4 K ε β_i (|C'| β)_i`` (the tolerance 1e-10 plus
the rounding error of computing ``r_i`` in float64, which only matters near Pareto-stationary
points, where ``β`` is large) and raises :class:`NashSolverError` with the residual and the
iteration count if that does not happen within ``MAX_NEWTON_ITERATIONS`` steps. The
single-Gramian path (``_nash_single``) also stops right after a Newton-plus-Chebyshev
step whose new residual is certified below the tolerance without evaluating it: the residual
after that step is exactly ``2 s∘c − s∘s∘s + c∘s∘s − c∘c`` (``c = H⁻¹(s∘s)``), at most
``3λ³ + 2λ⁴`` (see ``_nash_exact_lapack``), so it returns the iterate at which the stacked
solver, evaluating that residual, stops too.

At ``K = 2`` there is a closed form. With ``M = [[a, b], [b, c]]`` the two equations
``α_1 (a α_1 + b α_2) = 1 = α_2 (b α_1 + c α_2)`` give, subtracted, ``a α_1² = c α_2²``, so
``α ∝ (1/√a, 1/√c)`` (``β_1 = β_2``); in cosine form ``C' = [[1+σ, ρ], [ρ, 1+σ]]`` (``ρ`` the
cosine ``b/√(ac)``) either equation then reads ``β² (1 + σ + ρ) = 1``:
``β = 1/√(1 + ρ + σ)`` and ``α_i = 1/(‖g_i‖ √(1 + ρ + σ))``. The direction is the sum of the
unit gradients divided by ``√(1 + cos θ)``, of norm ``√2``.

The cvxpy formulation
---------------------
The original implementation (Navon et al., 2022) solves the same equations by sequential convex
approximation; :class:`NashSCAProblem` re-states it (see its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtl_opt.solvers._linalg import ARRAY_OPS, FLOAT_OPS
from mtl_opt.solvers._precision import SolverError

__all__ = ["NashSCAProblem", "NashSolverError", "cosine_form", "nash_2", "nash_cvxpy", "nash_weights"]

RIDGE = 1e-9
RESIDUAL_TOL = 1e-10
MAX_NEWTON_ITERATIONS = 100
_EPS = float(np.finfo(np.float64).eps)
_UTILITY_FLOOR = 1e-3


class NashSolverError(SolverError):
    """A Nash-MTL solver did not produce a solution (no convergence, or a failed cvxpy solve)."""


@dataclass(frozen=True)
class CosineForm:
    """A stack of Gramians in cosine form.

    Attributes:
        C: ``(B, K, K)`` regularised cosine matrices ``C + σI`` (rows/columns of zero-gradient
            tasks are zero apart from the diagonal, which decouples them).
        inv_norm: ``(B, K)`` ``1/‖g_i‖`` (0 for zero-gradient tasks): ``α = inv_norm ∘ β``.
        sigma: ``(B,)`` the shift ``σ`` that was added.
    """

    C: np.ndarray
    inv_norm: np.ndarray
    sigma: np.ndarray


def cosine_form(M: np.ndarray) -> CosineForm:
    """Regularised cosine form of a stack of Gramians ``M`` (B, K, K) (see the module docstring)."""
    B, K, _ = M.shape
    diag = np.diagonal(M, axis1=1, axis2=2)
    active = diag > 0.0
    inv_norm = np.zeros_like(diag)
    np.divide(1.0, np.sqrt(diag, where=active, out=np.ones_like(diag)), out=inv_norm, where=active)
    C = M * inv_norm[:, :, None] * inv_norm[:, None, :]
    idx = np.arange(K)
    C[:, idx, idx] = 1.0
    if K == 1:
        lam_min = np.ones(B)
    elif K == 2:
        lam_min = 1.0 - np.abs(C[:, 0, 1])
    else:
        lam_min = np.linalg.eigvalsh(C)[:, 0]
    sigma = RIDGE + np.maximum(0.0, -lam_min)
    sigma = np.where(active.sum(axis=1) >= 2, sigma, 0.0)  # a lone task needs no ridge
    C[:, idx, idx] += sigma[:, None]
    return CosineForm(C=C, inv_norm=inv_norm, sigma=sigma)


def nash_weights(
    M: np.ndarray, alpha0: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Nash weights ``α`` of ONE Gramian ``M`` (K, K) -> (K,), or of a stack (B, K, K) -> (B, K).

    The one entry point of the exact solver: the closed form at ``K = 2`` (:func:`nash_2`, on
    floats for one Gramian, on arrays for a stack), damped Newton with Chebyshev's correction
    otherwise (lean LAPACK bookkeeping for one Gramian, ``_nash_single``; the stacked iteration
    :func:`newton_cosine` for a stack and for one Gramian with a zero-gradient task).

    Args:
        M: symmetric positive semi-definite Gramian(s), float64.
        alpha0: a warm start of the same leading shape (e.g. the previous step's weights);
            entries that are not positive and finite are replaced by a cold start. Ignored at
            ``K ≤ 2`` (closed form).

    Returns:
        ``(α, info)`` with ``info = {"iterations": Newton steps taken (0 for the closed form),
        "residual": max_i |β_i (C'β)_i − 1|}`` (over the stack; for one Gramian solved by the
        certified last step, the certified bound).

    Raises:
        ValueError: ``M`` is not (K, K) or (B, K, K).
        NashSolverError: Newton did not reach the residual tolerance.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim == 3 and M.shape[1] == M.shape[2]:
        return _nash_stacked(M, alpha0)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"nash_weights: expected a Gramian (K, K) or a stack (B, K, K), got shape {M.shape}")
    return _nash_single(M, alpha0)


def _nash_stacked(
    M: np.ndarray, alpha0: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`nash_weights` for a stack (B, K, K)."""
    K = M.shape[1]
    if K == 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            a1, a2, residual = nash_2(M[:, 0, 0], M[:, 0, 1], M[:, 1, 1])
        return np.stack([a1, a2], axis=1), {"iterations": 0, "residual": float(residual.max())}
    form = cosine_form(M)
    if K == 1:
        beta = 1.0 / np.sqrt(form.C[:, 0, :])
        return beta * form.inv_norm, {"iterations": 0, "residual": _residual(form.C, beta)}
    beta0 = None
    if alpha0 is not None:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            beta0 = alpha0 / np.where(form.inv_norm > 0, form.inv_norm, 1.0)
    beta, iterations, residual = newton_cosine(form.C, beta0)
    return beta * form.inv_norm, {"iterations": iterations, "residual": residual}


def nash_2(a, b, c, xp=ARRAY_OPS):  # type: ignore[no-untyped-def]
    """``K = 2``: ``α_i = 1/(‖g_i‖ √(1 + cos θ + σ))`` from ``M11 = a``, ``M12 = b``, ``M22 = c``,
    on floats (``xp = FLOAT_OPS``) or arrays (``xp = ARRAY_OPS``, under ``np.errstate``); returns
    ``(α1, α2, residual)``.

    Same regularisation as :func:`cosine_form` (``λ_min(C) = 1 − |cos θ|``, so
    ``σ = RIDGE + max(0, |cos θ| − 1)``); a zero-gradient task gets ``α_i = 0`` and the other one
    ``1/‖g‖`` (a lone task needs no ridge).
    """
    pos1, pos2 = a > 0.0, c > 0.0
    inv1 = xp.where(pos1, xp.div(1.0, xp.sqrt(xp.where(pos1, a, 1.0))), 0.0)
    inv2 = xp.where(pos2, xp.div(1.0, xp.sqrt(xp.where(pos2, c, 1.0))), 0.0)
    cos = b * inv1 * inv2
    shift = xp.where(pos1 & pos2, RIDGE + xp.maximum(0.0, abs(cos) - 1.0), 0.0)
    denom = 1.0 + cos + shift
    beta = xp.div(1.0, xp.sqrt(denom))
    return inv1 * beta, inv2 * beta, abs(beta * beta * denom - 1.0)


def newton_cosine(
    C: np.ndarray, beta0: np.ndarray | None = None
) -> tuple[np.ndarray, int, float]:
    """Damped Newton for ``C β = 1/β`` (C positive definite, (B, K, K)); returns (β, steps, residual)."""
    B, K, _ = C.shape
    if beta0 is None:
        beta = np.ones((B, K))
    else:
        beta = np.where(np.isfinite(beta0) & (beta0 > 0), beta0, 1.0)
    # Best common scale of the start: f(sβ) is minimised at s² = K / βᵀCβ.
    quad = np.einsum("bi,bij,bj->b", beta, C, beta)
    beta = beta * np.sqrt(K / quad)[:, None]
    absC = np.abs(C)
    eye = np.eye(K)
    rounding = 4.0 * K * _EPS
    for it in range(MAX_NEWTON_ITERATIONS + 1):
        Cb = np.einsum("bij,bj->bi", C, beta)
        r = beta * Cb - 1.0
        bound = RESIDUAL_TOL + rounding * beta * np.einsum("bij,bj->bi", absC, beta)
        done = np.all(np.abs(r) <= bound, axis=1)
        if done.all():
            return beta, it, float(np.abs(r).max())
        if it == MAX_NEWTON_ITERATIONS:
            break
        H = eye + beta[:, :, None] * C * beta[:, None, :]
        step = np.linalg.solve(H, r[:, :, None])[:, :, 0]
        lam = np.sqrt(np.maximum(np.einsum("bi,bi->b", r, step), 0.0))
        t = np.where(lam > 0.25, 1.0 / (1.0 + lam), 1.0)
        # Far from the solution the damped step is short; take the full Newton step instead
        # when it keeps β > 0 and decreases f (it often does, e.g. when β must grow a lot).
        full = 1.0 - step
        with np.errstate(invalid="ignore", divide="ignore"):
            f_full = _objective(C, beta * np.where(full > 0, full, 1.0))
            take_full = np.all(full > 0, axis=1) & (f_full < _objective(C, beta))
        t = np.where(take_full, 1.0, t)
        t = np.where(done, 0.0, t)
        # Quadratic phase: Chebyshev's third-order correction H⁻¹(s∘s) (see the module docs).
        cheb = (lam <= 0.25) & ~done
        update = 1.0 - t[:, None] * step
        if cheb.any():
            corr = np.linalg.solve(H, (step * step)[:, :, None])[:, :, 0]
            update = np.where(cheb[:, None], update + corr, update)
        beta = beta * update
    worst = int(np.argmax(np.abs(r).max(axis=1)))
    raise NashSolverError(
        f"Nash-MTL Newton solver did not converge in {MAX_NEWTON_ITERATIONS} iterations: "
        f"residual max|β∘(Cβ) − 1| = {float(np.abs(r[worst]).max()):.3e} "
        f"(tolerance {RESIDUAL_TOL:.1e}) for the cosine matrix {C[worst].tolist()}"
    )


def _nash_single(
    M: np.ndarray, alpha0: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`nash_weights` for ONE Gramian ``M`` (K, K), with few NumPy calls (the per-step path).

    Same equations, regularisation and Newton steps as the stacked version, and the same
    returned iterate; the bookkeeping differs (the iteration runs in the units of ``M``, direct
    LAPACK calls, the regularisation's eigenvalue computed only when a Cholesky factorisation of
    ``M`` fails) and the last step is certified instead of re-evaluated, in which case
    ``info["residual"]`` is the certified upper bound on the residual (see
    ``_nash_exact_lapack``). Gramians with a zero-gradient task use the stacked version.
    """
    K = M.shape[0]
    if K == 2:
        (a, b), (_, c) = M.tolist()
        a1, a2, residual = nash_2(a, b, c, FLOAT_OPS)
        return np.array([a1, a2]), {"iterations": 0, "residual": residual}
    if K >= 3:
        result = _nash_exact_lapack(M, alpha0)
        if result is not None:
            return result
    alpha, info = _nash_stacked(M[None], None if alpha0 is None else alpha0[None])
    return alpha[0], info


def _nash_exact_lapack(
    M: np.ndarray, alpha0: np.ndarray | None
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The Newton iteration of :func:`newton_cosine` for one Gramian (``K ≥ 3``).

    Returns ``None`` (use the stacked solver) when a task's gradient is zero.

    Lean bookkeeping for the per-step path. It runs in the units of ``M``: with
    ``M' = M + σ diag(M)`` (``= D^{1/2} C' D^{1/2}``) and ``α = D^{-1/2} β``, the scaled residual
    ``r = α ∘ (M'α) − 1`` and the scaled Hessian ``H = I + diag(α) M' diag(α)`` are exactly those
    of the cosine form, so the Newton steps are the same (up to rounding) without building ``C``.
    ``dpotrf`` factors ``H`` once per step and ``dpotrs`` solves for the Newton step and for
    Chebyshev's correction with that factor; scalar tests run on Python floats; the
    regularisation's eigenvalue is computed only when the Cholesky factorisation of ``M`` fails.

    Certified last step. In the scaled variable the residual after a step ``α ← α ∘ (1 + d)`` is,
    exactly, ``r' = r + H d + d ∘ (r + (H − I) d)``. For the Newton-plus-Chebyshev step
    ``d = −s + c`` (``H s = r``, ``H c = s ∘ s``) this is ``r' = 2 s∘c − s∘s∘s + c∘s∘s − c∘c``;
    with ``‖s‖ ≤ λ`` (``H ⪰ I``, ``λ`` the Newton decrement) and ``‖c‖ ≤ λ²`` it is at most
    ``3λ³ + 2λ⁴``. So when ``3λ³ + 2λ⁴ + 2ρ ≤ RESIDUAL_TOL`` the step lands within tolerance and
    is returned without evaluating ``M'α`` again: the same iterate at which the stacked solver,
    evaluating that residual, stops. ``ρ`` bounds the rounding: of the computed ``r``
    (``γ_{K+1} α_i(|M'|α)_i``), of the Cholesky solves (backward error ``γ_{3K+1} |L||Lᵀ|``, with
    ``(|L||Lᵀ|)_ij ≤ √(H_ii H_jj)``) and of forming the new ``α``. All are at most
    ``ε K (K + 2) (1 + tr H)`` up to constants; we use ``ρ = 8 K (K + 2) ε (1 + tr H)``.
    ``info["residual"]`` is then that bound, not a measured value.
    Near a Pareto-stationary point (huge ``α``, ``tr H`` ~ 1/σ) ``ρ`` exceeds the tolerance and
    the residual is evaluated as usual.
    """
    K = M.shape[0]
    dpotrf, dpotrs, eye, diag_idx, ones, twos, ridge = _constants(K)
    diag = M.diagonal()
    sigma = RIDGE
    if dpotrf(M)[1] != 0:  # not positive definite: λ_min(C) ≤ 0 (up to rounding)
        if not min(diag.tolist()) > 0.0:
            return None  # a zero-gradient task (positive definite M has a positive diagonal)
        inv_norm = 1.0 / np.sqrt(diag)
        C = M * inv_norm
        C *= inv_norm[:, None]
        C.flat[diag_idx] = 1.0
        sigma = RIDGE + max(0.0, -float(np.linalg.eigvalsh(C)[0]))
    if sigma == RIDGE:  # M' = M + σ diag(M): off-diagonal entries times 1, diagonal times 1 + σ
        Mr = M * ridge
    else:
        Mr = M.copy()
        Mr.flat[diag_idx] = diag * (1.0 + sigma)
    diag_r = Mr.diagonal()
    alpha = None
    if alpha0 is not None:
        start = alpha0.tolist()
        if min(start) > 0.0 and math.isfinite(sum(start)):
            alpha = alpha0
    if alpha is None:
        alpha = 1.0 / np.sqrt(diag)
    # Best common scale of the start: f(sα) is minimised at s² = K / αᵀM'α.
    alpha = alpha * math.sqrt(K / alpha.dot(Mr.dot(alpha)))
    rounding = 4.0 * K * _EPS
    certify = 8.0 * K * (K + 2) * _EPS
    worst = math.inf
    for it in range(MAX_NEWTON_ITERATIONS + 1):
        H = alpha[:, None] * alpha
        H *= Mr
        H += eye
        # The row sums of H are 1 + α_i (M'α)_i: one product gives the residual too.
        r = H.dot(ones) - twos
        r_list = r.tolist()
        worst = max(map(abs, r_list))
        if worst <= RESIDUAL_TOL:
            return alpha, {"iterations": it, "residual": worst}
        trace = 0.0  # tr H = K + Σ_i α_i² M'_ii, computed when needed
        if worst <= 1e-4:  # maybe at the rounding floor: compare with the rounding bound
            # α_i(|M'|α)_i ≤ (Σ_j α_j √M'_jj)² ≤ K (tr H − K): skip the exact bound when even
            # this (doubled, for a Gramian only positive semi-definite up to rounding) fails.
            trace = K + float((alpha * alpha).dot(diag_r))
            if worst <= RESIDUAL_TOL + 2.0 * rounding * K * trace:
                bound = (np.abs(Mr) @ alpha) * alpha
                if all(abs(x) <= RESIDUAL_TOL + rounding * y for x, y in zip(r_list, bound.tolist())):
                    return alpha, {"iterations": it, "residual": worst}
        if it == MAX_NEWTON_ITERATIONS:
            break
        factor, info = dpotrf(H)
        if info != 0:
            raise NashSolverError(
                f"Nash-MTL Newton step: the scaled Hessian is not positive definite (LAPACK info "
                f"{info}) at iteration {it}; Gramian {Mr.tolist()}"
            )
        step = dpotrs(factor, r)[0]
        lam2 = float(r.dot(step))
        if lam2 <= 1.0 / 16.0:  # quadratic phase
            # Newton step plus Chebyshev's correction
            update = dpotrs(factor, step * step)[0]
            update -= step
            update += ones
            alpha = alpha * update
            if lam2 <= 1e-6:  # certify it: |r'_i| ≤ 3λ³ + 2λ⁴ (see above)
                if not trace:
                    # (at the new α; one computed at the old α differs by (1 + d_i)² ≤ 1.01)
                    trace = K + float((alpha * alpha).dot(diag_r))
                lam = math.sqrt(lam2)
                bound = lam * lam2 * (3.0 + 2.0 * lam) + 2.0 * certify * (1.0 + trace)
                if bound <= RESIDUAL_TOL:
                    return alpha, {"iterations": it + 1, "residual": bound}
            continue
        full = 1.0 - step  # damped phase (Newton decrement λ > 1/4)
        t = 1.0 / (1.0 + math.sqrt(lam2))
        if bool(np.all(full > 0.0)):
            a_full = alpha * full
            if _objective(Mr[None], a_full[None])[0] < _objective(Mr[None], alpha[None])[0]:
                t = 1.0
        alpha = alpha - t * alpha * step
    raise NashSolverError(
        f"Nash-MTL Newton solver did not converge in {MAX_NEWTON_ITERATIONS} iterations: "
        f"residual max|α∘(M'α) − 1| = {worst:.3e} "
        f"(tolerance {RESIDUAL_TOL:.1e}) for the regularised Gramian {Mr.tolist()}"
    )


_IDENTITY: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _identity(K: int) -> tuple[np.ndarray, np.ndarray]:
    """``(I_K, flat indices of the diagonal)``, built once per ``K`` (read-only)."""
    if K not in _IDENTITY:
        eye = np.eye(K)
        eye.setflags(write=False)
        _IDENTITY[K] = (eye, np.arange(0, K * K, K + 1))
    return _IDENTITY[K]


_CONSTANTS: dict[int, tuple[Any, ...]] = {}


def _constants(K: int) -> tuple[Any, ...]:
    """``(dpotrf, dpotrs, I_K, diagonal's flat indices, ones(K), 2·ones(K), 1 + RIDGE·I_K)``,
    built once per ``K`` (arrays read-only)."""
    constants = _CONSTANTS.get(K)
    if constants is None:
        eye, diag_idx = _identity(K)
        ones, twos, ridge = np.ones(K), np.full(K, 2.0), np.ones((K, K))
        ridge.flat[diag_idx] = 1.0 + RIDGE
        for array in (ones, twos, ridge):
            array.setflags(write=False)
        constants = (*_cholesky_routines(), eye, diag_idx, ones, twos, ridge)
        _CONSTANTS[K] = constants
    return constants


def _cholesky_routines() -> tuple[Any, Any]:
    """LAPACK's ``dpotrf`` (Cholesky factor) and ``dpotrs`` (solve with it), imported once."""
    lapack = _lapack()
    return lapack.dpotrf, lapack.dpotrs


_LAPACK: Any = None


def _lapack() -> Any:
    global _LAPACK
    if _LAPACK is None:
        from scipy.linalg import lapack

        _LAPACK = lapack
    return _LAPACK


def _objective(C: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``f(β) = ½βᵀCβ − Σ log β`` per stack entry."""
    return 0.5 * np.einsum("bi,bij,bj->b", beta, C, beta) - np.log(beta).sum(axis=1)


def _residual(C: np.ndarray, beta: np.ndarray) -> float:
    return float(np.abs(beta * np.einsum("bij,bj->bi", C, beta) - 1.0).max())


class NashSCAProblem:
    """The original Nash-MTL sequential convex approximation, as one reusable cvxpy Problem.

    Facts of the original implementation (Navon et al., 2022, public code) that are kept:

    * the Gramian is divided by its Frobenius norm before solving;
    * one variable ``α ≥ 0`` (K); the data enter as cvxpy Parameters (in the original: the
      normalised Gramian ``Ĝ``, the previous iterate ``α_t`` at which the concave part is
      linearised, and the normalisation factor), so the Problem is built once and re-solved;
    * constraints ``−log α_i − log (Ĝα)_i ≤ 0`` for every task, i.e. ``α_i (Ĝα)_i ≥ 1``
      (each task's utility at least matches its bargaining "price" ``1/α_i``);
    * objective ``min Σ_i (Ĝα)_i + ∇φ(α_t)ᵀ(α − α_t)`` with
      ``φ(α) = Σ_i log α_i + Σ_i log (Ĝα)_i``, so ``∇φ(α_t) = 1/α_t + Ĝ (1/(Ĝα_t))``;
    * up to ``optim_niter`` convex solves per aggregation, warm-started from the previous
      aggregation's ``α`` (all ones at the first one), stopping early on a small step
      ``‖α_{t+1} − α_t‖ < 1e-6`` or a small Nash residual.

    Differences, all deliberate:

    * The original keeps the normalisation factor ``n`` inside the constraints and objective so
      that ``α`` stays in the units of ``G``; we solve in normalised units (``n = 1``) and map
      back ``α = α̂/√n``, the same fixed point by scale invariance, so that the solver's absolute
      tolerances mean the same thing whatever the gradients' scale.
    * ``∇φ(α_t)`` is computed in numpy and passed as a Parameter (mathematically identical): it
      keeps the problem DPP, so cvxpy compiles it once and every re-solve only swaps numbers.
    * The solver is CLARABEL (cvxpy's default conic solver; the original's ECOS is no longer
      installed with cvxpy ≥ 1.6, and the original then silently returned its previous or
      all-ones weights). A solve whose status is not optimal / optimal_inaccurate, or that
      raises, raises :class:`NashSolverError` naming the status.
    * The residual rule uses the scale-free ``max_i |α̂_i (Ĝα̂)_i − 1| < residual_tol`` (1e-6);
      the original compares ``‖Ĝα_t − 1/α_t‖`` with 1e-3, mixing normalised and unnormalised
      quantities, so in practice its loop ends on the step rule or the iteration budget. Both
      rules are checked after each solve and the newest iterate is returned (the original
      returns the linearisation point ``α_t``, within 1e-6 of it when the step rule fires).
      Running out of ``optim_niter`` iterations is not an error (it is the original's budget);
      ``info["residual"]`` reports how far from the Nash equations the result is.
    * The Gramian is the regularised one of :func:`cosine_form` and zero-gradient tasks are left
      out, exactly as in the exact solver, so both solvers target the same equations.
    * The linearisation of ``log (Ĝα)_i`` needs positive utilities at the start point. Where the
      previous (or all-ones) weights have a non-positive utility, we start from the
      unit-gradient weights ``α_i ∝ 1/‖g_i‖``, and the utilities entering ``∇φ`` are floored at
      1e-3 of the largest one (this only affects the first subproblem: every later iterate has
      ``α_i (Ĝα)_i ≥ 1``). The original started there anyway, and an unbounded first
      subproblem made it keep its previous weights.

    State: each aggregation is a function of ``M`` and the previous ``α`` alone (which
    ``NashMTL.state_dict`` holds), so a resumed run continues bit for bit. cvxpy's
    ``warm_start=True`` would instead update a cached CLARABEL solver in place; that solver keeps
    data of earlier subproblems (measured: answers differ by ~1e-9 from a freshly built one), a
    hidden state no checkpoint could hold. Building the conic solver afresh for every subproblem
    costs no measurable time (the compiled cvxpy problem is still reused).

    Limitation: within the conic solver's tolerance of a Pareto-stationary point (where no Nash
    solution exists and only the 1e-9 ridge makes one) the subproblems are at the limit of the
    solver's precision; the SCA then returns the regularised answer's direction (about zero)
    with weights accurate only to a few digits, or raises :class:`NashSolverError`.
    The exact solver handles these points.
    """

    def __init__(self, n_tasks: int, solver: str = "CLARABEL",
                 solver_options: dict[str, Any] | None = None) -> None:
        import cvxpy as cp  # lazy: importing mtl_opt must not load cvxpy

        self._cp = cp
        self.n_tasks = n_tasks
        self.solver = solver
        self.solver_options = dict(solver_options or {})
        self.alpha = cp.Variable(n_tasks, nonneg=True)
        self.gramian = cp.Parameter((n_tasks, n_tasks))
        self.linear = cp.Parameter(n_tasks)  # ∇φ(α_t); the constant −∇φ(α_t)ᵀα_t is dropped
        g_alpha = self.gramian @ self.alpha
        constraints = [cp.log(self.alpha) + cp.log(g_alpha) >= 0]
        objective = cp.Minimize(cp.sum(g_alpha) + self.linear @ self.alpha)
        self.problem = cp.Problem(objective, constraints)

    def _run(self, problem: Any, what: str) -> np.ndarray:
        cp = self._cp
        # warm_start=False: cvxpy still reuses the compiled (DPP) problem, but the conic solver
        # is built afresh from this subproblem's data (see "State" in the class docstring).
        try:
            problem.solve(solver=self.solver, warm_start=False, **self.solver_options)
        except cp.error.SolverError as exc:
            raise NashSolverError(f"Nash-MTL cvxpy solve failed at {what} with {self.solver}: {exc}") from exc
        status = problem.status
        value = self.alpha.value
        if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or value is None:
            raise NashSolverError(
                f"Nash-MTL cvxpy solve at {what} ended with status {status!r} ({self.solver}); "
                "refusing to return equal or stale weights"
            )
        return np.asarray(value, dtype=np.float64)

    def solve(
        self, M: np.ndarray, alpha0: np.ndarray | None, optim_niter: int,
        step_tol: float = 1e-6, residual_tol: float = 1e-6,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """SCA for one positive definite Gramian ``M`` (K, K); returns ``(α, info)``."""
        norm = float(np.linalg.norm(M))
        G_hat = M / norm
        self.gramian.value = G_hat
        if alpha0 is not None and np.all(np.isfinite(alpha0)) and np.all(alpha0 > 0):
            alpha_t = alpha0 * np.sqrt(norm)
        else:
            alpha_t = np.ones(self.n_tasks)
        if not np.all(G_hat @ alpha_t > 0):
            # The linearisation of log (Ĝα)_i needs positive utilities at the start point:
            # try the unit-gradient weights α_i ∝ 1/‖g_i‖ instead.
            alpha_t = 1.0 / np.sqrt(np.diagonal(G_hat))
        iterations = 0
        for iterations in range(1, optim_niter + 1):
            # Utilities are floored so that a start near a Pareto-stationary point (where no
            # weights make every utility clearly positive) still gives a bounded subproblem;
            # every later iterate satisfies α_i (Ĝα)_i ≥ 1, so the floor only acts on the start.
            utilities = G_hat @ alpha_t
            utilities = np.maximum(utilities, _UTILITY_FLOOR * np.abs(utilities).max())
            self.linear.value = 1.0 / alpha_t + G_hat @ (1.0 / utilities)
            alpha_new = self._run(self.problem, f"SCA iteration {iterations}")
            status = self.problem.status
            if not np.all(alpha_new > 0):
                raise NashSolverError(
                    f"Nash-MTL cvxpy solve at SCA iteration {iterations} returned non-positive "
                    f"weights {alpha_new.tolist()} (status {status!r})"
                )
            step = float(np.linalg.norm(alpha_new - alpha_t))
            alpha_t = alpha_new
            residual = float(np.abs(alpha_t * (G_hat @ alpha_t) - 1.0).max())
            if step < step_tol or residual < residual_tol:
                break
        residual = float(np.abs(alpha_t * (G_hat @ alpha_t) - 1.0).max())
        return alpha_t / np.sqrt(norm), {"iterations": iterations, "residual": residual}


def nash_cvxpy(
    M: np.ndarray, alpha0: np.ndarray | None, optim_niter: int,
    problems: dict[int, NashSCAProblem], solver: str = "CLARABEL",
    solver_options: dict[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Nash weights of ONE Gramian ``M`` (K, K) by the original's SCA in cvxpy.

    ``problems`` caches one compiled :class:`NashSCAProblem` per number of bargaining tasks (the
    Problem is built once and re-solved). Zero-gradient tasks are left out (``α_i = 0``).
    """
    form = cosine_form(M[None])
    inv_norm = form.inv_norm[0]
    active = inv_norm > 0
    alpha = np.zeros(M.shape[0])
    k = int(active.sum())
    if k == 0:
        return alpha, {"iterations": 0, "residual": 0.0}
    # Back to the units of M: (M + σ diag M) restricted to the bargaining tasks.
    scale = 1.0 / inv_norm[active]
    M_reg = form.C[0][np.ix_(active, active)] * scale[:, None] * scale[None, :]
    key = k
    problem = problems.get(key)
    if problem is None or problem.solver != solver or problem.solver_options != dict(solver_options or {}):
        problem = NashSCAProblem(k, solver=solver, solver_options=solver_options)
        problems[key] = problem
    start = None if alpha0 is None else alpha0[active]
    sub, info = problem.solve(M_reg, start, optim_niter)
    alpha[active] = sub
    return alpha, info
