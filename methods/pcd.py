"""PCD: priority-constrained descent (Varam & AlHajri, TMLR 2026)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from operator import mul
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.aggregator import GramianAggregator
from mtl_opt.solvers._linalg import ARRAY_OPS, FLOAT_OPS
from mtl_opt.methods._state import checked_counter, checked_state, checked_tensor, clone_or_none
from mtl_opt.registry import register_aggregator

_KEYS = ("step", "sq_norm_ema", "batch_step", "batch_sq_norm_ema")
#: Relative tolerance of the KKT tests (independence, multiplier signs, constraint slacks).
_KKT_TOL = 1e-9
#: A direction with ‖d̃‖² below this fraction of its terms' squared size is zero up to rounding.
_ZERO_DIRECTION_RTOL = 1e-10
_TINY = float(np.finfo(np.float64).tiny)


@register_aggregator("pcd")
class PCD(GramianAggregator):
    """PCD (Varam & AlHajri): the primary task's gradient, minimally bent for the secondaries.

    "Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
    Multi-Objective Optimization", TMLR 2026, arXiv 2606.29521 (Def. 4.1, Thm. 4.2, Def. 4.5,
    Algorithm 1; defaults ``τ = 0.02``, ``β = 0.999``, ``ε = 1e-8`` of the authors' package).
    Task 1 (the first row) is the primary objective, tasks 2..K the secondaries.

    Scale normalisation (Def. 4.5), an Adam-like bias-corrected moving average per task, at call
    ``t``::

        v_i ← β v_i + (1 − β) ‖g_i‖²,   v̂_i = v_i / (1 − β^t),   s_i = 1/√(v̂_i + ε),   g̃_i = s_i g_i

    The direction (Def. 4.1) is the projection of the primary gradient onto the directions that
    give every secondary a share ``τ`` of the progress of its own normalised gradient::

        d̃ = argmin_d ½‖d − g̃_1‖²   s.t.   g̃_jᵀ d ≥ τ ‖g̃_j‖²,  j = 2..K

    By the KKT conditions (Thm. 4.2) ``d̃ = g̃_1 + Σ_j μ_j g̃_j`` with ``μ ≥ 0``, the solution of the
    linear complementarity problem (in Gramian terms, ``A = Ã[2:, 2:]``, ``b_j = τ Ã_jj − Ã_j1``,
    ``Ã = diag(s) M diag(s)``)::

        A μ − b ≥ 0,   μ ≥ 0,   μᵀ(A μ − b) = 0

    solved exactly by enumerating working sets of linearly independent constraints (App. B.2):
    the first set whose multipliers are non-negative and whose direction satisfies every
    constraint is the optimum (any KKT point of this convex problem is). ``g̃_1`` feasible gives
    ``μ = 0``. Finally (Algorithm 1) the direction is rescaled to the primary gradient's norm,
    ``d = d̃ ‖g_1‖/‖d̃‖``, so ``β = (1, μ) ∘ s · ‖g_1‖/‖d̃‖``.

    Edge cases (Algorithm 1): ``g_1 = 0`` gives ``d = 0`` (the moving average still advances);
    ``d̃ = 0`` up to rounding gives ``d = 0``; constraints that no direction satisfies together
    (possible for ``K ≥ 3``, e.g. two opposite secondaries) are dropped for that call: ``d = g_1``.
    ``K = 1``: ``d = g_1``.

    Stateful (the moving average): ``state_dict`` holds the call counter and ``v`` of single
    calls and, separately, of batched calls (one ``v`` per batch entry).

    Args:
        tau: ``τ ∈ [0, 1]``: one number, or one per secondary task (K − 1 numbers).
        beta: ``β ∈ [0, 1)``, the decay of the moving average.
        eps: ``ε ≥ 0`` of the normalisation.
    """

    state = "tracked"

    def __init__(self, tau: float | Sequence[float] = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        owner = "PCD"
        if isinstance(tau, (list, tuple)):
            if not tau:
                raise ValueError("PCD: tau must be a number or a non-empty list, got []")
            tau = [check_range(f"tau[{j}]", v, low=0.0, high=1.0, owner=owner) for j, v in enumerate(tau)]
        else:
            tau = check_range("tau", tau, low=0.0, high=1.0, owner=owner)
        self.tau = tau
        self.beta = check_range("beta", beta, low=0.0, high=1.0, high_inclusive=False, owner=owner)
        self.eps = check_range("eps", eps, low=0.0, owner=owner)
        self.reset()

    # ---------------------------------------------------------------------------- state
    def reset(self) -> None:
        self._step = 0
        self._v: Tensor | None = None  # (1, K)
        self._batch_step = 0
        self._batch_v: Tensor | None = None  # (B, K)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "sq_norm_ema": clone_or_none(self._v),
            "batch_step": self._batch_step,
            "batch_sq_norm_ema": clone_or_none(self._batch_v),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checked_state("PCD", state, _KEYS)
        step = checked_counter("PCD", "step", state["step"])
        batch_step = checked_counter("PCD", "batch_step", state["batch_step"])
        v = checked_tensor("PCD", "sq_norm_ema", state["sq_norm_ema"], ndim=2)
        batch_v = checked_tensor("PCD", "batch_sq_norm_ema", state["batch_sq_norm_ema"], ndim=2)
        self._step, self._v = step, None if v is None else v.double()
        self._batch_step, self._batch_v = batch_step, None if batch_v is None else batch_v.double()

    # ---------------------------------------------------------------------------- weights
    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        beta, self._v = self._advance(M[None], self._v, self._step + 1)
        self._step += 1
        return beta[0]

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        beta, self._batch_v = self._advance(M, self._batch_v, self._batch_step + 1)
        self._batch_step += 1
        return beta

    def _taus(self, K: int) -> list[float]:
        if isinstance(self.tau, list):
            if len(self.tau) != K - 1:
                raise ValueError(
                    f"PCD has {len(self.tau)} tau values but there are {K - 1} secondary tasks (K = {K})"
                )
            return [float(x) for x in self.tau]
        return [float(self.tau)] * (K - 1)

    def _advance(self, M: Tensor, v: Tensor | None, t: int) -> tuple[Tensor, Tensor]:
        """Weights for Gramians (B, K, K) and the new moving average (B, K)."""
        B, K = M.shape[0], M.shape[1]
        if v is not None and v.shape != (B, K):
            raise ValueError(
                f"PCD keeps a moving average of shape {tuple(v.shape)} and now gets {(B, K)} "
                "(batch entries, tasks); call reset() between runs"
            )
        taus = self._taus(K)
        if B == 1:  # one call: the same formulas on Python floats
            rows = M[0].tolist()
            sq = [FLOAT_OPS.maximum(rows[i][i], 0.0) for i in range(K)]
            v_cols, s = self._scales(sq, None if v is None else v.tolist()[0], t, FLOAT_OPS)
            if K == 2:
                beta = list(pcd_two(rows[0][0], rows[0][1], rows[1][1], s[0], s[1], taus[0], FLOAT_OPS))
            else:
                beta = _pcd_weights(rows, s, taus)
            return torch.tensor([beta], dtype=torch.float64), torch.tensor([v_cols], dtype=torch.float64)
        Mn = M.numpy()
        sq = np.maximum(np.diagonal(Mn, axis1=1, axis2=2), 0.0)
        with np.errstate(all="ignore"):
            v_cols, s_cols = self._scales(list(sq.T), None if v is None else list(v.numpy().T), t, ARRAY_OPS)
            v_new = torch.from_numpy(np.stack(v_cols, axis=1))
            if K == 2:
                b1, b2 = pcd_two(Mn[:, 0, 0], Mn[:, 0, 1], Mn[:, 1, 1], *s_cols, taus[0], ARRAY_OPS)
                return torch.from_numpy(np.stack([b1, b2], axis=1)), v_new
        sn = np.stack(s_cols, axis=1)
        out = np.zeros((B, K))
        for b in range(B):
            out[b] = _pcd_weights(Mn[b].tolist(), sn[b].tolist(), taus)
        return torch.from_numpy(out), v_new

    def _scales(self, sq, v, t, xp):  # type: ignore[no-untyped-def]
        """Def. 4.5 over the K per-task columns (floats, or (B,) arrays): the new moving
        averages ``v_i`` of ``‖g_i‖²`` and the scales ``s_i = 1/√(v̂_i + ε)`` (0 where that is 0)."""
        beta = self.beta
        v_new = [(1.0 - beta) * q for q in sq] if v is None else [beta * vi + (1.0 - beta) * q for vi, q in zip(v, sq)]
        correction = 1.0 - beta**t
        scales = []
        for vi in v_new:
            denom = xp.sqrt(vi / correction + self.eps)
            scales.append(xp.where(denom > 0, 1.0 / xp.where(denom > 0, denom, 1.0), 0.0))
        return v_new, scales


def _pcd_weights(M: list[list[float]], s: list[float], taus: list[float]) -> list[float]:
    """``β`` of one call: the QP on ``Ã = diag(s) M diag(s)``, mapped back and rescaled; on
    Python floats (one problem of K ≤ 8 costs a few µs there, tens to hundreds in NumPy)."""
    K = len(M)
    beta = [0.0] * K
    if not M[0][0] > 0.0:  # g_1 = 0: the update halts
        return beta
    A_full = [[M[i][j] * (s[i] * s[j]) for j in range(K)] for i in range(K)]
    w = [1.0] + [0.0] * (K - 1)
    if K > 1:
        mu = solve_priority_qp(A_full, taus)
        if mu is not None:  # None: the constraints are infeasible together; d̃ = g̃_1
            w[1:] = mu
    coef = [wi * si for wi, si in zip(w, s)]
    sq = sum(ci * sum(map(mul, row, coef)) for ci, row in zip(coef, M))
    size = sum(abs(c) * math.sqrt(max(M[i][i], 0.0)) for i, c in enumerate(coef)) ** 2
    if not sq > _ZERO_DIRECTION_RTOL * size:
        return beta
    factor = math.sqrt(M[0][0] / sq)
    return [c * factor for c in coef]


def pcd_two(m11, m12, m22, s1, s2, tau, xp):  # type: ignore[no-untyped-def]
    """:func:`_pcd_weights` at K = 2, on floats (``xp = FLOAT_OPS``) or (B,) arrays
    (``xp = ARRAY_OPS``): the closed form of Cor. 4.6, ``μ = max(0, τ Ã_22 − Ã_21) / Ã_22``
    (0 when ``g_2 = 0``; never infeasible), then the same rescaling and zero tests."""
    a22, a21 = m22 * (s2 * s2), m12 * (s2 * s1)
    live = a22 > 0
    mu = xp.where(live, xp.maximum(tau * a22 - a21, 0.0) / xp.where(live, a22, 1.0), 0.0)
    c1, c2 = s1, mu * s2
    sq = c1 * (m11 * c1 + m12 * c2) + c2 * (m12 * c1 + m22 * c2)
    size = (abs(c1) * xp.sqrt(xp.maximum(m11, 0.0)) + abs(c2) * xp.sqrt(xp.maximum(m22, 0.0))) ** 2
    ok = (m11 > 0) & (sq > _ZERO_DIRECTION_RTOL * size)
    factor = xp.where(ok, xp.sqrt(xp.where(ok, m11 / xp.where(ok, sq, 1.0), 0.0)), 0.0)
    return c1 * factor, c2 * factor


def solve_priority_qp(A_full: list[list[float]], taus: list[float]) -> list[float] | None:
    """The multipliers ``μ`` (K − 1,) of ``min ½‖d − a_1‖² s.t. a_jᵀd ≥ τ_j ‖a_j‖²`` for rows
    ``a_i`` with Gramian ``A_full`` (nested lists), or ``None`` when no ``d`` satisfies every
    constraint. The common cases (none or one active constraint) run on floats; larger working
    sets in NumPy."""
    m = len(A_full) - 1
    A = [row[1:] for row in A_full[1:]]
    b = [taus[j] * A[j][j] - A_full[j + 1][0] for j in range(m)]
    mu = [0.0] * m
    if all(x <= 0.0 for x in b):  # the primary gradient already satisfies every constraint
        return mu
    atol = _KKT_TOL * max(max(A_full[i][i] for i in range(m + 1)), _TINY)
    candidates = [j for j in range(m) if A[j][j] > 0.0]  # a zero secondary's constraint is 0 ≥ 0
    for j in candidates:  # one active constraint (the common case): μ_j = b_j / A_jj, no solve
        mu_j = b[j] / A[j][j]
        if mu_j >= 0.0 and all(A[i][j] * mu_j - b[i] >= -atol for i in range(m)):
            mu[j] = mu_j
            return mu
    # Two or more active constraints: every working set of one size at once (batched NumPy
    # calls instead of a few per set); the first set, in enumeration order, that passes wins.
    An, bn = np.array(A), np.array(b)
    for size in range(2, len(candidates) + 1):
        sets = np.array(list(itertools.combinations(candidates, size)))  # (n, size)
        A_SS = An[sets[:, :, None], sets[:, None, :]]
        norms = np.sqrt(np.diagonal(A_SS, axis1=1, axis2=2))
        # linearly dependent constraints: a smaller set covers this face
        independent = np.linalg.eigvalsh(A_SS / (norms[:, :, None] * norms[:, None, :]))[:, 0] > _KKT_TOL
        if not independent.any():
            continue
        sets, A_SS = sets[independent], A_SS[independent]
        mu_S = np.linalg.solve(A_SS, bn[sets][:, :, None])[:, :, 0]
        signs_ok = ~np.any(mu_S < -_KKT_TOL * np.maximum(1.0, np.abs(mu_S).max(axis=1, keepdims=True)), axis=1)
        mu_S = np.maximum(mu_S, 0.0)
        slack = np.einsum("ins,ns->ni", An[:, sets], mu_S) - bn
        ok = signs_ok & np.all(slack >= -atol, axis=1)
        if ok.any():
            first = int(np.argmax(ok))
            for j, x in zip(sets[first].tolist(), mu_S[first].tolist()):
                mu[j] = x
            return mu
    return None
