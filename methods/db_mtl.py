"""DB-MTL: dual-balancing multi-task learning (Lin et al., 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.aggregator import _HALF_DTYPES, AggregationResult, GradientAggregator
from mtl_opt.methods._state import (
    checked_counter,
    checked_state,
    checked_tensor,
    clone_or_none,
)
from mtl_opt.registry import register_aggregator

_KEYS = ("step", "buffer", "batch_step", "batch_buffer")


@register_aggregator("db_mtl")
class DBMTL(GradientAggregator):
    """DB-MTL (Lin, Ye, Zhang, Kwok, Zhang): loss-scale and gradient-magnitude balancing.

    "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029 (2023); equations and defaults of
    the authors' implementation (LibMTL's ``DB_MTL``, ``--DB_beta 0.9 --DB_beta_sigma 0``).

    1. Loss-scale balancing: every task minimises ``log(L_i + ε)``, whose gradient is
       ``h_i = g_i / (L_i + ε)`` (``g_i`` the row of ``G``).
    2. An exponential moving average of those gradients, at call ``t = 1, 2, ...``::

           β_t = β / t^σ,      ĝ_i ← β_t ĝ_i + (1 − β_t) h_i      (ĝ_i = 0 before the first call)

    3. Gradient-magnitude balancing: every averaged gradient is rescaled to the largest norm::

           d = Σ_i  max_j ‖ĝ_j‖ / (‖ĝ_i‖ + ε) · ĝ_i

    Not a Gramian weighting: the moving average keeps a (K, d) buffer of past gradients. The
    buffer lives on ``G``'s device in ``G``'s dtype (float32 for half-precision Jacobians, whose
    directions are checked to fit); the norms are taken in float64 (float32 squares of tiny or
    huge gradients would leave its range). A call with another shape, dtype or device raises
    until :meth:`reset`.

    The losses are required (``losses=...``; :func:`mtl_opt.mtl_backward` passes them) and must
    be non-negative (the method takes their logarithm).

    State (``state_dict``): the call counter and the buffer of single calls and, separately,
    of batched calls (one buffer per batch entry).

    Args:
        beta: ``β`` in ``[0, 1)``, the moving average's weight of the past.
        beta_sigma: ``σ ≥ 0``, the decay exponent of ``β_t = β / t^σ`` (0: constant ``β``).
        eps: ``ε > 0`` of the logarithm and of the norm ratio.
    """

    state = "tracked"
    properties = frozenset({"permutation_invariant"})  # checked in tests/test_method_properties.py
    uses_losses = True
    requires_losses = True

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8) -> None:
        self.beta = check_range("beta", beta, low=0.0, high=1.0, high_inclusive=False, owner="DBMTL")
        self.beta_sigma = check_range("beta_sigma", beta_sigma, low=0.0, owner="DBMTL")
        self.eps = check_range("eps", eps, low=0.0, low_inclusive=False, owner="DBMTL")
        self.reset()

    # ---------------------------------------------------------------------------- state
    def reset(self) -> None:
        self._step = 0
        self._buffer: Tensor | None = None  # (1, K, d)
        self._batch_step = 0
        self._batch_buffer: Tensor | None = None  # (B, K, d)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "buffer": clone_or_none(self._buffer),
            "batch_step": self._batch_step,
            "batch_buffer": clone_or_none(self._batch_buffer),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checked_state("DBMTL", state, _KEYS)
        step = checked_counter("DBMTL", "step", state["step"])
        batch_step = checked_counter("DBMTL", "batch_step", state["batch_step"])
        buffer = checked_tensor("DBMTL", "buffer", state["buffer"], ndim=3)
        batch_buffer = checked_tensor("DBMTL", "batch_buffer", state["batch_buffer"], ndim=3)
        self._step, self._buffer = step, buffer
        self._batch_step, self._batch_buffer = batch_step, batch_buffer

    # ---------------------------------------------------------------------------- direction
    def _aggregate(self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> AggregationResult:
        assert losses is not None  # requires_losses
        self._buffer, direction = self._advance(G[None], losses[None], self._buffer, self._step + 1)
        self._step += 1
        return AggregationResult(direction=direction[0])

    def _aggregate_batch(self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        assert losses is not None
        self._batch_buffer, direction = self._advance(G, losses, self._batch_buffer, self._batch_step + 1)
        self._batch_step += 1
        return direction

    def _advance(self, G: Tensor, losses: Tensor, buffer: Tensor | None, t: int) -> tuple[Tensor, Tensor]:
        """One step on a batch: ``G`` (B, K, d), ``losses`` (B, K) float64 CPU, ``t`` ≥ 1."""
        if bool((losses < 0).any()):
            raise ValueError(
                f"DBMTL takes the logarithm of the losses, which must be non-negative; got {losses.tolist()}"
            )
        work = G if G.dtype in (torch.float32, torch.float64) else G.float()
        if buffer is not None and (
            buffer.shape != work.shape or buffer.dtype != work.dtype or buffer.device != work.device
        ):
            raise ValueError(
                f"DBMTL keeps a moving average of shape {tuple(buffer.shape)} ({buffer.dtype}, "
                f"{buffer.device}) and now gets Jacobians of shape {tuple(work.shape)} ({work.dtype}, "
                f"{work.device}); call reset() between runs"
            )
        scale = (1.0 / (losses + self.eps)).to(device=work.device, dtype=work.dtype)
        h = work * scale.unsqueeze(-1)
        beta_t = self.beta / t**self.beta_sigma
        # β_t ĝ + (1 − β_t) h as one fused pass (lerp); differentiable w.r.t. G through h, while
        # the coefficients below are constants.
        new = (1.0 - beta_t) * h if buffer is None else torch.lerp(buffer, h, 1.0 - beta_t)
        # Norms in float64: float32 squares of tiny or huge gradients leave float32's range.
        norms = torch.linalg.vector_norm(new.detach(), dim=-1, dtype=torch.float64)  # (B, K)
        alpha = norms.max(dim=-1, keepdim=True).values / (norms + self.eps)
        direction = torch.einsum("bk,bkd->bd", alpha.to(new.dtype), new)
        if G.dtype in _HALF_DTYPES:
            return new.detach(), direction.to(G.dtype)
        return new.detach(), direction
