"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.aggregator import _HALF_DTYPES, AggregationResult, GradientAggregator
from mtl_opt.methods._state import SeededGenerator
from mtl_opt.registry import register_aggregator


@register_aggregator("graddrop")
class GradDrop(SeededGenerator, GradientAggregator):
    """GradDrop (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov): gradient sign dropout.

    "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020, Algorithm 1 (lines 10–15). Element-wise, not a Gramian weighting: for every
    coordinate ``k`` of the shared parameters,

        P_k = ½ (1 + Σ_i G_ik / Σ_i |G_ik|)             (gradient positive sign purity, in [0, 1])
        U_k ~ Uniform(0, 1)                              (one draw per coordinate, shared by tasks)
        m_ik = [P_k > U_k]·[G_ik > 0] + [P_k < U_k]·[G_ik < 0]
        d_k  = Σ_i (ℓ_i + (1 − ℓ_i) m_ik) G_ik

    so at each coordinate only the gradients of one sign survive, the positive sign being kept
    with probability ``P_k``. ``ℓ_i ∈ [0, 1]`` are the paper's leak parameters (``ℓ_i = 1`` lets
    task ``i`` through untouched; the default, no leak, is ``ℓ = 0``). A coordinate where every
    task's gradient is zero gets ``P_k = ½`` (the paper's ratio is 0/0 there) and ``d_k = 0``.
    The monotone transfer function ``f(P)`` of the paper is the identity, as in its experiments.

    The paper applies GradDrop to the gradients at a shared activation layer (summed over the
    batch first); here, as in every method of this library, it acts on the Jacobian of the
    shared parameters (the convention of TorchJD's ``GradDrop``, which this method matches on
    the same draws).

    ``U`` is drawn in float64 on the CPU from this instance's seeded :class:`torch.Generator`,
    then cast to the Jacobian's working dtype (float32 for half-precision Jacobians, whose
    directions are checked to fit: else ``ValueError``) and moved to ``G``'s device, so a float32
    Jacobian and its float64 copy see the same draws.
    Batched calls draw one ``U`` per call, shared by every batch entry, so a batch of ``B``
    problems behaves exactly as ``B`` instances with the same seed.

    Args:
        leak: ``None`` (no leak) or K numbers in ``[0, 1]``, one per task.
        seed: seed of the generator; ``None`` draws one from torch's global generator at
            construction. :meth:`reset` re-seeds with it.
    """

    state = "random"
    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py

    def __init__(self, leak: Sequence[float] | None = None, seed: int | None = None) -> None:
        if leak is not None:
            if isinstance(leak, Tensor):
                leak = leak.detach().reshape(-1).tolist()
            if isinstance(leak, (str, bytes)) or not isinstance(leak, Sequence) or len(leak) == 0:
                raise TypeError(f"GradDrop: leak must be None or a non-empty list of numbers, got {leak!r}")
            leak = [check_range(f"leak[{i}]", v, low=0.0, high=1.0, owner="GradDrop") for i, v in enumerate(leak)]
        self.leak = leak
        self._start_generator(seed)  # state: the generator (SeededGenerator)

    # ---------------------------------------------------------------------------- direction
    def _check_leak(self, K: int) -> None:
        if self.leak is not None and len(self.leak) != K:
            raise ValueError(f"GradDrop has {len(self.leak)} leak values but the Jacobian has {K} tasks")

    def _aggregate(self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> AggregationResult:
        self._check_leak(G.shape[0])
        return AggregationResult(direction=self._directions(G[None])[0])

    def _aggregate_batch(self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        self._check_leak(G.shape[1])
        return self._directions(G)

    def _directions(self, G: Tensor) -> Tensor:
        """Directions of a batch ``G`` (B, K, d) with one draw ``U`` (d,).

        With ``g⁺ = max(g, 0)`` and ``g⁻ = min(g, 0)``, the masks select whole sign classes, so
        ``d = Σ_i ℓ_i g_i + [P > U] Σ_i (1 − ℓ_i) g_i⁺ + [P < U] Σ_i (1 − ℓ_i) g_i⁻`` and
        ``P = ½(1 + (Σ g⁺ + Σ g⁻)/(Σ g⁺ − Σ g⁻))``: two passes over ``G`` instead of K masks.
        """
        work = G if G.dtype in (torch.float32, torch.float64) else G.float()
        pos_rows, neg_rows = work.clamp(min=0.0), work.clamp(max=0.0)
        pos, neg = pos_rows.sum(dim=-2), neg_rows.sum(dim=-2)
        magnitude = pos - neg
        nonzero = magnitude > 0
        P = 0.5 * (1.0 + torch.where(nonzero, (pos + neg) / torch.where(nonzero, magnitude, 1.0), 0.0))
        U = torch.rand(G.shape[-1], generator=self._generator, dtype=torch.float64)
        U = U.to(device=G.device, dtype=work.dtype)
        if self.leak is None:
            out = torch.where(P > U, pos, 0.0) + torch.where(P < U, neg, 0.0)
        else:
            leak = torch.tensor(self.leak, dtype=work.dtype, device=G.device).unsqueeze(-1)
            keep = 1.0 - leak
            out = (
                (leak * work).sum(dim=-2)
                + torch.where(P > U, (keep * pos_rows).sum(dim=-2), 0.0)
                + torch.where(P < U, (keep * neg_rows).sum(dim=-2), 0.0)
            )
        return out.to(G.dtype) if G.dtype in _HALF_DTYPES else out
