"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.loss_weighting import LossWeighting, adam_step
from mtl_opt.registry import register_aggregator


@register_aggregator("uw")
class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting (UW): learned homoscedastic log-variances ``s_i = log σ_i²``.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018. The joint objective over the model and ``s``::

        J(θ, s) = Σ_i ( e^{-s_i} L_i / 2 + s_i / 2 )

    so the model's update uses ``w_i = e^{-s_i} / 2`` and ``∂J/∂s_i = (1 − e^{-s_i} L_i) / 2``
    (minimised at ``e^{s_i} = L_i``). The paper writes ``1/(2σ²)`` for regression and ``1/σ²``
    for classification losses; like LibMTL this uses the ``1/2`` form for every task.

    Who updates ``s``: this method, after computing the step's weights, with its own Adam
    (``lr``, betas (0.9, 0.999), ε = 1e-8) on the exact ``∂J/∂s`` at the step's losses. Adam is
    element-wise, so with the model's learning rate this is the paper's joint training of ``s``
    by the model's Adam. ``s`` is visible as :attr:`log_variances` and saved in the state.

    Args:
        lr: Adam learning rate of ``s`` (set it to the model's).
        init_log_variance: ``s`` at the start (0: σ = 1, weights 1/2; LibMTL starts at −0.5).
    """

    state = "tracked"
    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py
    loss_domain: ClassVar[str] = "nonnegative"
    state_keys: ClassVar[tuple[str, ...]] = ("log_variances", "adam_m", "adam_v", "adam_steps")

    def __init__(self, lr: float = 1e-3, init_log_variance: float = 0.0) -> None:
        self.lr = check_range("lr", lr, low=0.0, low_inclusive=False, owner="UW")
        self.init_log_variance = check_range("init_log_variance", init_log_variance, owner="UW")
        self.reset()

    def _batch_weights_from_losses(self, L: Tensor) -> Tensor:
        if self.log_variances is None:
            self.log_variances = torch.full_like(L, self.init_log_variance)
            self.adam_m, self.adam_v, self.adam_steps = torch.zeros_like(L), torch.zeros_like(L), 0
        s = self.log_variances
        precision = torch.exp(-s)
        w = 0.5 * precision
        grad = 0.5 * (1.0 - precision * L)
        self.adam_steps += 1
        adam_step(s, grad, self.adam_m, self.adam_v, self.adam_steps, lr=self.lr)
        return w
