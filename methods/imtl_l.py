"""IMTL-L: the loss-balance half of impartial multi-task learning (Liu et al., ICLR 2021)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.loss_weighting import LossWeighting, adam_step
from mtl_opt.registry import register_aggregator


@register_aggregator("imtl_l")
class IMTLL(LossWeighting):
    """IMTL-L: learned loss scales ``e^{s_i}`` that make the scaled losses equal.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.2. The scaled losses
    and their objective over the model and the log-scales ``s``::

        J(θ, s) = Σ_i ( e^{s_i} L_i − s_i )

    so the model's update uses ``w_i = e^{s_i}`` and ``∂J/∂s_i = e^{s_i} L_i − 1`` (minimised
    where every scaled loss ``e^{s_i} L_i`` equals 1). ``s`` starts at 0 (as in LibMTL).

    Who updates ``s``: this method, after computing the step's weights, with its own Adam
    (``lr``, betas (0.9, 0.999), ε = 1e-8) on the exact ``∂J/∂s`` at the step's losses; with the
    model's learning rate this is the paper's joint training by the model's Adam (Adam is
    element-wise). ``s`` is visible as :attr:`log_scales` and saved in the state.

    Args:
        lr: Adam learning rate of ``s`` (set it to the model's).
    """

    state = "tracked"
    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py
    loss_domain: ClassVar[str] = "nonnegative"
    state_keys: ClassVar[tuple[str, ...]] = ("log_scales", "adam_m", "adam_v", "adam_steps")

    def __init__(self, lr: float = 1e-3) -> None:
        self.lr = check_range("lr", lr, low=0.0, low_inclusive=False, owner="IMTL-L")
        self.reset()

    def _batch_weights_from_losses(self, L: Tensor) -> Tensor:
        if self.log_scales is None:
            self.log_scales = torch.zeros_like(L)
            self.adam_m, self.adam_v, self.adam_steps = torch.zeros_like(L), torch.zeros_like(L), 0
        s = self.log_scales
        w = torch.exp(s)
        grad = w * L - 1.0
        self.adam_steps += 1
        adam_step(s, grad, self.adam_m, self.adam_v, self.adam_steps, lr=self.lr)
        return w
