"""What :func:`mtl_opt.mtl_backward` returns: :class:`MTLBackwardResult`, the blocked
aggregation result whose direction is assembled on first access, and the Gramian's diagnostics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mtl_opt.aggregator import AggregationResult

__all__ = ["MTLBackwardResult", "gramian_diagnostics"]


@dataclass(frozen=True)
class MTLBackwardResult:
    """Diagnostics of one :func:`mtl_backward` call (all small CPU tensors, float64).

    Attributes:
        aggregation: what the aggregator returned (direction, weights β, Gramian).
        losses: the K loss values.
        loss_weights: ``h``, the weights non-shared parameters received (see module docstring).
        gramian: ``M = G Gᵀ`` of the Jacobian that was aggregated (of ``Z`` with ``features=``);
            ``None`` on the one-backward path (LS and loss weightings build no Jacobian; see
            :mod:`mtl_opt._one_backward`).
        grad_norms: ``‖g_i‖ = √M_ii`` per task (``None`` when ``gramian`` is).
        cosines: ``M_ij / (‖g_i‖ ‖g_j‖)``; 0 where a norm is 0 (so never NaN); ``None`` when
            ``gramian`` is.
        batched: whether the per-task gradients came from one batched autograd call.
        fallback_reason: why the batched call was abandoned (``parallel="auto"``), else None.
        level: ``"parameters"`` or ``"features"`` (representation-level, MGDA-UB).
        factored_params: how many shared linear, convolution and embedding weights took their Gramian share and update
            from their layer's inputs and output gradients instead of Jacobian rows
            (``factor_linear``); 0 when none did.
    """

    aggregation: AggregationResult
    losses: Tensor
    loss_weights: Tensor
    gramian: Tensor | None
    grad_norms: Tensor | None
    cosines: Tensor | None
    batched: bool
    fallback_reason: str | None
    level: Literal["parameters", "features"]
    factored_params: int = 0

    @property
    def direction(self) -> Tensor:
        """The aggregated direction (flat, over the shared parameters or the features).

        For a :class:`GramianAggregator` at the parameters it is concatenated from the shared
        parameters' pieces on first access, and raises ``RuntimeError`` if their ``.grad``
        (which may be those pieces) was modified in place before (see the module docstring).
        """
        return self.aggregation.direction

    @property
    def weights(self) -> Tensor | None:
        """The aggregator's coefficients β (``None`` for non-Gramian methods)."""
        return self.aggregation.weights

    def __repr__(self) -> str:
        def fmt(t: Tensor | None) -> str:
            return "None" if t is None else "[" + ", ".join(f"{v:.4g}" for v in t.tolist()) + "]"

        return (
            f"MTLBackwardResult(level={self.level!r}, batched={self.batched}, "
            f"losses={fmt(self.losses)}, weights={fmt(self.weights)}, "
            f"grad_norms={fmt(self.grad_norms)})"
        )


def gramian_diagnostics(M: Tensor) -> tuple[Tensor, Tensor]:
    """``‖g_i‖ = √M_ii`` and the cosines ``M_ij / (‖g_i‖ ‖g_j‖)`` (0 where a norm is 0)."""
    norms = torch.sqrt(torch.clamp(torch.diagonal(M), min=0.0))
    outer = norms[:, None] * norms[None, :]
    cosines = torch.where(outer > 0, M / torch.where(outer > 0, outer, torch.ones_like(outer)),
                          torch.zeros_like(M))
    return norms, cosines


class _BlockedAggregationResult(AggregationResult):
    """An :class:`AggregationResult` whose flat ``direction`` is assembled on first access.

    On the blocked path each shared parameter's piece ``βᵀ G_j`` is written to its ``.grad``
    (without a copy when it had none), so the flat direction is only concatenated when someone
    reads it. The pieces may then be the parameters' ``.grad`` tensors: reading ``direction``
    after they were modified in place (``clip_grad_norm_``, a later accumulation,
    ``zero_grad(set_to_none=False)``) raises instead of returning the modified values.
    """

    def __init__(self, pieces: list[Tensor], weights: Tensor, gramian: Tensor) -> None:
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "gramian", gramian)
        object.__setattr__(self, "_pieces", pieces)
        object.__setattr__(self, "_versions", None)
        object.__setattr__(self, "_flat", None)

    def __repr__(self) -> str:  # never assembles (nor refuses) the direction
        n = sum(t.numel() for t in self._pieces) if self._flat is None else self._flat.numel()
        return (
            f"AggregationResult(direction=<{n} values, blocked>, weights={self.weights!r}, "
            f"gramian={self.gramian!r})"
        )

    def _freeze_versions(self) -> None:
        object.__setattr__(self, "_versions", [t._version for t in self._pieces])

    @property  # type: ignore[override]
    def direction(self) -> Tensor:  # noqa: D401
        """The aggregated direction (d,), concatenated from the per-parameter pieces."""
        if self._flat is None:
            versions = self._versions
            if versions is not None and any(
                t._version != v for t, v in zip(self._pieces, versions)
            ):
                raise RuntimeError(
                    "the direction of this mtl_backward call is no longer available: its pieces "
                    "are the shared parameters' .grad tensors, which were modified in place "
                    "since (gradient clipping, a later accumulation or zero_grad("
                    "set_to_none=False)); read result.direction before modifying .grad"
                )
            flat = torch.cat([t.reshape(-1) for t in self._pieces])
            object.__setattr__(self, "_flat", flat)
            object.__setattr__(self, "_pieces", [])
        return self._flat
