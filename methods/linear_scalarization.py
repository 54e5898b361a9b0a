"""Linear scalarization: the weighted sum of task gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_opt._validation import check_task_vector
from mtl_opt.aggregator import GramianAggregator
from mtl_opt.registry import register_aggregator


@register_aggregator("ls")
class LinearScalarization(GramianAggregator):
    """Linear scalarization (LS): ``d = Σ_i w_i g_i``.

    The baseline every multi-task paper compares against; with all-ones weights it is the gradient
    of the summed loss, so it sets the library's scale convention (directions are on the scale of
    the *sum* of task gradients).

    Args:
        weights: the ``w_i`` (length K, finite); ``None`` means all ones. A call's
            ``task_weights=`` overrides them for that call.
    """

    accepts_task_weights = True

    def __init__(self, weights: Sequence[float] | Tensor | None = None) -> None:
        if weights is not None:
            n = len(weights)
            if n == 0:
                raise ValueError("LinearScalarization: weights must not be empty")
            check_task_vector(weights, n, "LinearScalarization weights")
            weights = [float(w) for w in weights]
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

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        K = M.shape[0]
        w = task_weights if task_weights is not None else self.weights_
        if w is None:
            return torch.ones(K, dtype=torch.float64)
        if w.numel() != K:
            raise ValueError(f"LinearScalarization has {w.numel()} weights but there are {K} tasks")
        return w.clone()

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        # The weights do not depend on M: one row, repeated (no loop over the batch).
        return self._weights(M[0], losses=None, task_weights=task_weights).expand(M.shape[0], -1).clone()
