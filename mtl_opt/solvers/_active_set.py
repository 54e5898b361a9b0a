"""Active-set solvers of the two simplex problems for ONE small Gramian, on Python floats.

The batched NumPy solvers of :mod:`mtl_opt.solvers.min_norm` and :mod:`mtl_opt.solvers.cagrad_dual` enumerate every face of the simplex (K ≤ 5)
or search a root with NNLS sub-problems (K ≥ 6). On a single K × K problem that costs
0.1–0.5 ms, almost all of it array creation and ufunc dispatch: 15–20 % of a whole aggregation
at K = 4, d = 10⁶ on one CPU thread. Here the same problems are solved by a primal active-set method
(Wolfe 1976, "Finding the nearest point in a polytope") written on Python floats, and the answer
is accepted only on the certificates of :mod:`mtl_opt.solvers.min_norm` and :mod:`mtl_opt.solvers.cagrad_dual`, evaluated here too:

* **Min-norm point** ``min_{α∈Δ} αᵀAα`` (MGDA). Wolfe's method: start at the vertex of smallest
  norm; a *major* step adds the vertex ``j`` of least ``(Aα)_j`` while ``(Aα)_j < αᵀAα`` (a
  descent direction ``e_j − α``); *minor* steps move toward the affine minimiser ``y`` of the
  current support ``S`` (the bordered system ``[[A_SS, 1], [1ᵀ, 0]] [y; ν] = [0; 1]``), stopping
  at the boundary of the simplex and dropping the coordinates that reach zero, until ``y > 0``.
  Accepted on the KKT test ``min_i (Aα)_i ≥ αᵀAα − 1e-10`` (objective gap ≤ 2e-10, relative to
  ``max_i A_ii``).
* **Conflict-averse weights** ``min_{w∈Δ} F(w) = wᵀb + s√(wᵀAw)`` (CAGrad, CAME-Grad's
  rectification). The same active-set scheme on the convex ``F``, whose gradient is
  ``∇F = b + s·Aw/r`` (``r = √(wᵀAw) > 0``). On the affine hull of a support ``S`` the minimiser is
  closed form (see :mod:`mtl_opt.solvers.cagrad_dual`): ``w = a + t e`` with ``a``, ``e`` from the bordered
  system for the right-hand sides ``(0, 1)`` and ``(−b_S, 0)``, ``m² = aᵀAa``, ``κ² = eᵀAe``,
  ``t = m/√(s² − κ²)``; when ``s ≤ κ``, ``F`` decreases without bound along ``+e`` and the minor
  step follows that ray to the boundary. Accepted on the primal/dual certificate
  (:func:`mtl_opt.solvers.cagrad_dual._ca_certificate`, evaluated on floats).

Both first try the interior of the whole simplex (one bordered solve: the optimum of a training
step is often interior), and run the active set only when that point is not a certified optimum.
Both methods decrease the objective strictly at every step and never revisit a support, so they
stop after finitely many steps (a cap guards against rounding cycles). Whatever they return is
certified; when a certificate fails, a bordered system is singular (affinely dependent rows, to
rounding), the min-norm weights are not unique (a vertex off the support ties), or
the conflict-averse optimum sits at the origin of the hull (the non-smooth case that needs a cone
projection), the functions return ``None`` and the caller uses the batched solver, which handles
every case. Work in normalised units ``A = M / max_i M_ii``; each bordered block is divided by its
largest diagonal entry, as in the batched face systems.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from operator import mul

from mtl_opt.solvers._precision import EPS as _EPS, KKT_RTOL as _KKT_RTOL, zero_norm_rtol

__all__ = ["ACTIVE_SET_MAX_K", "conflict_averse_floats", "min_norm_floats"]

#: Largest K solved on floats: a bordered solve costs O(K³) interpreted operations, and beyond
#: about 8 tasks the batched NumPy solvers are as fast.
ACTIVE_SET_MAX_K = 8

# Stationarity slack inside the iterations (normalised units): a vertex enters the support only
# when it improves the objective by more than rounding.
_STEP_TOL = 64.0 * _EPS
# Smallest pivot accepted in a bordered solve (its entries are at most 1 in size).
_PIVOT_TOL = 1e-13


def min_norm_floats(M: list[list[float]]) -> list[float] | None:
    """Certified ``α* = argmin_{α∈Δ} αᵀMα`` for a symmetric K × K Gramian given as nested lists.

    Returns ``α*`` (a point of the simplex) or ``None`` when the active set could not certify its
    answer (the caller then uses the batched solver of :func:`mtl_opt.solvers.min_norm_weights`). All-zero Gramians get
    the uniform weights, as in the batched solver.
    """
    K = len(M)
    scale = max(M[i][i] for i in range(K))
    if not scale > 0.0:
        return [1.0 / K] * K if scale == 0.0 else None
    A = _scaled(M, 1.0 / scale)
    interior = _bordered_solve(A, list(range(K)), None)  # the optimum is often interior
    if interior is not None and min(interior[0]) > 0.0:
        alpha = _min_norm_certified(A, interior[0])
        if alpha is not None:
            return alpha
    alpha = _wolfe(A, K)
    return None if alpha is None else _min_norm_certified(A, alpha)


def conflict_averse_floats(M: list[list[float]], c: float) -> tuple[list[float], list[float]] | None:
    """Certified ``(w*, γ)`` of the conflict-averse problem for one K × K Gramian (nested lists).

    ``w* = argmin_{w∈Δ} wᵀM1/K + c‖g0‖√(wᵀMw)`` and ``γ = 1/K + (c‖g0‖/‖g_w*‖) w*`` (the row
    coefficients of CAGrad's direction on the mean scale), as
    :func:`mtl_opt.solvers.conflict_averse` returns them. ``c‖g0‖ = 0`` gives the best
    vertex and ``γ = 1/K``. ``None`` when the answer could not be certified or the optimum is at
    the origin of the hull (the caller then uses the batched solver).
    """
    K = len(M)
    scale = max(M[i][i] for i in range(K))
    if not scale > 0.0:
        return None
    A = _scaled(M, 1.0 / scale)
    b = [sum(row) / K for row in A]
    s = c * math.sqrt(max(sum(b) / K, 0.0))
    if not s > 0.0:  # linear objective: the direction is g0 whatever the vertex
        j = min(range(K), key=b.__getitem__)
        w = [0.0] * K
        w[j] = 1.0
        return w, [1.0 / K] * K
    interior = _face_stationary_point(A, b, s, list(range(K)))  # often the optimum
    if interior is not None and min(interior) > 0.0:
        result = _ca_certified(A, b, s, interior, K)
        if result is not None:
            return result
    w = _conflict_averse_active_set(A, b, s, K)
    return None if w is None else _ca_certified(A, b, s, w, K)


def _matvec(A: list[list[float]], x: list[float]) -> list[float]:
    return [sum(map(mul, row, x)) for row in A]


def _min_norm_certified(A: list[list[float]], alpha: list[float]) -> list[float] | None:
    """``alpha`` projected onto Δ when it passes the KKT test ``min_i (Aα)_i ≥ αᵀAα − tol`` and
    is the only minimiser.

    The minimiser ``α`` (not the point ``αᵀG``) can be non-unique when a vertex off the support
    ties with it (``(Aα)_j = αᵀAα``: duplicate or affinely dependent rows, the origin in the
    hull). Methods that apply ``α`` to other rows than those of ``A`` (MGDA with a
    normalisation) would then depend on which minimiser a solver picks, so such cases go to the
    batched solver, which every call path shares.
    """
    alpha = _on_simplex(alpha)
    if alpha is None:
        return None
    grad = _matvec(A, alpha)
    value = sum(map(mul, alpha, grad))
    if min(grad) < value - _KKT_RTOL:
        return None
    ties = sum(1 for g in grad if g <= value + _KKT_RTOL)
    if ties > sum(1 for a in alpha if a > 0.0):
        return None
    return alpha


def _ca_certified(
    A: list[list[float]], b: list[float], s: float, w: list[float], K: int
) -> tuple[list[float], list[float]] | None:
    """``(w, γ)`` for ``w`` projected onto Δ when it passes the primal/dual certificate."""
    w = _on_simplex(w)
    if w is None:
        return None
    r = _ca_certified_radius(A, b, s, w, K)
    if r is None:
        return None
    factor = s / r
    return w, [1.0 / K + factor * wk for wk in w]


def _face_stationary_point(
    A: list[list[float]], b: list[float], s: float, S: list[int]
) -> list[float] | None:
    """The minimiser ``a + t e`` of ``F`` on the affine hull of ``S`` (values on ``S``), or
    ``None`` when there is none away from the origin."""
    step = _face_step(A, b, s, S)
    return None if step is None or step[1] else step[0]


def _face_step(
    A: list[list[float]], b: list[float], s: float, S: list[int]
) -> tuple[list[float], bool] | None:
    """Where the conflict-averse objective ``F`` goes on the affine hull of ``S``.

    ``(y, False)``: ``y = a + t e`` is its minimiser there (values on ``S``). ``(e, True)``: it
    has none because ``s ≤ κ``, and ``F`` decreases without bound along ``+e``. ``None``: the
    bordered system is singular, or the minimiser is at the origin (the non-smooth case).
    """
    sol = _bordered_solve(A, S, b)
    if sol is None:
        return None
    a, e = sol
    rows = [[A[i][j] for j in S] for i in S]
    msq = max(sum(map(mul, a, _matvec(rows, a))), 0.0)
    ksq = max(sum(map(mul, e, _matvec(rows, e))), 0.0)
    s2 = s * s
    if s2 <= ksq:
        return (e, True) if min(e) < 0.0 else None  # Σe = 0 and e ≥ 0 mean e = 0
    if not msq > zero_norm_rtol():
        return None
    t = math.sqrt(msq / (s2 - ksq))
    return [ap + t * ep for ap, ep in zip(a, e)], False


# ------------------------------------------------------------------------------------------------
# The two active-set methods
# ------------------------------------------------------------------------------------------------
def _wolfe(A: list[list[float]], K: int) -> list[float] | None:
    """Wolfe's min-norm-point method on the Gramian ``A`` (normalised units)."""

    def affine_minimiser(S: list[int]) -> tuple[list[float], bool] | None:
        sol = _bordered_solve(A, S, None)
        return None if sol is None else (sol[0], False)

    start = min(range(K), key=lambda i: A[i][i])
    return _active_set(K, start, lambda x: _matvec(A, x), affine_minimiser, _STEP_TOL)


def _conflict_averse_active_set(
    A: list[list[float]], b: list[float], s: float, K: int
) -> list[float] | None:
    """The active-set method on ``F(w) = wᵀb + s√(wᵀAw)`` (normalised units)."""

    def gradient(w: list[float]) -> list[float] | None:  # ∇F = b + s·Aw/r
        Aw = _matvec(A, w)
        r2 = sum(map(mul, w, Aw))
        if not r2 > zero_norm_rtol():
            return None  # at the origin of the hull: F is not differentiable there
        factor = s / math.sqrt(r2)
        return [bi + factor * awi for bi, awi in zip(b, Aw)]

    vertex_values = [b[i] + s * math.sqrt(max(A[i][i], 0.0)) for i in range(K)]
    start = min(range(K), key=vertex_values.__getitem__)
    return _active_set(
        K, start, gradient, lambda S: _face_step(A, b, s, S), _STEP_TOL * (1.0 + s)
    )


def _active_set(
    K: int,
    start: int,
    gradient: Callable[[list[float]], list[float] | None],
    face_step: Callable[[list[int]], tuple[list[float], bool] | None],
    tol: float,
) -> list[float] | None:
    """The primal active-set scheme shared by both problems, from the vertex ``start``.

    ``gradient(x)`` is the objective's gradient (``None``: not differentiable there);
    ``face_step(S)`` is where the objective goes on the affine hull of ``S`` (see
    :func:`_face_step`; ``None``: hand over). Major steps add the vertex of least gradient while it
    beats ``xᵀ∇`` by more than ``tol``; minor steps move to the face's minimiser, or toward it (or
    along the ray) until a coordinate reaches zero.
    """
    S = [start]
    x = [0.0] * K
    x[start] = 1.0
    for _ in range(8 * K + 8):
        grad = gradient(x)
        if grad is None:
            return None
        value = sum(map(mul, x, grad))
        j = min(range(K), key=grad.__getitem__)
        if grad[j] >= value - tol or j in S:
            return x
        S.append(j)
        for _minor in range(K + 1):
            step = face_step(S)
            if step is None:
                return None
            y, is_ray = step
            if is_ray:  # follow the ray to the boundary
                S = _step_along(x, S, y)
            elif min(y) > 0.0:
                for k, yk in zip(S, y):
                    x[k] = yk
                break
            else:
                S = _step_to_boundary(x, S, y)
        else:
            return None
    return None


def _step_to_boundary(x: list[float], S: list[int], y: list[float]) -> list[int]:
    """Move ``x`` (support ``S``) toward the point ``y`` (values on ``S``) until the first
    coordinate with ``y_k ≤ 0`` reaches zero; returns the support that is left."""
    theta, blocking = 1.0, -1
    for k, yk in zip(S, y):
        if yk <= 0.0:
            gap = x[k] - yk
            ratio = x[k] / gap if gap > 0.0 else 0.0
            if ratio < theta or blocking < 0:
                theta, blocking = min(ratio, theta), k
    for k, yk in zip(S, y):
        x[k] += theta * (yk - x[k])
    return _drop_zeros(x, S, blocking)


def _step_along(x: list[float], S: list[int], e: list[float]) -> list[int]:
    """Move ``x`` along the direction ``e`` (Σe = 0, values on ``S``) until a coordinate with
    ``e_k < 0`` reaches zero; returns the support that is left."""
    theta, blocking = math.inf, -1
    for k, ek in zip(S, e):
        if ek < 0.0 and x[k] / -ek < theta:
            theta, blocking = x[k] / -ek, k
    for k, ek in zip(S, e):
        x[k] += theta * ek
    return _drop_zeros(x, S, blocking)


def _drop_zeros(x: list[float], S: list[int], blocking: int) -> list[int]:
    """Set the coordinate that stopped the step (and any that rounding left at or below zero)
    to exactly zero and return the support that is left."""
    if blocking >= 0:
        x[blocking] = 0.0
    keep = []
    for k in S:
        if x[k] > 0.0:
            keep.append(k)
        else:
            x[k] = 0.0
    return keep


# ------------------------------------------------------------------------------------------------
# Linear algebra and certificates on floats
# ------------------------------------------------------------------------------------------------
def _scaled(M: list[list[float]], factor: float) -> list[list[float]]:
    return [[v * factor for v in row] for row in M]


def _bordered_solve(
    A: list[list[float]], S: list[int], b: list[float] | None
) -> tuple[list[float], list[float]] | None:
    """``[[A_SS/τ, 1], [1ᵀ, 0]] [x; ν] = [y; z]`` for ``(y, z) = (0, 1)`` and, when ``b`` is
    given, ``(−b_S/τ, 0)`` (``τ = max_{i∈S} A_ii``; the solutions do not depend on it).

    Gaussian elimination with partial pivoting on the ``(|S| + 1)``-square system, whose entries
    are at most 1 in size; ``None`` when a pivot is below ``1e-13`` (affinely dependent rows, to
    rounding) or the solution is not finite.
    """
    n = len(S)
    tau = max(A[i][i] for i in S)
    inv = 1.0 / tau if tau > 0.0 else 1.0
    rows = []
    for i in S:
        Ai = A[i]
        row = [Ai[j] * inv for j in S]
        row.append(1.0)
        row.append(0.0)
        row.append(-b[i] * inv if b is not None else 0.0)
        rows.append(row)
    last = [1.0] * n
    last.extend((0.0, 1.0, 0.0))
    rows.append(last)
    m = n + 1
    for col in range(m):
        piv = col
        best = abs(rows[col][col])
        for r in range(col + 1, m):
            v = abs(rows[r][col])
            if v > best:
                piv, best = r, v
        if not best > _PIVOT_TOL:
            return None  # (nearly) affinely dependent rows: the face's minimiser is not unique
        if piv != col:
            rows[col], rows[piv] = rows[piv], rows[col]
        prow = rows[col]
        p = prow[col]
        for r in range(col + 1, m):
            row = rows[r]
            f = row[col] / p
            if f != 0.0:
                for c in range(col + 1, m + 2):
                    row[c] -= f * prow[c]
    x1 = [0.0] * m
    x2 = [0.0] * m
    for col in range(m - 1, -1, -1):
        row = rows[col]
        acc1, acc2 = row[m], row[m + 1]
        for c in range(col + 1, m):
            acc1 -= row[c] * x1[c]
            acc2 -= row[c] * x2[c]
        x1[col] = acc1 / row[col]
        x2[col] = acc2 / row[col]
    a, e = x1[:n], x2[:n]
    if not all(map(math.isfinite, a)) or not all(map(math.isfinite, e)):
        return None
    return a, e


def _on_simplex(x: list[float]) -> list[float] | None:
    clipped = [v if v > 0.0 else 0.0 for v in x]
    total = sum(clipped)
    if not (total > 0.0 and math.isfinite(total)):
        return None
    return [v / total for v in clipped]


def _ca_certified_radius(
    A: list[list[float]], b: list[float], s: float, w: list[float], K: int
) -> float | None:
    """``r = √(wᵀAw)`` when ``w`` passes the primal/dual certificate of
    :func:`mtl_opt.solvers.cagrad_dual._ca_certificate` (same gap, same rounding allowance), else ``None``."""
    Aw = _matvec(A, w)
    r2 = sum(map(mul, w, Aw))
    if not r2 > zero_norm_rtol():
        return None
    r = math.sqrt(r2)
    factor = s / r
    gamma = [1.0 / K + factor * wk for wk in w]
    primal = min(_matvec(A, gamma))
    dual = sum(map(mul, w, b)) + s * r
    absw = [abs(v) for v in w]
    absAw = [sum(map(mul, map(abs, row), absw)) for row in A]
    q = max(absAw)
    rho = sum(map(mul, absw, absAw))
    allowance = 4.0 * K * _EPS * (1.0 + s * q / r + s * rho / r2)
    if dual - primal > _KKT_RTOL * (1.0 + s) + allowance:
        return None
    return r
