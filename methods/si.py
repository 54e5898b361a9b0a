"""Scale-invariant loss: the sum of log losses (the baseline of Navon et al., ICML 2022)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from mtl_opt.loss_weighting import LossWeighting
from mtl_opt.registry import register_aggregator


@register_aggregator("si")
class ScaleInvariant(LossWeighting):
    """SI: minimise ``Σ_i log L_i``, invariant to a rescaling of any loss.

    The scale-invariant baseline of Navon et al., "Multi-Task Learning as a Bargaining Game",
    ICML 2022 (Nash-MTL). Its gradient is the loss weighting ``w_i = 1 / L_i``. The losses must
    be > 0. Stateless.
    """

    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py
    loss_domain: ClassVar[str] = "positive"

    def __init__(self) -> None:
        pass

    def _batch_weights_from_losses(self, L: Tensor) -> Tensor:
        return 1.0 / L
