"""Combinations of the rows of ``G``, given by their coefficients, on floats or on arrays.

A Gramian method's stages act on coefficient vectors ``c`` (the direction ``cᵀG``): scaling,
adding, and norms ``‖cᵀG‖ = √(cᵀMc)`` from the Gramian. :class:`FloatRows` does this for one
Gramian on Python floats (a few µs at K ≤ 8: no array creation or ufunc dispatch) and
:class:`ArrayRows` for a batch (B, K, K) on NumPy arrays, with the same operations in the same
order (hence the same IEEE results). A method writes its stages once against this interface
(``rows.xp`` gives the matching element-wise functions, see :mod:`mtl_opt.solvers._linalg`)
and runs them on either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from operator import mul
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_opt.solvers._linalg import ARRAY_OPS, FLOAT_OPS

__all__ = ["ArrayRows", "FloatRows", "clip_to_norm", "two_task_weights"]


class FloatRows:
    """One Gramian ``M`` (nested lists); vectors are lists of K floats, scalars are floats."""

    xp: Any = FLOAT_OPS

    def __init__(self, M: list[list[float]]) -> None:
        self.M = M

    def norm(self, c: list[float]) -> float:
        """``‖cᵀG‖ = √max(cᵀMc, 0)``."""
        return math.sqrt(max(sum(ci * sum(map(mul, row, c)) for ci, row in zip(c, self.M)), 0.0))

    def scale(self, c: list[float], factor: float) -> list[float]:
        return [x * factor for x in c]

    def add(self, a: list[float], b: list[float]) -> list[float]:
        return [x + y for x, y in zip(a, b)]

    def total(self, c: list[float]) -> float:
        """``Σ_i c_i``."""
        return sum(c)

    def size(self, c: list[float]) -> float:
        """``Σ_i |c_i| ‖g_i‖``: the size of the rows the combination adds up (its rounding scale)."""
        return sum(abs(x) * math.sqrt(max(self.M[i][i], 0.0)) for i, x in enumerate(c))


class ArrayRows:
    """A batch of Gramians ``M`` (B, K, K); vectors are (B, K) arrays, scalars (B,) arrays."""

    xp: Any = ARRAY_OPS

    def __init__(self, M: np.ndarray) -> None:
        self.M = M

    def norm(self, c: np.ndarray) -> np.ndarray:
        return np.sqrt(np.maximum(np.einsum("bi,bij,bj->b", c, self.M, c), 0.0))

    def scale(self, c: np.ndarray, factor: np.ndarray | float) -> np.ndarray:
        return c * (factor[:, None] if isinstance(factor, np.ndarray) else factor)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    def total(self, c: np.ndarray) -> np.ndarray:
        return c.sum(axis=1)

    def size(self, c: np.ndarray) -> np.ndarray:
        diag = np.sqrt(np.maximum(np.diagonal(self.M, axis1=1, axis2=2), 0.0))
        return np.einsum("bi,bi->b", np.abs(c), diag)


def clip_to_norm(M: np.ndarray, c: np.ndarray, max_norm: float) -> np.ndarray:
    """``c · min(1, max_norm/‖cᵀG‖)`` for coefficients ``c`` (B, K) of Gramians ``M`` (B, K, K)
    (``max_norm = 0``: unchanged): the direction clipped to ``max_norm``, as Nash-MTL's and
    FairGrad's authors clip the shared gradient. One problem with K ≤ 8 runs on floats."""
    if max_norm == 0.0:
        return c.copy()
    single = c.shape[0] == 1 and c.shape[1] <= 8
    rows: FloatRows | ArrayRows = FloatRows(M[0].tolist()) if single else ArrayRows(M)
    with np.errstate(divide="ignore"):
        norm = rows.norm(c[0].tolist() if single else c)
        factor = rows.xp.where(norm > max_norm, rows.xp.div(max_norm, norm), 1.0)
    return c * (factor if single else factor[:, None])


def two_task_weights(formula: Callable[..., tuple[Any, Any]], M: Tensor, *args: Any) -> Tensor:
    """``β`` of a K = 2 closed form ``formula(m11, m12, m22, *args, xp)``, written once: on Python
    floats for one Gramian (2, 2) (``xp = FLOAT_OPS``; a few µs instead of the tens that NumPy's
    per-call overhead costs), on (B,) arrays for a batch (B, 2, 2) (``xp = ARRAY_OPS``)."""
    if M.dim() == 2:
        (m11, m12), (_, m22) = M.tolist()
        return torch.tensor(formula(m11, m12, m22, *args, FLOAT_OPS), dtype=torch.float64)
    Mn = M.numpy()
    with np.errstate(all="ignore"):
        b1, b2 = formula(Mn[:, 0, 0], Mn[:, 0, 1], Mn[:, 1, 1], *args, ARRAY_OPS)
    return torch.from_numpy(np.stack([np.broadcast_to(b1, Mn.shape[:1]), np.broadcast_to(b2, Mn.shape[:1])], axis=1))
