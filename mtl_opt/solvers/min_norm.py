"""The min-norm point of the convex hull of the task gradients (MGDA).

Désidéri 2012; Sener & Koltun 2018: ``α* = argmin_{α∈Δ} αᵀMα`` over the probability simplex
``Δ = {α ≥ 0, Σ α_i = 1}``, with ``M = G Gᵀ``; ``α*ᵀG`` is the point of smallest norm in the convex
hull of the rows of ``G``. One entry point, :func:`min_norm_weights`, solved *exactly* (to
rounding), never by a fixed number of iterations:

* ``K = 1``: the only point of the simplex. ``K = 2``: the closed form
  ``α1 = clip((M22 − M12)/(M11 + M22 − 2M12), 0, 1)`` (:func:`min_norm_2`, written once and
  evaluated on floats for a single Gramian, on arrays for a batch).
* A single Gramian with ``3 ≤ K ≤ 8``: Wolfe's active set on Python floats
  (:mod:`mtl_opt.solvers._active_set`), accepted only on the KKT test below; what it cannot
  certify (or a non-unique minimiser) goes to the batched solver on a batch of one.
* A batch, ``K = 3``: vectorised over the batch: the optimum lies in the relative interior of one
  of the triangle's 7 faces, where it is that face's affine minimiser (closed form on vertices and
  edges, a bordered 4 × 4 solve on the triangle); the best candidate is kept and must pass the
  KKT test, an entry that fails it is re-solved by the general method.
* ``K = 4, 5``: the same enumeration over all ``2^K − 1`` faces, vectorised over the batch *and*
  the faces (:func:`mtl_opt.solvers._linalg.face_systems`).
* ``K ≥ 6`` (and the fallback): a non-negative least-squares problem (Lawson–Hanson,
  :func:`scipy.optimize.nnls`): with ``M = LLᵀ``, ``v* = argmin_{v≥0} ‖Lᵀv‖² + (1 − 1ᵀv)²`` gives
  ``α* = v*/1ᵀv*`` (the KKT conditions of the NNLS problem are those of the min-norm problem
  scaled by ``1ᵀv*``). The support is re-solved exactly (bordered system).

Every answer passes the KKT test ``(Mα)_i ≥ αᵀMα − tol`` for every ``i`` (``tol = 1e-10 ·
max_i M_ii``, which bounds the objective gap by ``2·tol``); otherwise
:class:`MinNormSolverError` is raised, never an unverified point. The PSD repair and the NNLS
factor work on the correlation matrix ``D⁻¹MD⁻¹`` (``D = diag(√M_ii)``), so task gradients of
very different sizes keep their relative precision. All arithmetic is float64 on the CPU.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls
from torch import Tensor

from mtl_opt.solvers._active_set import ACTIVE_SET_MAX_K, min_norm_floats
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
    face_systems,
    factor,
    normalised,
    psd_part,
    stack_of,
    triangle_systems,
)
from mtl_opt.solvers._precision import KKT_RTOL, SolverError

__all__ = ["MinNormSolverError", "min_norm_2", "min_norm_weights"]


class MinNormSolverError(SolverError):
    """The min-norm solver could not certify an optimum (KKT test failed)."""


def min_norm_weights(M: Tensor | np.ndarray, *, checked: bool = False) -> Tensor | np.ndarray:
    """The exact min-norm weights ``α* = argmin_{α∈Δ} αᵀMα``.

    Args:
        M: a Gramian (K, K) or a batch of them (B, K, K); symmetric positive semi-definite
            (symmetrised here; checked finite).
        checked: ``M`` is already known finite and symmetric (the aggregators' Gramians, checked
            once in :mod:`mtl_opt._validation`): no second check.

    Returns:
        ``α*`` float64, shape (K,) or (B, K): a CPU tensor for a tensor input, a NumPy array
        otherwise. When the minimiser is not unique (affinely dependent rows) one minimiser is
        returned; the point ``α*ᵀG`` is always unique. When every row is zero the uniform weights
        are returned.

    Raises:
        ValueError: ``M`` has the wrong shape or is not finite.
        MinNormSolverError: no candidate passed the KKT test.
    """
    Ms, batched, tensor = stack_of(M, "min_norm_weights")
    K = Ms.shape[1]
    if Ms.shape[0] == 1 and K <= ACTIVE_SET_MAX_K:
        rows = Ms[0].tolist() if checked else checked_rows(Ms[0], "min_norm_weights")
        alpha = _min_norm_single(rows)
        out = np.array([alpha]) if alpha is not None else _min_norm_batch(np.array([rows]))
    else:
        out = _min_norm_batch(Ms if checked else checked_stack(Ms, "min_norm_weights"))
    return answer(out, batched, tensor)


def min_norm_2(m11, m12, m22, xp=ARRAY_OPS):  # type: ignore[no-untyped-def]
    """``α1`` of the K = 2 closed form ``clip((M22 − M12)/(M11 + M22 − 2M12), 0, 1)`` on floats
    (``xp = FLOAT_OPS``) or arrays (``xp = ARRAY_OPS``, under ``np.errstate``). A zero
    denominator (identical rows) gives ``α1 = ½``: every ``α`` is optimal then."""
    D = m11 + m22 - 2.0 * m12
    pos = D > 0
    return xp.where(pos, xp.clip(xp.div(m22 - m12, xp.where(pos, D, 1.0)), 0.0, 1.0), 0.5)


def _min_norm_single(m: list[list[float]]) -> list[float] | None:
    """One Gramian on Python floats: K = 1, the K = 2 closed form, or the certified active set
    (``None`` when it cannot certify: the batched solver decides)."""
    K = len(m)
    if K == 1:
        return [1.0]
    if K == 2:
        a1 = min_norm_2(m[0][0], m[0][1], m[1][1], FLOAT_OPS)
        return [a1, 1.0 - a1]
    return min_norm_floats(m)


def _min_norm_batch(M: np.ndarray) -> np.ndarray:
    """The vectorised solvers for a checked, symmetric float64 batch (B, K, K)."""
    B, K = M.shape[0], M.shape[1]
    if K == 1:
        return np.ones((B, 1))
    if K == 2:
        with np.errstate(divide="ignore", invalid="ignore"):
            a1 = min_norm_2(M[:, 0, 0], M[:, 0, 1], M[:, 1, 1])
        return np.stack([a1, 1.0 - a1], axis=1)
    if K == 3:
        return _min_norm_3(M)
    if K <= FACE_MAX_K:
        return _min_norm_faces(M)
    return np.stack([_min_norm_general(M[b]) for b in range(B)])


def _min_norm_kkt_ok(A: np.ndarray, alpha: np.ndarray, tol: float) -> bool:
    if not np.isfinite(alpha).all() or alpha.min() < -tol:
        return False
    grad = A @ alpha
    return float(alpha @ grad - grad.min()) <= tol


def _min_norm_general(M: np.ndarray) -> np.ndarray:
    """Exact min-norm weights for one Gramian (any K): NNLS, exact re-solve, KKT check."""
    K = M.shape[0]
    scale = float(np.max(np.diag(M)))
    if scale <= 0.0:
        return np.full(K, 1.0 / K)
    A = psd_part(M / scale)
    R = factor(A)
    design = np.vstack([R, np.ones((1, K))])
    target = np.zeros(K + 1)
    target[-1] = 1.0
    v, _ = nnls(design, target, maxiter=50 * K)
    candidates = []
    if v.sum() > 0:
        raw = v / v.sum()
        support = np.flatnonzero(raw > 0)
        polished = np.zeros(K)
        polished[support] = bordered_solve(A[np.ix_(support, support)], np.zeros(support.size), 1.0)
        candidates = [polished, raw]
    for alpha in candidates:
        if _min_norm_kkt_ok(A, alpha, KKT_RTOL):
            return clean_simplex(alpha)
    raise MinNormSolverError(
        f"min-norm solver could not certify an optimum (KKT check failed) for the Gramian {M.tolist()}"
    )


def _certified_min_norm(M: np.ndarray, A: np.ndarray, scale: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Project the enumerated candidates onto Δ and keep those that pass the KKT test
    ``(Aα)_i ≥ αᵀAα − tol`` (A = M / scale); the others are re-solved by the general solver.
    All-zero Gramians get the uniform weights."""
    K = M.shape[-1]
    alpha = np.clip(alpha, 0.0, None)
    alpha /= alpha.sum(axis=1, keepdims=True)
    grad = np.einsum("bij,bj->bi", A, alpha)
    f = np.einsum("bi,bi->b", alpha, grad)
    bad = (grad.min(axis=1) < f - KKT_RTOL) & (scale > 0)
    for idx in np.flatnonzero(bad):
        alpha[idx] = _min_norm_general(M[idx])
    alpha[scale <= 0] = 1.0 / K
    return alpha


def _min_norm_3(M: np.ndarray) -> np.ndarray:
    """Exact min-norm weights at K = 3 for a batch: the best of the affine minimisers of the 7
    faces (vertices, clipped edge closed forms, the triangle's bordered solve), then the KKT test;
    an entry that fails it (ill-conditioned face) is re-solved by the general solver."""
    B = M.shape[0]
    A, scale = normalised(M)
    cands = [np.broadcast_to(np.eye(3)[i], (B, 3)) for i in range(3)]
    for i, j in PAIRS_3:
        pair = A[:, [i, j]][:, :, [i, j]]
        gamma = _min_norm_batch(pair)
        w = np.zeros((B, 3))
        w[:, i], w[:, j] = gamma[:, 0], gamma[:, 1]
        cands.append(w)
    a, _, ok = triangle_systems(A, None)
    ok &= (a >= 0).all(axis=1)
    cands.append(np.where(ok[:, None], a, cands[0]))
    W = np.stack(cands, axis=1)  # (B, 7, 3)
    values = np.einsum("bci,bij,bcj->bc", W, A, W)
    return _certified_min_norm(M, A, scale, W[np.arange(B), np.argmin(values, axis=1)])


def _min_norm_faces(M: np.ndarray) -> np.ndarray:
    """Exact min-norm weights for a batch with 3 ≤ K ≤ 5: the optimum lies in the relative
    interior of one of the ``2^K − 1`` faces, where it is that face's affine minimiser ``a``
    (:func:`face_systems`). Each face's ``a`` that is a point of the simplex (``a ≥ 0``,
    rescaled to ``Σ a = 1``; the vertices always are) is a candidate; the one of smallest
    ``aᵀAa`` is kept and must pass the KKT test of :func:`_certified_min_norm`; an entry that fails it is
    re-solved by the general solver."""
    B = M.shape[0]
    A, scale = normalised(M)
    a, _, ok = face_systems(A, None)
    total = a.sum(axis=2)
    ok &= (a >= 0).all(axis=2) & (total > 0)
    a = a / np.where(ok, total, 1.0)[:, :, None]  # points of Δ where ok
    values = np.where(ok, ((a @ A) * a).sum(axis=2), np.inf)
    return _certified_min_norm(M, A, scale, a[np.arange(B), np.argmin(values, axis=1)])
