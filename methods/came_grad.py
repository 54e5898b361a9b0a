"""CAME-Grad: conflict-averse, magnitude-enhanced gradient descent (the seed paper's optimizer)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_opt._validation import check_range, check_task_vector
from mtl_opt.aggregator import GramianAggregator
from mtl_opt.methods._combinations import ArrayRows, FloatRows
from mtl_opt.registry import register_aggregator
from mtl_opt.solvers import conflict_averse, zero_norm_rtol


@register_aggregator("came_grad")
class CAMEGrad(GramianAggregator):
    """CAME-Grad: conflict-averse rectification, energy injection, adaptive fusion (ICML 2026).

    "The Double Dilemma in Multi-Task Radiology Report Generation" (arXiv 2605.22635).

    Three stages per step, on task gradients ``g_i`` with task weights ``ω_i``:

    1. **conflict-averse rectification** — ``μ = (1/K) Σ_i g_i``, trust radius ``√ξ = ρ‖μ‖``,
       ``α* = argmin_{α∈Δ} αᵀGμ + √ξ ‖αᵀG‖`` (the CAGrad sub-problem with ``c = ρ``, solved
       exactly by :func:`mtl_opt.solvers.conflict_averse`),
       ``u_rect = μ + √ξ/‖g_α*‖ · g_α*``;
    2. **energy injection** — ``g_joint = Σ_i ω_i g_i``,
       ``u_en = u_rect · κ‖g_joint‖ / (‖u_rect‖ + ε)``: the rectified direction rescaled to
       ``κ`` times the magnitude of the weighted joint gradient;
    3. **adaptive fusion** — ``g_final = (1 − ν) u_en + ν κ g_joint``.

    Every stage is a linear combination of the rows and every norm comes from ``M = G Gᵀ``, so this
    is a Gramian weighting ``g_final = βᵀG``. Directions are on the scale of the *sum* of the task
    gradients: ``‖u_en‖ = κ‖g_joint‖`` (up to ``ε``), and ``g_joint`` is the weighted sum.

    Ablation switches (one class, so ablations share every other line of code):

    * ``rectify=False``: stage 2 gets ``g_joint`` instead of ``u_rect``.
    * ``inject=False``: no rescale; the stage-2 output is the stage-2 input put on the
      sum-of-gradients scale: ``(Σ_i ω_i) · u_rect`` (``u_rect`` is mean-scale) when rectifying,
      ``g_joint`` otherwise.
    * ``fuse=False``: ``g_final = u_en`` (ν is not applied).

    With ``rectify = inject = fuse = False`` the method is exactly linear scalarization with ω.

    Edge cases (finite by construction): ``‖g_α*‖ = 0`` (to the Gramian's precision,
    ``‖g_α*‖² ≤ rtol·max_i‖g_i‖²``, ``rtol`` from :func:`mtl_opt._validation.gramian_rtol`) →
    the unit vector is undefined and ``u_rect`` is the
    solution of the rectification's primal problem closest to ``μ``,
    ``u_rect = proj_{u: Gu ≥ 0}(μ)`` (``= μ`` when no task conflicts with ``μ``; see
    :func:`mtl_opt.solvers.conflict_averse`); ``‖μ‖ = 0`` → ``u_rect = μ = 0``, ``u_en = 0`` and
    ``g_final = ν κ g_joint``; ``g_joint = 0`` (e.g. all-zero ``G``) → ``u_en = 0``; ``K = 1`` →
    ``u_rect = (1 + ρ) g_1`` (for ``g_1 ≠ 0``). The ``ε`` keeps stage 2 finite when
    ``u_rect = 0``; it makes the method positively homogeneous only up to ``ε/‖u_rect‖``. A
    ``u_rect`` that is zero to that precision (``‖u_rect‖ ≤ √rtol · Σ_i |c_i| ‖g_i‖`` for
    ``u_rect = cᵀG``: e.g. the cone projection of exactly opposing rows with ``ρ ≥ 1``) counts as
    0, so stage 2 gives ``u_en = 0`` instead of rescaling rounding noise to ``κ‖g_joint‖``.

    Args:
        rho: trust-radius factor ``ρ ≥ 0`` (authors' flag: 0.5). ``ρ = 0`` rectifies to ``μ``.
        kappa: energy factor ``κ > 0`` (authors' flag: 1.5).
        nu: fusion weight ``ν ∈ [0, 1]`` (authors' flag: 0.2).
        task_weights: ``ω`` (length K, finite, ≥ 0); ``None`` means all ones. The authors train
            with ``ω = [1, 4]`` (report loss, classification loss). A call's ``task_weights=``
            overrides it for that call.
        rectify, inject, fuse: the stage switches above (all on: the method).
        eps: ``ε > 0`` in stage 2.
    """

    properties = frozenset({"permutation_invariant"})  # checked in tests/test_method_properties.py
    accepts_task_weights = True

    def __init__(
        self,
        rho: float = 0.5,
        kappa: float = 1.5,
        nu: float = 0.2,
        task_weights: Sequence[float] | Tensor | None = None,
        rectify: bool = True,
        inject: bool = True,
        fuse: bool = True,
        eps: float = 1e-8,
    ) -> None:
        owner = "CAMEGrad"
        self.rho = check_range("rho", rho, low=0.0, owner=owner)
        self.kappa = check_range("kappa", kappa, low=0.0, low_inclusive=False, owner=owner)
        self.nu = check_range("nu", nu, low=0.0, high=1.0, owner=owner)
        self.eps = check_range("eps", eps, low=0.0, low_inclusive=False, owner=owner)
        for name, flag in (("rectify", rectify), ("inject", inject), ("fuse", fuse)):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner}: {name} must be True or False, got {flag!r}")
        self.rectify, self.inject, self.fuse = rectify, inject, fuse
        self._omega: Tensor | None = None
        if task_weights is not None:
            self._omega = self._check_omega(check_task_vector(task_weights, None, "CAMEGrad task_weights"))
            task_weights = [float(w) for w in self._omega]
        self.task_weights = task_weights

    def loss_weights(self, n_tasks: int) -> Tensor | None:
        """``ω``: the weights that parameters outside the Jacobian apply to the losses."""
        return None if self._omega is None else self._omega_for(n_tasks, None)

    @staticmethod
    def _check_omega(omega: Tensor) -> Tensor:
        if bool((omega < 0).any()):
            raise ValueError(f"CAMEGrad task weights must be >= 0, got {omega.tolist()}")
        return omega

    def _omega_for(self, K: int, task_weights: Tensor | None) -> Tensor:
        if task_weights is not None:
            return self._check_omega(task_weights)
        if self._omega is None:
            return torch.ones(K, dtype=torch.float64)
        if self._omega.numel() != K:
            raise ValueError(
                f"CAMEGrad was built with {self._omega.numel()} task weights but there are {K} tasks"
            )
        return self._omega

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        m = M.numpy()
        omega = self._omega_for(m.shape[0], task_weights).tolist()
        u_rect = conflict_averse(m, self.rho, checked=True)[1].tolist() if self.rectify else None
        return torch.from_numpy(np.array(self._stages(FloatRows(m.tolist()), omega, u_rect)))

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        Mn = M.numpy()
        B, K = Mn.shape[0], Mn.shape[1]
        omega = np.broadcast_to(self._omega_for(K, task_weights).numpy(), (B, K))
        u_rect = conflict_averse(Mn, self.rho, checked=True)[1] if self.rectify else None
        with np.errstate(divide="ignore", invalid="ignore"):
            beta = self._stages(ArrayRows(Mn), omega, u_rect)
        return torch.from_numpy(np.array(beta, dtype=np.float64))  # a copy: beta may be ω's read-only view

    def _stages(self, rows: FloatRows | ArrayRows, omega: Any, u_rect: Any) -> Any:
        """Stages 2 and 3 on the coefficients (``u_rect``: stage 1's, mean scale), written once
        for one Gramian on floats and for a batch on arrays (see :mod:`mtl_opt.methods._combinations`)."""
        joint_norm = rows.norm(omega)
        if self.inject:  # stage 2: energy injection
            v = u_rect if self.rectify else omega
            v_norm = rows.norm(v) if self.rectify else joint_norm
            if self.rectify:  # u_rect = 0 to the Gramian's precision: u_en = 0
                noise = math.sqrt(zero_norm_rtol()) * rows.size(v)
                v_norm = rows.xp.where(v_norm <= noise, math.inf, v_norm)
            u_en = rows.scale(v, self.kappa * joint_norm / (v_norm + self.eps))
        elif self.rectify:  # the rectified direction on the sum-of-gradients scale
            u_en = rows.scale(u_rect, rows.total(omega))
        else:
            u_en = omega
        if self.fuse:  # stage 3: adaptive fusion
            u_en = rows.add(rows.scale(u_en, 1.0 - self.nu), rows.scale(omega, self.nu * self.kappa))
        return u_en
