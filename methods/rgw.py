"""RGW: random gradient weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations


import torch
from torch import Tensor

from mtl_opt.aggregator import AggregationResult, GramianAggregator, combine_rows
from mtl_opt.methods._state import SeededGenerator
from mtl_opt.registry import register_aggregator


@register_aggregator("rgw")
class RGW(SeededGenerator, GramianAggregator):
    """RGW (Lin, Ye, Xu, Shi, Zhang, Kwok): random gradient weighting.

    "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning",
    TMLR 2022, Algorithm 2. At every call, fresh weights are drawn and the rows are combined::

        λ̃ ~ N(0, I_K),    λ = softmax(λ̃),    d = Σ_i λ_i g_i

    (the paper's default distribution, the standard normal; the weights are positive and sum to
    one). The Gramian is not used: the weights depend on the random draw only, and a single call
    makes one pass over ``G``.

    Randomness comes from this instance's seeded :class:`torch.Generator` (float64 draws).
    Batched calls (:meth:`aggregate_batch`) draw once per call and give every batch entry those
    weights, so a batch of ``B`` problems behaves exactly as ``B`` instances with the same seed.

    Args:
        seed: seed of the generator; ``None`` draws one from torch's global generator at
            construction. :meth:`reset` re-seeds with it.
    """

    state = "random"
    properties = frozenset({"linear_under_scaling"})  # checked in tests/test_method_properties.py
    kind = "gramian"  # a single call skips the Gramian and still returns λᵀG

    def __init__(self, seed: int | None = None) -> None:
        self._start_generator(seed)  # state: the generator (SeededGenerator)

    def _draw(self, K: int) -> Tensor:
        z = torch.randn(K, generator=self._generator, dtype=torch.float64)
        return torch.softmax(z, dim=0)

    def _aggregate(self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> AggregationResult:
        """``d = λᵀG`` in one pass over ``G`` (the weights need no Gramian; ``gramian`` is
        ``None``); finiteness is checked on the direction."""
        beta = self._draw(G.shape[0])
        return AggregationResult(direction=combine_rows(beta, G), weights=beta, gramian=None)

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        return self._draw(M.shape[0])

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        return self._draw(M.shape[1]).expand(M.shape[0], -1).clone()
