"""Linear algebra shared by the K × K solvers (float64, normalised units ``A = M / max_i M_ii``).

* input: :func:`stack_of` (a Gramian or a stack of them), checked once on the path that runs
  (:func:`checked_rows` for a single call on floats, :func:`checked_stack` for arrays), and the
  answer in the input's form (:func:`answer`);
* PSD repair and factors on the correlation matrix (:func:`psd_part`, :func:`factor`), so that
  rows of very different sizes keep their relative precision;
* bordered (equality-constrained) systems on one face (:func:`bordered_solve`) or on every face
  of the simplex at once (:func:`face_systems`, :func:`triangle_systems`);
* :data:`FLOAT_OPS` / :data:`ARRAY_OPS`: the few element-wise functions the K = 2 closed forms
  use, for Python floats and for NumPy arrays. Each closed form is written once against this
  interface and evaluated on floats for a single call (no array creation or ufunc dispatch:
  a few µs instead of tens) and on arrays for a batch, with the same operations in the same
  order, hence the same IEEE results.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ARRAY_OPS", "FACE_MAX_K", "FLOAT_OPS", "PAIRS_3", "bordered_solve",
    "clean_simplex", "correlation_eigh", "face_constants", "face_systems", "factor", "normalised",
    "answer", "checked_rows", "checked_stack", "psd_part", "stack_of", "triangle_systems",
]


class _FloatOps:
    """Scalar twins of ``np.where``, ``np.maximum``, ``np.clip``, ``np.sqrt``, ``np.divide``,
    ``np.logical_not`` and ``np.sign`` with NumPy's IEEE results (NaN propagates; x/0 is ±inf or NaN)."""

    @staticmethod
    def where(cond: bool, a: float, b: float) -> float:
        return a if cond else b

    @staticmethod
    def maximum(a: float, b: float) -> float:
        return a if (a >= b or a != a) else b

    @staticmethod
    def clip(x: float, low: float, high: float) -> float:
        if x != x:
            return x
        return low if x < low else (high if x > high else x)

    @staticmethod
    def sqrt(x: float) -> float:
        return math.sqrt(x) if x >= 0.0 else math.nan

    @staticmethod
    def div(a: float, b: float) -> float:
        if b != 0.0:
            return a / b
        if a == 0.0 or a != a or b != b:
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)

    @staticmethod
    def not_(x: bool) -> bool:
        return not x

    @staticmethod
    def sign(x: float) -> float:
        if x != x:
            return x
        return 1.0 if x > 0.0 else (-1.0 if x < 0.0 else 0.0)


class _ArrayOps:
    """The NumPy functions behind :data:`FLOAT_OPS` (call them under ``np.errstate(all="ignore")``)."""

    where = staticmethod(np.where)
    maximum = staticmethod(np.maximum)
    clip = staticmethod(np.clip)
    sqrt = staticmethod(np.sqrt)
    div = staticmethod(np.divide)
    not_ = staticmethod(np.logical_not)
    sign = staticmethod(np.sign)


FLOAT_OPS: Any = _FloatOps()
ARRAY_OPS: Any = _ArrayOps()


def correlation_eigh(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def psd_part(A: np.ndarray) -> np.ndarray:
    """A positive semi-definite matrix equal to ``A`` up to ``A``'s own rounding.

    A Gramian computed in float32 (or of rank below K) can have eigenvalues slightly below zero;
    the min-norm and conflict-averse problems are only convex on a PSD Gramian. The negative
    eigenvalues of the correlation matrix (see :func:`correlation_eigh`) are set to zero, which
    changes each entry by a relative amount of the order of ``C``'s most negative eigenvalue
    (tiny rows keep their digits). Returned unchanged when already PSD.
    """
    d, lam, V = correlation_eigh(A)  # PSD exactly when A is (a congruence)
    if lam.min() >= 0.0:
        return A
    C = (V * np.clip(lam, 0.0, None)) @ V.T
    return C * d[:, None] * d[None, :]


def factor(A: np.ndarray) -> np.ndarray:
    """``R`` with ``RᵀR = A`` (A PSD), from the correlation eigendecomposition (rounding stays
    relative to each row's size); negative rounding clipped."""
    d, lam, V = correlation_eigh(A)
    return (np.sqrt(np.clip(lam, 0.0, None))[:, None] * V.T) * d[None, :]


def bordered_solve(A_SS: np.ndarray, rhs_top: np.ndarray, rhs_bottom: float) -> np.ndarray:
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


def clean_simplex(alpha: np.ndarray) -> np.ndarray:
    alpha = np.clip(alpha, 0.0, None)
    total = alpha.sum()
    return alpha / total


def normalised(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.max(np.diagonal(M, axis1=1, axis2=2), axis=1)
    safe = np.where(scale > 0, scale, 1.0)
    return M / safe[:, None, None], scale


PAIRS_3 = ((0, 1), (0, 2), (1, 2))


def triangle_systems(A: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
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


FACE_MAX_K = 5  # 2^K − 1 faces; beyond K = 5 the enumeration outgrows the general solvers


_FACE_CONSTANTS: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def face_constants(K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def face_systems(A: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
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
    mask, pair, base = face_constants(K)
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


def stack_of(M: Tensor | np.ndarray, who: str) -> tuple[np.ndarray, bool, bool]:
    """``(stack, batched, tensor)``: ``M`` (K, K) or (B, K, K) as a float64 array (B, K, K)
    without a copy where possible, shape-checked only (:func:`checked_rows` or
    :func:`checked_stack` check the values once, on the path that runs); ``tensor`` says
    whether ``M`` was a torch tensor (the entry points answer in the type they were given)."""
    tensor = isinstance(M, Tensor)
    if tensor:
        arr = M.detach()
        if arr.dtype != torch.float64 or arr.device.type != "cpu":
            arr = arr.to(device="cpu", dtype=torch.float64)
        arr = arr.numpy()
    else:
        arr = np.asarray(M, dtype=np.float64)
    if arr.ndim == 2:
        arr, batched = arr[None], False
    elif arr.ndim == 3:
        batched = True
    else:
        raise ValueError(f"{who}: expected a Gramian (K, K) or a batch (B, K, K), got shape {arr.shape}")
    if arr.shape[1] != arr.shape[2] or arr.shape[1] == 0 or arr.shape[0] == 0:
        raise ValueError(f"{who}: Gramians must be square with K ≥ 1 (and B ≥ 1), got shape {arr.shape}")
    return arr, batched, tensor


def checked_stack(M: np.ndarray, who: str) -> np.ndarray:
    """The stack ``M`` (B, K, K) checked finite and symmetrised (``(M + Mᵀ)/2``)."""
    if not np.isfinite(M).all():
        raise ValueError(f"{who}: the Gramian is not finite (NaN or inf entries)")
    return 0.5 * (M + M.transpose(0, 2, 1))


def checked_rows(M: np.ndarray, who: str) -> list[list[float]]:
    """One Gramian ``M`` (K, K) as nested Python lists, checked finite and symmetrised: the
    single-call form of :func:`checked_stack` (a few µs at K ≤ 8 instead of tens)."""
    rows = M.tolist()
    for row in rows:
        if not all(map(math.isfinite, row)):
            raise ValueError(f"{who}: the Gramian is not finite (NaN or inf entries)")
    K = len(rows)
    return [[(rows[i][j] + rows[j][i]) * 0.5 for j in range(K)] for i in range(K)]


def answer(out: np.ndarray, batched: bool, tensor: bool) -> Any:
    """A solver's float64 result in the form its input had: a batch or one entry, a torch
    tensor or a NumPy array."""
    out = out if batched else out[0]
    return torch.from_numpy(np.ascontiguousarray(out)) if tensor else out
