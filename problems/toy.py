"""The two-task toy of CAGrad (Liu et al., NeurIPS 2021) and Nash-MTL (Navon et al., ICML 2022).

With ``t = tanh(x₂/2)``, ``c₁ = max(t, 0)``, ``c₂ = max(-t, 0)`` and ``ℓ = 5·10⁻⁶``::

    a₁ = ½(−x₁ − 7) − tanh(−x₂)        a₂ = ½(−x₁ + 3) + tanh(−x₂) + 2
    L_i = log(max(|a_i|, ℓ)) + 6
    Q₁ = ((x₁ − 7)² + 0.1 (x₂ + 8)²)/10 − 20    Q₂ = ((x₁ + 7)² + 0.1 (x₂ + 8)²)/10 − 20
    f₁ = s · (c₁ L₁ + c₂ Q₁)            f₂ = c₁ L₂ + c₂ Q₂

This is the toy as the authors' code defines it (and as it drew the papers' figures); the CAGrad
paper prints ``− tanh(−x₂)`` in ``f₂``, a sign typo. ``s = first_loss_scale`` is the Nash-MTL
variant (``s = 0.1``, the default here) that makes the first task's gradient ten times smaller;
``s = 1`` is CAGrad's original.

Pareto set: for ``x₂ < 0`` only the quadratic branch is active, ``f_i = c₂(x₂)·Q_i``; the set of
Pareto-stationary points is the arc ``x₁ ∈ [−7, 7]`` with ``x₂(x₁)`` the root of
``det J(x) = 0`` in ``[−9.5, −7]``: ``x₂ ≈ −8.3552`` at ``x₁ = 0``, bending to ``≈ −8.43`` at
``x₁ = ±7``. :meth:`Toy.pareto_set` finds it by bisection.

Published protocol (Nash-MTL, ``experiments/toy``): starts ``(−8.5, 7.5), (0, 0), (9, 9),
(−7.5, −0.5), (9, −1)``; Adam with ``lr = 1e-3``; 35 000 steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_opt.problems.base import ParetoProblem, _check_x

__all__ = ["Toy", "NASH_TOY_STARTS"]

_LOWER = 5e-6

NASH_TOY_STARTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (0.0, 0.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)


class Toy(ParetoProblem):
    """The CAGrad / Nash-MTL two-task toy in two variables (no bounds).

    Args:
        first_loss_scale: ``s``, the factor on ``f₁`` (0.1: Nash-MTL's variant; 1: CAGrad's).
    """

    name = "toy"
    n_tasks = 2
    dim = 2
    bounds = None

    def __init__(self, first_loss_scale: float = 0.1) -> None:
        if isinstance(first_loss_scale, bool) or not isinstance(first_loss_scale, (int, float)):
            raise TypeError(f"toy: first_loss_scale must be a number, got {first_loss_scale!r}")
        if not (first_loss_scale > 0 and first_loss_scale < float("inf")):
            raise ValueError(f"toy: first_loss_scale must be > 0 and finite, got {first_loss_scale!r}")
        self.first_loss_scale = float(first_loss_scale)

    def options(self) -> dict[str, Any]:
        return {"first_loss_scale": self.first_loss_scale}

    def loss_floor(self) -> Tensor:
        """``(−21 s, −21)``: ``f_i ≥ −20`` (``c L ≥ log(5·10⁻⁶) + 6 > −7``, ``c Q ≥ −20``) scaled
        like ``f_i``, one unit below."""
        return torch.tensor([-21.0 * self.first_loss_scale, -21.0], dtype=torch.float64)

    def losses(self, x: Tensor) -> Tensor:
        _check_x(x, 2, self.name)
        x1, x2 = x[..., 0], x[..., 1]
        th = torch.tanh(x2)
        L1 = torch.clamp((0.5 * (-x1 - 7) + th).abs(), _LOWER).log() + 6
        L2 = torch.clamp((0.5 * (-x1 + 3) - th + 2).abs(), _LOWER).log() + 6
        t = torch.tanh(0.5 * x2)
        c1 = torch.clamp(t, 0)
        c2 = torch.clamp(-t, 0)
        q = 0.1 * (x2 + 8) ** 2
        Q1 = ((x1 - 7) ** 2 + q) / 10 - 20
        Q2 = ((x1 + 7) ** 2 + q) / 10 - 20
        f1 = self.first_loss_scale * (c1 * L1 + c2 * Q1)
        f2 = c1 * L2 + c2 * Q2
        return torch.stack([f1, f2], dim=-1)

    def losses_and_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Closed form of the losses and their gradients (checked against autograd in tests).

        Both tasks are computed together on a trailing axis of length 2 (signs ``σ = (+1, −1)``
        and offsets ``(−3.5, 3.5)``, ``(7, −7)``). On the CPU the arithmetic runs in NumPy on
        the tensor's memory (no copies): for a toy of a few dozen runs the cost of a step is the
        per-operation overhead, which NumPy's is a fraction of."""
        _check_x(x, 2, self.name)
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            F, J = self._closed_form(x.detach().numpy(), np, np.tanh, np.log, np.maximum)
            return torch.from_numpy(F), torch.from_numpy(J)
        return self._closed_form(x, torch, torch.tanh, torch.log, torch.clamp)

    def _closed_form(self, x: Any, xp: Any, tanh: Any, log: Any, lower: Any) -> tuple[Any, Any]:
        if xp is np:
            sign, off_a, off_q, scale = self._np_consts(x.dtype)
        else:
            sign, off_a, off_q, scale = self._consts(x)
        x1 = x[..., 0:1]
        x2 = x[..., 1:2]
        th = tanh(x2)
        t = tanh(0.5 * x2)
        a = off_a - 0.5 * x1 + sign * th                      # (..., 2)
        m = abs(a)
        L = log(lower(m, _LOWER)) + 6
        keep = m >= _LOWER
        r = keep / xp.where(keep, a, 1.0)                     # d log|a| / da, 0 where clamped
        dt = 0.5 - 0.5 * t * t
        c1 = lower(t, 0.0)
        c2 = lower(-t, 0.0)
        dc1 = (t >= 0) * dt
        dc2 = (t <= 0) * -dt
        u = x1 - off_q
        w = x2 + 8
        Q = (u * u + 0.1 * w * w) / 10 - 20
        F = scale * (c1 * L + c2 * Q)
        g1 = scale * (c2 * 0.2 * u - 0.5 * c1 * r)
        g2 = scale * (c1 * (1 - th * th) * sign * r + L * dc1 + 0.02 * w * c2 + Q * dc2)
        if xp is np:
            J = np.empty(g1.shape + (2,), dtype=g1.dtype)
            J[..., 0] = g1
            J[..., 1] = g2
            return F, J
        return F, torch.stack([g1, g2], -1)

    def _np_consts(self, dtype: Any) -> tuple[np.ndarray, ...]:
        cache = getattr(self, "_np_const_cache", None)
        if cache is None or cache[0] != dtype:
            mk = lambda v: np.array(v, dtype=dtype)  # noqa: E731
            cache = (dtype, mk([1.0, -1.0]), mk([-3.5, 3.5]), mk([7.0, -7.0]), mk([self.first_loss_scale, 1.0]))
            self._np_const_cache = cache
        return cache[1:]

    def _consts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cache = getattr(self, "_const_cache", None)
        key = (x.dtype, x.device)
        if cache is None or cache[0] != key:
            mk = lambda v: torch.tensor(v, dtype=x.dtype, device=x.device)  # noqa: E731
            cache = (key, mk([1.0, -1.0]), mk([-3.5, 3.5]), mk([7.0, -7.0]), mk([self.first_loss_scale, 1.0]))
            self._const_cache = cache
        return cache[1:]

    def protocol_starts(self) -> Tensor:
        return torch.tensor(NASH_TOY_STARTS, dtype=torch.float64)

    def initial_points(self, n: int = 5, *, seed: int = 0) -> Tensor:
        """The five published starts when ``n == 5`` and ``seed == 0``; otherwise uniform draws
        in ``[−10, 10]²`` (the published plots' window)."""
        if n < 1:
            raise ValueError(f"toy: the number of initial points must be >= 1, got {n}")
        if n == len(NASH_TOY_STARTS) and seed == 0:
            return self.protocol_starts()
        g = torch.Generator().manual_seed(int(seed))
        return 20 * torch.rand((n, 2), generator=g, dtype=torch.float64) - 10

    def pareto_set(self, n: int = 100) -> Tensor:
        """``n`` points of the Pareto-stationary arc, ``x₁`` evenly spaced in ``[−7, 7]``.

        For ``x₂ < 0``, ``det J = (∂₁f₁ ∂₂f₂ − ∂₂f₁ ∂₁f₂)`` vanishes on the arc; it is found by
        bisection on ``x₂ ∈ [−9.5, −7]`` (80 halvings: machine precision)."""
        x1 = torch.linspace(-7.0, 7.0, int(n), dtype=torch.float64)
        lo = torch.full_like(x1, -9.5)
        hi = torch.full_like(x1, -7.0)

        def det(x2: Tensor) -> Tensor:
            _, J = self.losses_and_jacobian(torch.stack([x1, x2], -1))
            return J[..., 0, 0] * J[..., 1, 1] - J[..., 0, 1] * J[..., 1, 0]

        d_lo = det(lo)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            d_mid = det(mid)
            same = torch.sign(d_mid) == torch.sign(d_lo)
            lo = torch.where(same, mid, lo)
            d_lo = torch.where(same, d_mid, d_lo)
            hi = torch.where(same, hi, mid)
        return torch.stack([x1, 0.5 * (lo + hi)], -1)

    def pareto_front(self, n: int = 100) -> Tensor:
        return self.losses(self.pareto_set(n))
