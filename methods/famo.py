"""Fast adaptive multitask optimization (Liu et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.loss_weighting import LossWeighting, adam_step
from mtl_opt.registry import register_aggregator

#: The offset inside the logarithms, as in the authors' code.
_LOG_EPS = 1e-8


@register_aggregator("famo")
class FAMO(LossWeighting):
    """FAMO: logits ``ξ`` learned so that every task's log loss falls at the same rate.

    Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023. With
    ``z = softmax(ξ)`` and ``D_i = L_i + ε`` (ε = 1e-8) the model minimises
    ``Σ_i z_i log D_i / c`` with ``c = Σ_j z_j / D_j`` held constant, i.e. the loss weighting::

        w_i = (z_i / D_i) / Σ_j (z_j / D_j)          (Σ_i w_i D_i = 1)

    After the optimizer step the same batch's losses ``L'`` give the per-task decrease of the
    log losses ``δ_i = log D_i − log D'_i``, and the logits take one Adam step (learning rate
    ``w_lr``, L2 weight decay ``γ``, betas (0.9, 0.999), ε = 1e-8) along::

        ∇_ξ = J_softmax(ξ)ᵀ δ = z ⊙ (δ − zᵀδ)

    Defaults ``w_lr = 0.025``, ``γ = 1e-3`` (the FAMO_w_lr / FAMO_w_gamma of LibMTL, whose FAMO
    is adapted from the authors'; the authors' class defaults γ to 1e-5 and some of their runs use
    0.01). ξ starts at 0 (equal weights).

    Who updates ξ: this method, in :meth:`update`, with its own Adam (as the authors do). The
    training loop must call ``update(losses_after)`` after each optimizer step with the losses of
    the same batch at the new parameters: one extra forward pass per step (no backward pass).
    A step whose ``update`` is skipped leaves ξ unchanged. The authors subtract known lower
    bounds ``min_losses`` (0 by default) from the losses; shift the losses yourself if they can
    be negative (the losses must be ≥ 0). ξ is visible as :attr:`logits` and saved in the state.

    Args:
        w_lr: Adam learning rate of the logits.
        gamma: Adam's L2 weight decay of the logits.
    """

    state = "tracked"
    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py
    loss_domain: ClassVar[str] = "nonnegative"
    wants_losses_after_step: ClassVar[bool] = True
    state_keys: ClassVar[tuple[str, ...]] = ("logits", "adam_m", "adam_v", "adam_steps", "prev_losses")

    def __init__(self, w_lr: float = 0.025, gamma: float = 1e-3) -> None:
        self.w_lr = check_range("w_lr", w_lr, low=0.0, low_inclusive=False, owner="FAMO")
        self.gamma = check_range("gamma", gamma, low=0.0, owner="FAMO")
        self.reset()

    def _batch_weights_from_losses(self, L: Tensor) -> Tensor:
        if self.logits is None:
            self.logits = torch.zeros_like(L)
            self.adam_m, self.adam_v, self.adam_steps = torch.zeros_like(L), torch.zeros_like(L), 0
        z = torch.softmax(self.logits, dim=1)
        inv = z / (L + _LOG_EPS)
        self.prev_losses = L.clone()
        return inv / inv.sum(dim=1, keepdim=True)

    def _batch_update(self, L_after: Tensor) -> None:
        if self.prev_losses is None:
            raise RuntimeError("FAMO.update(losses_after) needs a step first: call weights(losses) "
                               "(or step the optimizer) before update")
        delta = torch.log(self.prev_losses + _LOG_EPS) - torch.log(L_after + _LOG_EPS)
        z = torch.softmax(self.logits, dim=1)
        grad = z * (delta - (z * delta).sum(dim=1, keepdim=True))
        self.adam_steps += 1
        adam_step(self.logits, grad, self.adam_m, self.adam_v, self.adam_steps,
                  lr=self.w_lr, weight_decay=self.gamma)
        self.prev_losses = None
