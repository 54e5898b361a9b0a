"""Linear scalarization: the weighted sum of task gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_opt._validation import check_task_vector
from mtl_opt.aggregator import AggregationResult, GramianAggregator, combine_rows
from mtl_opt.registry import register_aggregator


@register_aggregator("ls")
class LinearScalarization(GramianAggregator):
    """Linear scalarization (LS): ``d = Σ_i w_i g_i``.

    The baseline every multi-task paper compares against; with all-ones weights it is the gradient
    of the summed loss, so it sets the library's scale convention (directions are on the scale of
    the *sum* of task gradients).

    It needs no Gramian: ``aggregate(G)`` is one pass over ``G`` (its ``gramian`` is ``None``).
    It needs no Jacobian either (``kind = "loss"``): :func:`mtl_opt.mtl_backward` runs
    one backward pass of ``Σ w_i L_i`` and reports no Gramian.

    Args:
        weights: the ``w_i`` (length K, finite); ``None`` means all ones. A call's
            ``task_weights=`` overrides them for that call.
    """

    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py
    accepts_task_weights = True
    kind = "loss"  # w from the call context alone; its own _aggregate still returns wᵀG

    def __init__(self, weights: Sequence[float] | Tensor | None = None) -> None:
        if weights is not None:
            weights = check_task_vector(weights, None, "LinearScalarization weights").tolist()
        # Stored under another name than the keyword: ``weights`` is the public method
        # GramianAggregator.weights(M) (β for a Gramian), which an attribute would shadow.
        self.weights_ = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self.scalarization_weights: list[float] | None = weights

    def hyperparameters(self) -> dict[str, Any]:
        """``{"weights": w}`` (the constructor keyword; ``None`` means all ones)."""
        return {"weights": self.scalarization_weights}

    def loss_weights(self, n_tasks: int) -> Tensor | None:
        """``w``: the weights that parameters outside the Jacobian apply to the losses."""
        return self.weights_  # the caller checks its length against n_tasks

    def jacobian_free_weights(self, losses: Tensor, task_weights: Tensor | None = None) -> Tensor:
        """``w`` (or the call's ``task_weights``): the update reads no Jacobian, so
        :func:`mtl_opt.mtl_backward` runs one backward pass of ``Σ w_i L_i``."""
        _, weights_t = self._check_context(int(losses.numel()), None, task_weights)
        return self._weights_for(int(losses.numel()), weights_t)

    def _aggregate(
        self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None
    ) -> AggregationResult:
        """``d = wᵀG`` in one pass over ``G``: LS needs no Gramian (``gramian`` is ``None``).

        Finiteness (of ``G`` too: a NaN or inf in ``G`` reaches the direction) is checked on the
        direction by ``aggregate`` (:func:`mtl_opt._validation.check_direction`).
        """
        beta = self._weights_for(G.shape[0], task_weights)
        return AggregationResult(direction=combine_rows(beta, G), weights=beta, gramian=None)

    def _aggregate_batch(
        self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None
    ) -> Tensor:
        w = self._weights_for(G.shape[1], task_weights)
        if G.dtype in (torch.float16, torch.bfloat16):
            direction = torch.einsum("k,bkd->bd", w.to(device=G.device, dtype=torch.float32), G.float())
            out = direction.to(G.dtype)
        else:
            out = torch.einsum("k,bkd->bd", w.to(device=G.device, dtype=G.dtype), G)
        return out  # checked finite by aggregate_batch

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        return self._weights_for(M.shape[0], task_weights)

    def _weights_for(self, K: int, task_weights: Tensor | None) -> Tensor:
        w = task_weights if task_weights is not None else self.weights_
        if w is None:
            return torch.ones(K, dtype=torch.float64)
        if w.numel() != K:
            raise ValueError(f"LinearScalarization has {w.numel()} weights but there are {K} tasks")
        return w.clone()

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        # The weights do not depend on M: one row, repeated (no loop over the batch).
        return self._weights_for(M.shape[1], task_weights).expand(M.shape[0], -1).clone()

