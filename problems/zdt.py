"""ZDT1, ZDT2 and ZDT3 (Zitzler, Deb & Thiele, Evolutionary Computation 8(2), 2000).

Two tasks over the box ``[0, 1]ⁿ`` (pymoo's default ``n = 30``), with
``g(x) = 1 + 9/(n−1) · Σ_{j≥2} x_j`` and ``f₁ = x₁``::

    ZDT1: f₂ = g (1 − √(x₁/g))
    ZDT2: f₂ = g (1 − (x₁/g)²)
    ZDT3: f₂ = g (1 − √(x₁/g) − (x₁/g) sin(10π x₁))

The Pareto set is ``x₂ = … = x_n = 0`` (``g = 1``) with ``x₁ ∈ [0, 1]`` (for ZDT3 only the
non-dominated pieces of that curve); values equal pymoo's ``ZDT1/2/3`` at the same points.

Bounds are kept by projection (a clamp after every step). ``∂f₂/∂x₁`` of ZDT1/ZDT3 is
``−½√(g/x₁)``, infinite at ``x₁ = 0``; the closed-form gradient evaluates it at
``max(x₁, 1e-12)`` so that runs reaching the corner keep finite gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtl_opt.problems.base import ParetoProblem, _check_x, curve_distance

__all__ = ["ZDT1", "ZDT2", "ZDT3"]

_X1_FLOOR = 1e-12

# The non-dominated x₁ intervals of ZDT3's front (as in pymoo's reference front).
ZDT3_REGIONS: tuple[tuple[float, float], ...] = (
    (0.0, 0.0830015349),
    (0.182228780, 0.2577623634),
    (0.4093136748, 0.4538821041),
    (0.6183967944, 0.6525117038),
    (0.8233317983, 0.8518328654),
)


class _ZDT(ParetoProblem):
    n_tasks = 2

    def __init__(self, n_var: int = 30) -> None:
        if isinstance(n_var, bool) or not isinstance(n_var, int):
            raise TypeError(f"{self.name}: n_var must be an integer, got {n_var!r}")
        if n_var < 2:
            raise ValueError(f"{self.name}: n_var must be >= 2, got {n_var}")
        self.dim = n_var
        self.bounds = (torch.zeros(n_var, dtype=torch.float64), torch.ones(n_var, dtype=torch.float64))

    def options(self) -> dict[str, Any]:
        return {"n_var": self.dim}

    def _g(self, x: Tensor) -> tuple[Tensor, float]:
        c = 9.0 / (self.dim - 1)
        return 1 + c * x[..., 1:].sum(-1), c

    def _f2(self, x1: Tensor, g: Tensor) -> Tensor:
        raise NotImplementedError

    def _df2(self, x1: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """(∂f₂/∂x₁, ∂f₂/∂g)."""
        raise NotImplementedError

    def losses(self, x: Tensor) -> Tensor:
        _check_x(x, self.dim, self.name)
        x1 = x[..., 0]
        g, _ = self._g(x)
        return torch.stack([x1, self._f2(x1, g)], -1)

    def losses_and_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_x(x, self.dim, self.name)
        x1 = x[..., 0]
        g, c = self._g(x)
        F = torch.stack([x1, self._f2(x1, g)], -1)
        d1, dg = self._df2(x1, g)
        J = torch.zeros(x.shape[:-1] + (2, self.dim), dtype=x.dtype, device=x.device)
        J[..., 0, 0] = 1
        J[..., 1, 0] = d1
        J[..., 1, 1:] = (c * dg).unsqueeze(-1)
        return F, J

    def pareto_set(self, n: int = 100) -> Tensor:
        x1 = self._front_x1(n)
        X = torch.zeros((x1.numel(), self.dim), dtype=torch.float64)
        X[:, 0] = x1
        return X

    def pareto_front(self, n: int = 100) -> Tensor:
        x1 = self._front_x1(n)
        return torch.stack([x1, self._f2(x1, torch.ones_like(x1))], -1)

    def _front_x1(self, n: int) -> Tensor:
        return torch.linspace(0, 1, int(n), dtype=torch.float64)

    def _regions(self) -> tuple[tuple[float, float], ...]:
        return ((0.0, 1.0),)

    def front_distance(self, F: Tensor) -> Tensor:
        """Exact distance to the front curve ``(t, f₂(t, g=1))`` (see ``curve_distance``)."""
        def curve(t: Tensor) -> Tensor:
            return torch.stack([t, self._f2(t, torch.ones_like(t))], -1)

        return curve_distance(F, curve, self._regions())


class ZDT1(_ZDT):
    """ZDT1: convex front ``f₂ = 1 − √f₁``."""

    name = "zdt1"

    def _f2(self, x1: Tensor, g: Tensor) -> Tensor:
        return g * (1 - torch.sqrt(x1 / g))

    def _df2(self, x1: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        r = torch.sqrt(x1.clamp(min=_X1_FLOOR) / g)
        return -0.5 / r, 1 - 0.5 * r


class ZDT2(_ZDT):
    """ZDT2: concave front ``f₂ = 1 − f₁²``."""

    name = "zdt2"

    def _f2(self, x1: Tensor, g: Tensor) -> Tensor:
        return g * (1 - (x1 / g) ** 2)

    def _df2(self, x1: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        r = x1 / g
        return -2 * r, 1 + r * r


class ZDT3(_ZDT):
    """ZDT3: a front in five disconnected pieces of ``f₂ = 1 − √f₁ − f₁ sin(10π f₁)``."""

    name = "zdt3"

    def loss_floor(self) -> Tensor:
        """``f₂`` reaches about −0.7733 on the front (g = 1; larger g lifts it): floor −0.79."""
        return torch.tensor([-0.01, -0.79], dtype=torch.float64)

    def _f2(self, x1: Tensor, g: Tensor) -> Tensor:
        r = x1 / g
        return g * (1 - torch.sqrt(r) - r * torch.sin(10 * math.pi * x1))

    def _df2(self, x1: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.sqrt(x1.clamp(min=_X1_FLOOR) / g)
        w = 10 * math.pi
        d1 = -0.5 / s - torch.sin(w * x1) - w * x1 * torch.cos(w * x1)
        return d1, 1 - 0.5 * s

    def _regions(self) -> tuple[tuple[float, float], ...]:
        return ZDT3_REGIONS

    def _front_x1(self, n: int) -> Tensor:
        per = max(int(n) // len(ZDT3_REGIONS), 2)
        return torch.cat([torch.linspace(a, b, per, dtype=torch.float64) for a, b in ZDT3_REGIONS])
