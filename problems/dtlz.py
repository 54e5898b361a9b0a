"""DTLZ2 (Deb, Thiele, Laumanns & Zitzler, 2002/2005): a spherical front in any number of tasks.

Over the box ``[0, 1]ⁿ`` with ``M`` objectives (pymoo's defaults ``n = 10``, ``M = 3``), the
first ``M − 1`` variables are angles ``θ_j = π x_j / 2`` and the last ``k = n − M + 1`` set the
distance ``g = Σ_{j ≥ M} (x_j − ½)²``::

    f₁ = (1 + g) cos θ₁ … cos θ_{M−2} cos θ_{M−1}
    f_i = (1 + g) cos θ₁ … cos θ_{M−i} sin θ_{M−i+1}        (i = 2..M)

The Pareto front is the unit sphere's positive orthant ``Σ f_i² = 1`` (``g = 0``, every tail
variable ½), so the distance of ``F`` to the front is ``‖F‖ − 1 = g`` exactly. Values equal
pymoo's ``DTLZ2``; bounds are kept by projection.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtl_opt.problems.base import ParetoProblem, _check_x

__all__ = ["DTLZ2"]


class DTLZ2(ParetoProblem):
    """DTLZ2 with ``n_obj`` tasks over ``n_var`` variables (pymoo's defaults 3 and 10)."""

    name = "dtlz2"

    def __init__(self, n_var: int = 10, n_obj: int = 3) -> None:
        for label, v in (("n_var", n_var), ("n_obj", n_obj)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"dtlz2: {label} must be an integer, got {v!r}")
        if n_obj < 2:
            raise ValueError(f"dtlz2: n_obj must be >= 2, got {n_obj}")
        if n_var < n_obj:
            raise ValueError(f"dtlz2: n_var must be >= n_obj = {n_obj}, got {n_var}")
        self.n_tasks = n_obj
        self.dim = n_var
        self.bounds = (torch.zeros(n_var, dtype=torch.float64), torch.ones(n_var, dtype=torch.float64))
        M = n_obj
        # which factor each (objective i, angle j) uses: 0 cos, 1 sin, 2 absent (factor 1)
        kind = torch.full((M, M - 1), 2, dtype=torch.long)
        for i in range(M):
            n_cos = M - 1 - i
            kind[i, :n_cos] = 0
            if i > 0:
                kind[i, n_cos] = 1
        self._is_cos = kind == 0
        self._is_sin = kind == 1

    def options(self) -> dict[str, Any]:
        return {"n_var": self.dim, "n_obj": self.n_tasks}

    def _factors(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        M = self.n_tasks
        theta = x[..., : M - 1] * (math.pi / 2)
        c, s = torch.cos(theta).unsqueeze(-2), torch.sin(theta).unsqueeze(-2)  # (..., 1, M-1)
        is_cos = self._is_cos.to(x.device)
        is_sin = self._is_sin.to(x.device)
        one = torch.ones_like(c)
        P = torch.where(is_cos, c, torch.where(is_sin, s, one))  # (..., M, M-1)
        dP = torch.where(is_cos, -s, torch.where(is_sin, c, torch.zeros_like(c)))
        g = ((x[..., M - 1 :] - 0.5) ** 2).sum(-1)
        return P, dP, g

    def losses(self, x: Tensor) -> Tensor:
        _check_x(x, self.dim, self.name)
        P, _, g = self._factors(x)
        return (1 + g).unsqueeze(-1) * P.prod(-1)

    def losses_and_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_x(x, self.dim, self.name)
        M = self.n_tasks
        P, dP, g = self._factors(x)
        h = P.prod(-1)  # (..., M)
        F = (1 + g).unsqueeze(-1) * h
        # ∂h_i/∂θ_j: the product with factor j replaced by its derivative
        eye = torch.eye(M - 1, dtype=torch.bool, device=x.device)  # (j, l)
        Pj = torch.where(eye.unsqueeze(-2), dP.unsqueeze(-3), P.unsqueeze(-3))  # (..., j, M, l)
        dh = Pj.prod(-1).transpose(-1, -2)  # (..., M, j)
        J = torch.empty(x.shape[:-1] + (M, self.dim), dtype=x.dtype, device=x.device)
        J[..., : M - 1] = (1 + g)[..., None, None] * dh * (math.pi / 2)
        J[..., M - 1 :] = h.unsqueeze(-1) * (2 * (x[..., M - 1 :] - 0.5)).unsqueeze(-2)
        return F, J

    def pareto_set(self, n: int = 100) -> Tensor:
        angles = self._angle_grid(n)
        X = torch.full((angles.shape[0], self.dim), 0.5, dtype=torch.float64)
        X[:, : self.n_tasks - 1] = angles
        return X

    def pareto_front(self, n: int = 100) -> Tensor:
        return self.losses(self.pareto_set(n))

    def _angle_grid(self, n: int) -> Tensor:
        m = self.n_tasks - 1
        per = max(2, math.ceil(int(n) ** (1.0 / m)))
        axes = [torch.linspace(0, 1, per, dtype=torch.float64)] * m
        return torch.cartesian_prod(*axes).reshape(-1, m)

    def front_distance(self, F: Tensor) -> Tensor:
        """``| ‖F‖ − 1 |`` (the front is the unit sphere's positive orthant and DTLZ2's ``F``
        always lies in that orthant)."""
        return (torch.linalg.vector_norm(F, dim=-1) - 1).abs()
