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
