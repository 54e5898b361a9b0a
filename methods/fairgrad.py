"""FairGrad: α-fair resource allocation among the tasks."""

from __future__ import annotations


import numpy as np
import torch
from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.aggregator import GramianAggregator
from mtl_opt.methods._combinations import clip_to_norm
from mtl_opt.solvers import FairGradSolverError, alpha_fair_weights
from mtl_opt.registry import register_aggregator

__all__ = ["FairGrad", "FairGradSolverError"]


@register_aggregator("fairgrad")
class FairGrad(GramianAggregator):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024).

    Each task's utility of an update ``d`` is ``u_i = g_iᵀd``; FairGrad maximises the α-fair
    utility ``Σ_i u_i^{1−α}/(1−α)`` (``Σ log u_i`` at α = 1) over a ball. The solution is
    ``d = Σ_i w_i g_i`` with ``w > 0`` solving (Eq. 4 of the paper)

        (G Gᵀ) w = w^{-1/α}        (element-wise),

    solved exactly by :func:`mtl_opt.solvers.alpha_fair_weights` (at α = 1 Nash-MTL's solver, the
    same system; otherwise Newton on a
    strictly convex potential, certified residual ``max_i |w_i^{1/α} (Mw)_i − 1| ≤ 1e-10``,
    :class:`FairGradSolverError` otherwise; the regularisation ``M + 10⁻⁹ diag(M)`` and the
    zero-gradient rule are Nash-MTL's). At α = 1 the equations are Nash-MTL's ``Mw = 1/w``: with
    the same ``max_norm`` the two methods give the same weights (tested). Large α approaches
    max-min fairness, α → 0 the plain sum. The authors' code solves the equations with
    ``scipy.optimize.least_squares`` from ``w = 1/K`` (default tolerances: an approximate root);
    here the root is certified.

    The authors' code then clips the shared gradient's norm to ``max_norm`` (default 1, as in
    their Nash-MTL baseline); as in :class:`mtl_opt.methods.NashMTL` the clip is folded into the
    weights: ``β = w · min(1, max_norm/‖wᵀG‖)`` (``max_norm=0`` disables it).

    Not linear under ``G → sG`` for α ≠ 1 (``w`` scales as ``s^{-2α/(1+α)}``); permutation
    invariant (tested).

    Args:
        alpha: the fairness parameter α > 0 (authors' default 1.0).
        max_norm: clip the direction to this norm (0 disables; authors' default 1.0).
    """

    properties = frozenset({"permutation_invariant"})  # checked in tests/test_method_properties.py

    def __init__(self, alpha: float = 1.0, max_norm: float = 1.0) -> None:
        self.alpha = check_range("alpha", alpha, low=0.0, low_inclusive=False, owner="FairGrad")
        self.max_norm = check_range("max_norm", max_norm, low=0.0, owner="FairGrad")

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        M_np = M.numpy()
        w, _ = alpha_fair_weights(M_np, 1.0 / self.alpha)
        return torch.from_numpy(clip_to_norm(M_np[None], w[None], self.max_norm)[0])
