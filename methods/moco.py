"""MoCo: stochastic multi-objective gradient correction (Fernando et al., ICLR 2023)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_opt._validation import check_choice, check_range, gramian_of
from mtl_opt.aggregator import _HALF_DTYPES, AggregationResult, GradientAggregator
from mtl_opt.methods._state import (
    checked_counter,
    checked_state,
    checked_tensor,
    clone_or_none,
)
from mtl_opt.registry import register_aggregator

_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
_KEYS = ("step", "y", "lam", "batch_step", "batch_y", "batch_lam")


@register_aggregator("moco")
class MoCo(GradientAggregator):
    """MoCo (Fernando, Shen, Liu, Chaudhury, Murugesan, Chen): tracked Jacobian and weights.

    "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach",
    ICLR 2023, Algorithm 1; defaults of the authors' implementation (``beta_moco = gamma_moco =
    rho_moco = 0.1``, no gradient normalisation). At call ``k = 1, 2, ...`` with the stochastic
    Jacobian ``G_k``::

        Y_k = Y_{k−1} − β_k (Y_{k−1} − G_k)                 (Y_0 = 0: tracks the true Jacobian)
        Ŷ_k = diag(1/s) Y_k                                  (optional normalisation, see below)
        λ_k = Π_Δ(λ_{k−1} − γ_k (Ŷ_k Ŷ_kᵀ + ρ I) λ_{k−1})    (λ_0 = 1/K; Π_Δ the Euclidean
                                                              projection onto the simplex)
        d   = Ŷ_kᵀ λ_k

    with ``β_k = β / k^{σ_β}``, ``γ_k = γ / k^{σ_γ}`` (``σ = 0``, constant steps, as in the
    authors' experiments; LibMTL's ``MoCo`` uses ``σ = 0.5``). The normalisation ``s_i``
    (the authors' ``moco_gn``): ``"none"`` ``s_i = 1``; ``"l2"`` ``s_i = ‖y_i‖``; ``"loss"``
    ``s_i = L_i``; ``"loss+"`` ``s_i = L_i ‖y_i‖`` (a zero row keeps ``s_i = 1``). The paper's
    optional projection of ``Y`` onto a bounded set is not applied, as in the authors' code.

    Differences from LibMTL's ``MoCo``, which is a different variant: it normalises each new
    gradient to ``L_i g_i/‖g_i‖`` before tracking and replaces ``Π_Δ`` by a softmax.

    Not a Gramian weighting: ``Y`` is a (K, d) state (on ``G``'s device, in ``G``'s dtype,
    float32 for half-precision Jacobians, whose directions are checked to fit). ``Ŷ Ŷᵀ`` (from
    ``Y Yᵀ`` formed like every Gramian of this library: float64, range-checked) and ``λ`` are
    float64 on the CPU.

    State (``state_dict``): the call counter, ``Y`` and ``λ`` of single calls and, separately,
    of batched calls (one of each per batch entry).

    Args:
        beta: ``β`` in ``(0, 1]``, the tracking step.
        gamma: ``γ > 0``, the step of the weights.
        rho: ``ρ ≥ 0``, the ℓ2 regularisation of the weights' sub-problem.
        normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``.
        beta_sigma: ``σ_β ≥ 0``, decay exponent of ``β_k``.
        gamma_sigma: ``σ_γ ≥ 0``, decay exponent of ``γ_k``.
    """

    state = "tracked"
    properties = frozenset({"permutation_invariant"})  # checked in tests/test_method_properties.py

    def __init__(
        self,
        beta: float = 0.1,
        gamma: float = 0.1,
        rho: float = 0.1,
        normalization: str = "none",
        beta_sigma: float = 0.0,
        gamma_sigma: float = 0.0,
    ) -> None:
        owner = "MoCo"
        self.beta = check_range("beta", beta, low=0.0, high=1.0, low_inclusive=False, owner=owner)
        self.gamma = check_range("gamma", gamma, low=0.0, low_inclusive=False, owner=owner)
        self.rho = check_range("rho", rho, low=0.0, owner=owner)
        self.normalization = check_choice("normalization", normalization, _NORMALIZATIONS, owner=owner)
        self.beta_sigma = check_range("beta_sigma", beta_sigma, low=0.0, owner=owner)
        self.gamma_sigma = check_range("gamma_sigma", gamma_sigma, low=0.0, owner=owner)
        self.requires_losses = self.normalization in ("loss", "loss+")
        self.uses_losses = self.requires_losses
        self.reset()

    # ---------------------------------------------------------------------------- state
    def reset(self) -> None:
        self._step = 0
        self._y: Tensor | None = None  # (1, K, d)
        self._lam: Tensor | None = None  # (1, K) float64
        self._batch_step = 0
        self._batch_y: Tensor | None = None  # (B, K, d)
        self._batch_lam: Tensor | None = None  # (B, K)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "y": clone_or_none(self._y),
            "lam": clone_or_none(self._lam),
            "batch_step": self._batch_step,
            "batch_y": clone_or_none(self._batch_y),
            "batch_lam": clone_or_none(self._batch_lam),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checked_state("MoCo", state, _KEYS)
        step = checked_counter("MoCo", "step", state["step"])
        batch_step = checked_counter("MoCo", "batch_step", state["batch_step"])
        y = checked_tensor("MoCo", "y", state["y"], ndim=3)
        lam = checked_tensor("MoCo", "lam", state["lam"], ndim=2)
        batch_y = checked_tensor("MoCo", "batch_y", state["batch_y"], ndim=3)
        batch_lam = checked_tensor("MoCo", "batch_lam", state["batch_lam"], ndim=2)
        for name, a, b in (("", y, lam), ("batch_", batch_y, batch_lam)):
            if (a is None) != (b is None) or (a is not None and b is not None and a.shape[:2] != b.shape):
                raise ValueError(f"MoCo state {name}y and {name}lam do not match")
        self._step, self._y, self._lam = step, y, lam
        self._batch_step, self._batch_y, self._batch_lam = batch_step, batch_y, batch_lam

    # ---------------------------------------------------------------------------- direction
    def _aggregate(self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> AggregationResult:
        y, lam, direction = self._advance(
            G[None], None if losses is None else losses[None], self._y, self._lam, self._step + 1
        )
        self._y, self._lam = y, lam
        self._step += 1
        return AggregationResult(direction=direction[0], weights=None)

    def _aggregate_batch(self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        y, lam, direction = self._advance(G, losses, self._batch_y, self._batch_lam, self._batch_step + 1)
        self._batch_y, self._batch_lam = y, lam
        self._batch_step += 1
        return direction

    def _advance(
        self, G: Tensor, losses: Tensor | None, y: Tensor | None, lam: Tensor | None, k: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One step on a batch ``G`` (B, K, d); returns the new ``Y``, ``λ`` and directions."""
        work = G if G.dtype in (torch.float32, torch.float64) else G.float()
        B, K = work.shape[0], work.shape[1]
        if y is not None and (y.shape != work.shape or y.dtype != work.dtype or y.device != work.device):
            raise ValueError(
                f"MoCo tracks a Jacobian of shape {tuple(y.shape)} ({y.dtype}, {y.device}) and now "
                f"gets shape {tuple(work.shape)} ({work.dtype}, {work.device}); call reset() between runs"
            )
        if losses is not None and self.requires_losses and bool((losses <= 0).any()):
            raise ValueError(
                f"MoCo with normalization={self.normalization!r} divides by the losses, which must be "
                f"positive; got {losses.tolist()}"
            )
        beta_k = self.beta / k**self.beta_sigma
        gamma_k = self.gamma / k**self.gamma_sigma
        # Y_k is differentiable w.r.t. G_k (the current Jacobian's share); the state is detached.
        new_y = beta_k * work if y is None else torch.lerp(y, work, beta_k)  # one fused pass
        yd = new_y.detach()
        # Gramians of Y in float64 with the library's range checks (float32 squares of tiny or
        # huge rows leave float32's range); the normalisation acts on them as diag(1/s) M diag(1/s).
        M = torch.stack([gramian_of(yd[b]) for b in range(B)])
        inv_s = self._scales(torch.diagonal(M, dim1=-2, dim2=-1), losses)  # (B, K)
        M = M * inv_s.unsqueeze(-1) * inv_s.unsqueeze(-2)
        lam_prev = torch.full((B, K), 1.0 / K, dtype=torch.float64) if lam is None else lam
        step = (M @ lam_prev.unsqueeze(-1)).squeeze(-1) + self.rho * lam_prev
        new_lam = project_onto_simplex(lam_prev - gamma_k * step)
        coef = (new_lam * inv_s).to(device=work.device, dtype=work.dtype)  # d = Σ λ_i y_i / s_i
        direction = torch.einsum("bk,bkd->bd", coef, new_y)
        if G.dtype in _HALF_DTYPES:
            direction = direction.to(G.dtype)
        return yd, new_lam, direction

    def _scales(self, sq_norms: Tensor, losses: Tensor | None) -> Tensor:
        """``1/s_i`` (B, K), float64 on the CPU, from the squared row norms of ``Y``."""
        s = torch.ones_like(sq_norms)
        if self.normalization in ("l2", "loss+"):
            norms = torch.sqrt(sq_norms)
            s = torch.where(norms > 0, norms, 1.0)
        if self.normalization in ("loss", "loss+"):
            assert losses is not None  # requires_losses
            s = s * losses
        return 1.0 / s


def project_onto_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` (B, K) onto the probability simplex.

    The sort-based algorithm (Held, Wolfe & Crowder 1974; Duchi et al. 2008): with ``u`` the
    row sorted in decreasing order and ``ρ`` the largest ``j`` with
    ``u_j − (Σ_{i≤j} u_i − 1)/j > 0``, the projection is ``max(v − θ, 0)`` with
    ``θ = (Σ_{i≤ρ} u_i − 1)/ρ``.

    The projection does not change when a constant is added to a row (the simplex fixes the
    sum), so each row is first shifted to a maximum of 0: the cumulative sums then stay on the
    scale of the entries that matter (within 1 of the maximum) instead of cancelling at the
    row's own scale (a λ step ``γ(YYᵀ + ρI)λ`` of 1e39 used to leave λ off the simplex).
    """
    a = v.numpy()
    a = a - a.max(axis=-1, keepdims=True)
    u = -np.sort(-a, axis=-1)
    css = np.cumsum(u, axis=-1) - 1.0
    j = np.arange(1, a.shape[-1] + 1)
    positive = u - css / j > 0
    rho = a.shape[-1] - 1 - np.argmax(positive[:, ::-1], axis=-1)  # last True (j = 1 always is)
    theta = css[np.arange(a.shape[0]), rho] / (rho + 1)
    return torch.from_numpy(np.maximum(a - theta[:, None], 0.0))
