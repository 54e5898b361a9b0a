"""Smooth Tchebycheff scalarization (Lin et al., ICML 2024)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.loss_weighting import LossWeighting
from mtl_opt.methods._epochs import check_epoch_length
from mtl_opt.registry import register_aggregator

#: The offset inside the logarithms, as in the authors' code.
_LOG_EPS = 1e-20


@register_aggregator("stch")
class STCH(LossWeighting):
    """STCH: the smooth Tchebycheff scalarization of the log losses, normalised by a nadir point.

    Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective Optimization", ICML 2024.
    The smooth maximum ``g_μ(f) = μ log Σ_i exp(f_i / μ)`` of the normalised log losses
    ``f_i = log(L_i / n_i + ε)`` (ε = 1e-20), times K, as the authors' multi-task code trains::

        epoch e < E (warm-up):    minimise Σ_i log(L_i + ε)            → w_i = 1 / (L_i + ε)
        epoch e = E:              the same, and the nadir estimate n = mean of L over epoch E
        epoch e > E:              minimise K μ log Σ_i exp(f_i / μ)
                                  → w_i = K softmax(f / μ)_i / (L_i + ε n_i)

    Defaults μ = 1 and E = 4 warm-up epochs (the authors' multi-task settings). The losses must
    be > 0 (logarithms). Epochs end as in :class:`~mtl_opt.methods.dwa.DWA`: by
    :meth:`end_epoch` or every ``epoch_length`` steps.

    Args:
        mu: the smoothing ``μ`` > 0 (μ → 0 is the Tchebycheff maximum).
        warmup_epochs: ``E`` ≥ 0.
        epoch_length: steps per epoch, or ``None`` to be told by :meth:`end_epoch`.
    """

    state = "tracked"
    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py
    loss_domain: ClassVar[str] = "positive"
    state_keys: ClassVar[tuple[str, ...]] = ("epoch", "epoch_steps", "nadir_sum", "nadir_steps", "nadir")

    def __init__(self, mu: float = 1.0, warmup_epochs: int = 4, epoch_length: int | None = None) -> None:
        self.mu = check_range("mu", mu, low=0.0, low_inclusive=False, owner="STCH")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"STCH: warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        self.warmup_epochs = int(warmup_epochs)
        self.epoch_length = check_epoch_length(epoch_length, "STCH")
        self.reset()

    def _after_reset(self) -> None:
        self.epoch, self.epoch_steps, self.nadir_steps = 0, 0, 0

    def _batch_weights_from_losses(self, L: Tensor) -> Tensor:
        if self.epoch <= self.warmup_epochs:
            w = 1.0 / (L + _LOG_EPS)
            if self.epoch == self.warmup_epochs:
                self.nadir_sum = L.clone() if self.nadir_sum is None else self.nadir_sum + L
                self.nadir_steps += 1
        else:
            if self.nadir is None:
                self.nadir = self.nadir_sum / self.nadir_steps
            f = torch.log(L / self.nadir + _LOG_EPS)
            w = L.shape[1] * torch.softmax(f / self.mu, dim=1) / (L + _LOG_EPS * self.nadir)
        self.epoch_steps += 1
        if self.epoch_length is not None and self.epoch_steps >= self.epoch_length:
            self.end_epoch()
        return w

    def end_epoch(self) -> None:
        """Close the current epoch (one without steps is not counted)."""
        if self.epoch_steps:
            self.epoch += 1
            self.epoch_steps = 0

    def _state_shape(self) -> tuple[int, int] | None:
        ref = self.nadir if self.nadir is not None else self.nadir_sum
        return None if ref is None else (int(ref.shape[0]), int(ref.shape[1]))
