"""Eigen-decompositions of stacks of Gramians with a numerical rank, for the spectral methods."""

from __future__ import annotations

import numpy as np


def eigh_with_rank(M: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(λ, V, keep)`` for symmetric ``M`` (B, K, K): ``M = V diag(λ) Vᵀ`` (λ ascending) and
    ``keep`` (B, K) marks the eigenvalues above ``λ_max · K · eps`` (the numerical rank rule of
    ``torch.linalg.pinv`` / ``matrix_rank``; ``eps`` is chosen by the caller)."""
    lam, V = np.linalg.eigh(M)
    K = M.shape[-1]
    tol = lam[:, -1:] * K * eps
    keep = lam > np.maximum(tol, 0.0)
    return lam, V, keep


def pinv_apply(M: np.ndarray, x: np.ndarray, eps: float = float(np.finfo(np.float64).eps)) -> np.ndarray:
    """``M⁺ x`` (B, K) for symmetric PSD ``M`` (B, K, K) by the eigen-decomposition, dropping the
    eigenvalues below the rank tolerance of :func:`eigh_with_rank`."""
    lam, V, keep = eigh_with_rank(M, eps)
    inv = np.where(keep, 1.0 / np.where(keep, lam, 1.0), 0.0)
    coords = inv * (np.swapaxes(V, 1, 2) @ x[:, :, None])[:, :, 0]
    return (V @ coords[:, :, None])[:, :, 0]


def eigh_two(a, b, c, xp):  # type: ignore[no-untyped-def]
    """The eigen-decomposition of the symmetric ``[[a, b], [b, c]]`` in closed form, on floats
    (``xp = FLOAT_OPS``) or on (B,) arrays (``xp = ARRAY_OPS``, under ``np.errstate(all="ignore")``).

    Returns ``(λ_1, λ_2, x, y)`` with ``λ_1 ≤ λ_2`` and ``(x, y)`` the unit eigenvector of ``λ_2``
    (``(−y, x)`` is that of ``λ_1``). With ``h = (a − c)/2`` and ``r = √(h² + b²)``:
    ``λ = (a + c)/2 ∓ r``, and the eigenvector of ``λ_2`` is ``(h + r, b)`` for ``h ≥ 0``, else
    ``(b, r − h)`` (both free of cancellation); a multiple of the identity takes ``(1, 0)``.
    Callers pass normalised entries (``|b| ≤ 1``), so ``h² + b²`` cannot overflow.
    """
    h = 0.5 * (a - c)
    m = 0.5 * (a + c)
    r = xp.sqrt(h * h + b * b)
    up = h >= 0.0
    x = xp.where(up, h + r, b)
    y = xp.where(up, b, r - h)
    n = xp.sqrt(x * x + y * y)
    zero = n == 0.0
    n = xp.where(zero, 1.0, n)
    return m - r, m + r, xp.where(zero, 1.0, x / n), xp.where(zero, 0.0, y / n)


def pinv_apply_two(a, b, c, x0, x1, xp, eps: float = float(np.finfo(np.float64).eps)):  # type: ignore[no-untyped-def]
    """:func:`pinv_apply` at K = 2 in closed form (:func:`eigh_two`, the same rank rule), on
    floats or (B,) arrays: ``M⁺ x`` for ``M = [[a, b], [b, c]]``, as the pair of its entries."""
    l1, l2, vx, vy = eigh_two(a, b, c, xp)
    tol = xp.maximum(l2 * (2 * eps), 0.0)
    k1, k2 = l1 > tol, l2 > tol
    c2 = xp.where(k2, 1.0 / xp.where(k2, l2, 1.0), 0.0) * (vx * x0 + vy * x1)
    c1 = xp.where(k1, 1.0 / xp.where(k1, l1, 1.0), 0.0) * (vx * x1 - vy * x0)
    return vx * c2 - vy * c1, vy * c2 + vx * c1
