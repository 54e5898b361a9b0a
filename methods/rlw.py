"""Random loss weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from mtl_opt._validation import check_choice
from mtl_opt.loss_weighting import LossWeighting
from mtl_opt.methods._state import checked_seed, drawn_seed
from mtl_opt.registry import register_aggregator

DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "bernoulli")


@register_aggregator("rlw")
class RLW(LossWeighting):
    """RLW: fresh random loss weights at every step.

    Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
    Learning", TMLR 2022. Each step draws ``λ`` from ``distribution`` and uses::

        normal:    λ ~ N(0, I),            w = softmax(λ)      (the default, as the authors')
        uniform:   λ ~ U(0, 1)^K,          w = softmax(λ)
        dirichlet: λ ~ Dir(1, ..., 1),     w = softmax(λ)
        bernoulli: λ ~ Bernoulli(1/2)^K,   w = λ  (redrawn while all zero)

    (the normalisations of the authors' LibMTL). Draws come from this instance's seeded
    generator (one draw per step, shared by a batch of runs); its state is part of the state dict.

    Args:
        distribution: one of ``normal``, ``uniform``, ``dirichlet``, ``bernoulli``.
        seed: the generator's seed; ``None`` draws one from torch's global generator at
            construction. :meth:`reset` re-seeds with it.
    """

    state = "random"
    properties = frozenset({"linear_under_scaling"})  # checked in tests/test_method_properties.py
    state_keys: ClassVar[tuple[str, ...]] = ("generator_state",)

    def __init__(self, distribution: str = "normal", seed: int | None = None) -> None:
        self.distribution = check_choice("distribution", distribution, DISTRIBUTIONS, owner="RLW")
        self.seed = checked_seed("RLW", seed)
        self._seed_used = drawn_seed(self.seed)
        self._generator = torch.Generator()
        self.reset()

    def _after_reset(self) -> None:
        self._generator.manual_seed(self._seed_used)
        self.generator_state = None

    def state_dict(self) -> dict:
        return {"generator_state": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"generator_state"} or not isinstance(
            state["generator_state"], Tensor
        ):
            raise ValueError("RLW state must be {'generator_state': <tensor from state_dict()>}")
        self._generator.set_state(state["generator_state"].clone())

    def _batch_weights_from_losses(self, L: Tensor) -> Tensor:
        # One draw per call, shared by a batch of runs (as PCGrad shares its orders): a batch
        # entry equals a single call of a fresh instance; studies that want independent draws
        # per seed build one instance per seed (the synthetic-problem runner does).
        B, K = L.shape
        g = self._generator
        if self.distribution == "bernoulli":
            while True:
                w = torch.bernoulli(torch.full((K,), 0.5, dtype=torch.float64), generator=g)
                if bool(w.any()):
                    break
            return w.expand(B, K).clone()
        if self.distribution == "normal":
            lam = torch.randn(K, generator=g, dtype=torch.float64)
        elif self.distribution == "uniform":
            lam = torch.rand(K, generator=g, dtype=torch.float64)
        else:  # Dir(1, ..., 1): K unit exponentials, normalised
            e = -torch.log1p(-torch.rand(K, generator=g, dtype=torch.float64))
            lam = e / e.sum()
        return torch.softmax(lam, dim=0).expand(B, K).clone()
