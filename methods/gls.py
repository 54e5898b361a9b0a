"""Geometric loss strategy (Chennupati et al., CVPR Workshops 2019)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtl_opt.loss_weighting import LossWeighting
from mtl_opt.registry import register_aggregator


@register_aggregator("gls")
class GeometricLossStrategy(LossWeighting):
    """GLS: minimise the geometric mean of the losses, ``(Π_i L_i)^{1/K}``.

    Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy
    for Multi-Task Learning", CVPR Workshops 2019. Its gradient is a loss weighting::

        ∇ (Π_j L_j)^{1/K} = Σ_i w_i ∇L_i,   w_i = (Π_j L_j)^{1/K} / (K L_i)

    computed as ``exp(mean_j log L_j) / (K L_i)`` (no overflow of the product). The losses must
    be > 0. Stateless.
    """

    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py
    loss_domain: ClassVar[str] = "positive"

    def __init__(self) -> None:
        pass

    def _batch_weights_from_losses(self, L: Tensor) -> Tensor:
        geometric_mean = torch.exp(torch.log(L).mean(dim=1, keepdim=True))
        return geometric_mean / (L.shape[1] * L)
