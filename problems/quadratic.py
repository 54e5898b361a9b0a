"""A convex quadratic family with an analytic Pareto set, and its stress variants.

``K`` tasks over ``x ∈ ℝⁿ`` share one positive-definite curvature ``A`` and differ by centre
``c_i`` and scale ``s_i``::

    f_i(x) = s_i · ½ (x − c_i)ᵀ A (x − c_i),      ∇f_i(x) = s_i A (x − c_i)

Pareto set: ``Σ_i α_i s_i A (x − c_i) = 0`` for some ``α ∈ Δ`` gives ``x = Σ_i w_i c_i`` with
``w ∝ α ∘ s``, so the Pareto set is the convex hull of the centres, whatever the scales; the front
is its image. ``A = Qᵀ diag(λ) Q`` with ``λ`` log-spaced in ``[1, condition]`` and ``Q`` a seeded
random rotation; the centres are seeded standard normals times 2.

Variants that stress what CAME-Grad claims to fix:

* ``imbalance``: the last task's loss is multiplied by it (×10 … ×1000): the Pareto set is
  unchanged, but magnitude-driven methods drift toward the large task.
* ``noise``: every task gradient gets additive ``N(0, noise²)`` noise per coordinate, seeded per
  run by the study's seed (stochastic gradients).
* ``n_tasks``: many tasks (the registry's ``quadratic_many`` uses 10).

Distance to the front: for ``K = 2`` exact (the front is the curve ``t ↦ f((1−t)c₁ + t c₂)``,
searched by golden section); for ``K > 2`` to a sample of the front (the ``K`` vertices plus
20 000 seeded Dirichlet(1) mixtures of the centres), an upper bound on the true distance.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.problems.base import ParetoProblem, _check_x, curve_distance

__all__ = ["Quadratic"]


class Quadratic(ParetoProblem):
    """Convex quadratics sharing a curvature ``A``; see the module docstring.

    Args:
        n_tasks: K ≥ 2.
        dim: number of variables n ≥ 1.
        condition: ``λ_max / λ_min`` of ``A`` (≥ 1).
        imbalance: factor on the last task's loss (> 0; 1 = balanced).
        noise: σ of the additive Gaussian gradient noise (≥ 0; 0 = deterministic).
        seed: seeds ``A`` and the centres (the problem's identity, not the run's seed).
    """

    name = "quadratic"

    def __init__(self, n_tasks: int = 2, dim: int = 10, condition: float = 10.0,
                 imbalance: float = 1.0, noise: float = 0.0, seed: int = 0) -> None:
        for label, v, low in (("n_tasks", n_tasks, 2), ("dim", dim, 1)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"quadratic: {label} must be an integer, got {v!r}")
            if v < low:
                raise ValueError(f"quadratic: {label} must be >= {low}, got {v}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"quadratic: seed must be an integer, got {seed!r}")
        self.condition = check_range("condition", condition, low=1.0, owner="quadratic")
        self.imbalance = check_range("imbalance", imbalance, low=0.0, low_inclusive=False, owner="quadratic")
        self.noise = check_range("noise", noise, low=0.0, owner="quadratic")
        self.n_tasks, self.dim, self.seed = n_tasks, dim, seed
        self.gradient_noise_std = self.noise
        self.front_resolution = 20000
        g = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn((dim, dim), generator=g, dtype=torch.float64))
        lam = torch.logspace(0, math.log10(self.condition), dim, dtype=torch.float64)
        self.A = (Q * lam) @ Q.T
        self.A = 0.5 * (self.A + self.A.T)
        self.centers = 2 * torch.randn((n_tasks, dim), generator=g, dtype=torch.float64)
        self.scales = torch.ones(n_tasks, dtype=torch.float64)
        self.scales[-1] = self.imbalance

    def options(self) -> dict[str, Any]:
        return {"n_tasks": self.n_tasks, "dim": self.dim, "condition": self.condition,
                "imbalance": self.imbalance, "noise": self.noise, "seed": self.seed}

    def _consts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cache = getattr(self, "_const_cache", None)
        key = (x.dtype, x.device)
        if cache is None or cache[0] != key:
            cache = (key, *(t.to(dtype=x.dtype, device=x.device) for t in (self.A, self.centers, self.scales)))
            self._const_cache = cache
        return cache[1], cache[2], cache[3]

    def losses(self, x: Tensor) -> Tensor:
        _check_x(x, self.dim, self.name)
        A, C, s = self._consts(x)
        r = x.unsqueeze(-2) - C  # (..., K, n)
        return 0.5 * s * ((r @ A) * r).sum(-1)

    def losses_and_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_x(x, self.dim, self.name)
        A, C, s = self._consts(x)
        r = x.unsqueeze(-2) - C
        Ar = r @ A
        F = 0.5 * s * (Ar * r).sum(-1)
        return F, s.unsqueeze(-1) * Ar

    def protocol_starts(self) -> Tensor:
        return self.initial_points(5, seed=0)

    def initial_points(self, n: int = 5, *, seed: int = 0) -> Tensor:
        """``n`` seeded draws ``N(0, 3²)`` per coordinate."""
        if n < 1:
            raise ValueError(f"quadratic: the number of initial points must be >= 1, got {n}")
        g = torch.Generator().manual_seed(10_000 + int(seed))
        return 3 * torch.randn((n, self.dim), generator=g, dtype=torch.float64)

    def pareto_weights(self, n: int) -> Tensor:
        """Mixture weights ``w ∈ Δ`` of the sampled Pareto set (n', K)."""
        K = self.n_tasks
        if K == 2:
            t = torch.linspace(0, 1, int(n), dtype=torch.float64)
            return torch.stack([1 - t, t], -1)
        g = torch.Generator().manual_seed(20_000 + self.seed)
        e = -torch.log(torch.rand((max(int(n) - K, 0), K), generator=g, dtype=torch.float64))
        return torch.cat([torch.eye(K, dtype=torch.float64), e / e.sum(-1, keepdim=True)])

    def pareto_set(self, n: int = 100) -> Tensor:
        return self.pareto_weights(n) @ self.centers

    def front_distance(self, F: Tensor) -> Tensor:
        if self.n_tasks != 2:
            return super().front_distance(F)
        c0, c1 = self.centers[0], self.centers[1]
        return curve_distance(F, lambda t: self.losses(c0 + t.unsqueeze(-1) * (c1 - c0)), ((0.0, 1.0),))

    def pareto_front(self, n: int = 100) -> Tensor:
        return self.losses(self.pareto_set(n))
