"""Dynamic weight average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.loss_weighting import LossWeighting
from mtl_opt.methods._epochs import check_epoch_length
from mtl_opt.registry import register_aggregator


@register_aggregator("dwa")
class DWA(LossWeighting):
    """DWA: weights from the rates at which the epoch losses fall.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, Eq. 7.
    With ``L̄_i(e)`` the mean of task ``i``'s loss over epoch ``e``, the weights of every step of
    epoch ``e`` are::

        r_i = L̄_i(e − 1) / L̄_i(e − 2),   w_i = K exp(r_i / T) / Σ_j exp(r_j / T)

    and ``w_i = 1`` in the first two epochs (``e < 2``). Default ``T = 2`` (the paper's).

    Epochs: an epoch ends when the training loop calls :meth:`end_epoch` (the RRG trainer does at
    the end of each pass over the data; the synthetic-problem runner after each step), or, with
    ``epoch_length = n``, after every ``n`` steps (calls of ``weights``). The epoch mean is the
    mean of the losses this method saw in that epoch. The losses must be > 0 (a ratio is taken).

    Args:
        temperature: ``T`` > 0.
        epoch_length: steps per epoch, or ``None`` to be told by :meth:`end_epoch`.
    """

    state = "tracked"
    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py
    loss_domain: ClassVar[str] = "positive"
    state_keys: ClassVar[tuple[str, ...]] = (
        "epoch_loss_sum", "epoch_steps", "last_epoch_mean", "previous_epoch_mean",
    )

    def __init__(self, temperature: float = 2.0, epoch_length: int | None = None) -> None:
        self.temperature = check_range("temperature", temperature, low=0.0, low_inclusive=False,
                                       owner="DWA")
        self.epoch_length = check_epoch_length(epoch_length, "DWA")
        self.reset()

    def _batch_weights_from_losses(self, L: Tensor) -> Tensor:
        K = L.shape[1]
        if self.last_epoch_mean is not None and self.previous_epoch_mean is not None:
            rate = self.last_epoch_mean / self.previous_epoch_mean
            w = K * torch.softmax(rate / self.temperature, dim=1)
        else:
            w = torch.ones_like(L)
        if self.epoch_loss_sum is None:
            self.epoch_loss_sum, self.epoch_steps = torch.zeros_like(L), 0
        self.epoch_loss_sum += L
        self.epoch_steps += 1
        if self.epoch_length is not None and self.epoch_steps >= self.epoch_length:
            self.end_epoch()
        return w

    def end_epoch(self) -> None:
        """Close the current epoch: its mean losses become ``L̄(e − 1)`` for the next one."""
        if self.epoch_loss_sum is None or not self.epoch_steps:
            return  # no step in this epoch: nothing to average
        self.previous_epoch_mean = self.last_epoch_mean
        self.last_epoch_mean = self.epoch_loss_sum / self.epoch_steps
        self.epoch_loss_sum = torch.zeros_like(self.epoch_loss_sum)
        self.epoch_steps = 0
