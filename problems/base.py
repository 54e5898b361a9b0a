"""The interface of a synthetic multi-objective problem with (where known) a true Pareto front.

A problem has ``n_tasks`` (K) losses over a decision vector of ``dim`` variables. Everything is
batched over leading dimensions: ``losses(x)`` maps ``(..., dim)`` to ``(..., K)``, so many starts
and seeds are evaluated in one call. :meth:`ParetoProblem.losses_and_jacobian` returns the losses
and the Jacobian ``(..., K, dim)``; the default uses one autograd pass per task (the runs are
independent, so the gradient of ``losses[..., i].sum()`` is row ``i`` of every run's Jacobian at
once) and problems with a closed form override it.

Bounds: box-constrained problems (ZDT, DTLZ) keep ``x`` in ``[lower, upper]`` by projection
(:meth:`ParetoProblem.project`, a clamp after every optimizer step). Their Pareto-optimal points
sit on the boundary of the box (ZDT's ``x_2..x_n = 0``), so "stationary" means stationary on the
active face: see :meth:`ParetoProblem.blocked_coordinates`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ParetoProblem", "curve_distance"]


class ParetoProblem:
    """Base class of the synthetic problems.

    Attributes:
        name: registry name (``"zdt1"``).
        n_tasks: K, the number of losses.
        dim: the number of decision variables.
        bounds: ``(lower, upper)`` float64 tensors of shape ``(dim,)``, or ``None``.
        gradient_noise_std: σ of the additive Gaussian noise on every task gradient (0 for the
            deterministic problems). A stochastic gradient ``g̃_i = ∇f_i(x) + σ ε_i`` is the exact
            gradient of the stochastic loss ``f_i(x) + σ ε_iᵀx`` whose expectation is ``f_i``.
    """

    name: str = "problem"
    n_tasks: int
    dim: int
    bounds: tuple[Tensor, Tensor] | None = None
    gradient_noise_std: float = 0.0
    #: number of points used to sample the true front for :meth:`front_distance`
    front_resolution: int = 2001

    def loss_floor(self) -> Tensor:
        """A point strictly below every attainable loss, (K,) float64.

        Loss weightings that take logarithms or ratios of the losses (SI, GLS, DWA, STCH, FAMO)
        need positive losses; studies give them ``L − floor``, which has the same gradients (as
        FAMO's authors subtract known lower bounds ``min_losses``). The default, ``−0.01``, is for
        problems whose losses are ≥ 0; problems with negative losses override it.
        """
        return torch.full((self.n_tasks,), -0.01, dtype=torch.float64)

    # ------------------------------------------------------------------ values and gradients
    def losses(self, x: Tensor) -> Tensor:
        """The K losses at ``x`` (..., dim) -> (..., K), differentiable in torch."""
        raise NotImplementedError

    def losses_and_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Losses (..., K) and Jacobian (..., K, dim) at ``x`` (detached results)."""
        return self._autograd_losses_and_jacobian(x)

    def _autograd_losses_and_jacobian(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            xr = x.detach().clone().requires_grad_(True)
            F = self.losses(xr)
            rows = []
            for i in range(self.n_tasks):
                (g,) = torch.autograd.grad(F[..., i].sum(), xr, retain_graph=i + 1 < self.n_tasks)
                rows.append(g)
        return F.detach(), torch.stack(rows, dim=-2)

    def stochastic_losses(self, x: Tensor, eps: Tensor) -> Tensor:
        """``f_i(x) + σ ε_iᵀx`` for noise ``eps`` (..., K, dim): the loss whose gradient is the
        noisy gradient the runner uses (for autograd users; the runner adds ``σ ε`` directly)."""
        F = self.losses(x)
        if self.gradient_noise_std == 0.0:
            return F
        return F + self.gradient_noise_std * (eps * x.unsqueeze(-2)).sum(-1)

    # ------------------------------------------------------------------ bounds
    def project(self, x: Tensor) -> Tensor:
        """Clamp ``x`` into the box in place (no-op without bounds); returns ``x``."""
        if self.bounds is not None:
            lo, hi = self._bounds_like(x)
            with torch.no_grad():
                x.clamp_(min=lo, max=hi)
        return x

    def blocked_coordinates(self, x: Tensor, J: Tensor) -> Tensor | None:
        """Coordinates an active bound blocks, ``(..., dim)`` bool, or ``None`` without bounds.

        Coordinate ``j`` is blocked at ``x`` when ``x_j`` sits on its lower bound and every task
        gradient has ``∂f_i/∂x_j ≥ 0`` (every convex combination's descent step ``-d_j`` points
        out of the box), or symmetrically on the upper bound with ``∂f_i/∂x_j ≤ 0``. Projection
        cancels such a component, so the runner removes it from the Jacobian before aggregation
        and Pareto stationarity is measured on the free coordinates (the KKT conditions of the
        box-constrained problem for these coordinates).
        """
        if self.bounds is None:
            return None
        lo, hi = self._bounds_like(x)
        at_lo = (x <= lo) & (J >= 0).all(dim=-2)
        at_hi = (x >= hi) & (J <= 0).all(dim=-2)
        return at_lo | at_hi

    def _bounds_like(self, x: Tensor) -> tuple[Tensor, Tensor]:
        assert self.bounds is not None
        cache = getattr(self, "_bounds_cache", None)
        key = (x.dtype, x.device)
        if cache is None or cache[0] != key:
            lo, hi = (b.to(dtype=x.dtype, device=x.device) for b in self.bounds)
            cache = (key, lo, hi)
            self._bounds_cache = cache
        return cache[1], cache[2]

    # ------------------------------------------------------------------ starts
    def protocol_starts(self) -> Tensor:
        """The problem's default starting points (S, dim), float64."""
        return self.initial_points(5, seed=0)

    def initial_points(self, n: int = 5, *, seed: int = 0) -> Tensor:
        """``n`` starting points (n, dim), float64, drawn uniformly in the box from a generator
        seeded with ``seed`` (problems without bounds override this)."""
        if n < 1:
            raise ValueError(f"{self.name}: the number of initial points must be >= 1, got {n}")
        if self.bounds is None:
            raise NotImplementedError(
                f"{self.name} has no bounds to draw starting points from; "
                "an unbounded problem overrides initial_points"
            )
        g = torch.Generator().manual_seed(int(seed))
        lo, hi = self.bounds
        u = torch.rand((n, self.dim), generator=g, dtype=torch.float64)
        return lo + (hi - lo) * u

    # ------------------------------------------------------------------ the true front
    @property
    def has_known_front(self) -> bool:
        return type(self).pareto_front is not ParetoProblem.pareto_front

    def pareto_front(self, n: int = 100) -> Tensor:
        """About ``n`` points of the true Pareto front (n', K), float64."""
        raise NotImplementedError(f"{self.name} has no known Pareto front")

    def pareto_set(self, n: int = 100) -> Tensor:
        """About ``n`` Pareto-optimal decision vectors (n', dim), float64."""
        raise NotImplementedError(f"{self.name} has no known Pareto set")

    def front_distance(self, F: Tensor) -> Tensor:
        """Euclidean distance in objective space from each ``F`` (..., K) to the true front.

        The default measures it to a dense sample of :meth:`pareto_front`
        (``front_resolution`` points); problems with an analytic distance override it.
        """
        ref = getattr(self, "_front_cache", None)
        if ref is None or ref.dtype != F.dtype or ref.device != F.device:
            ref = self.pareto_front(self.front_resolution).to(dtype=F.dtype, device=F.device)
            self._front_cache = ref
        flat = F.reshape(-1, F.shape[-1])
        d = torch.cdist(flat, ref, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        return d.reshape(F.shape[:-1])

    # ------------------------------------------------------------------ description
    def options(self) -> dict[str, Any]:
        """The constructor options that rebuild this problem with :func:`get_problem`."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def _check_x(x: Tensor, dim: int, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor of shape (..., {dim}), got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != dim:
        raise ValueError(f"{name}: x must have shape (..., {dim}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be floating point, got {x.dtype}")


HALF_PI = math.pi / 2


def curve_distance(F: Tensor, curve: Callable[[Tensor], Tensor],
                   regions: Sequence[tuple[float, float]], n: int = 2001, iters: int = 60) -> Tensor:
    """Distance from each ``F`` (..., K) to a front given as a curve ``t ↦ curve(t)`` (m,) -> (m, K)
    over the parameter intervals ``regions``.

    The nearest of ``n`` samples per region brackets the minimiser between its two neighbours;
    ``iters`` golden-section steps then shrink the bracket to machine precision (the distance
    is unimodal on a bracket that small for the smooth fronts used here).
    """
    K = F.shape[-1]
    flat = F.reshape(-1, K).to(torch.float64)
    best = torch.full((flat.shape[0],), float("inf"), dtype=torch.float64)
    lo_t = torch.zeros_like(best)
    hi_t = torch.zeros_like(best)
    for a, b in regions:
        t = torch.linspace(a, b, n, dtype=torch.float64)
        d, j = torch.cdist(flat, curve(t), compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
        better = d < best
        best = torch.where(better, d, best)
        lo_t = torch.where(better, t[(j - 1).clamp(min=0)], lo_t)
        hi_t = torch.where(better, t[(j + 1).clamp(max=n - 1)], hi_t)

    def dist(tt: Tensor) -> Tensor:
        return torch.linalg.vector_norm(flat - curve(tt), dim=-1)

    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(iters):
        m1 = hi_t - ratio * (hi_t - lo_t)
        m2 = lo_t + ratio * (hi_t - lo_t)
        left = dist(m1) < dist(m2)
        hi_t = torch.where(left, m2, hi_t)
        lo_t = torch.where(left, lo_t, m1)
    refined = torch.minimum(dist(0.5 * (lo_t + hi_t)), best)
    return refined.to(F.dtype).reshape(F.shape[:-1])
