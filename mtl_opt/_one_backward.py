"""The one-backward path: methods whose update is ``Σ_i w_i ∇L_i`` with ``w`` from the losses.

Linear scalarization and the loss weightings (:class:`mtl_opt.LossWeighting`) declare
``kind = "loss"`` (so ``needs_jacobian`` is False); :func:`mtl_opt.mtl_backward` then asks the method for this step's
weights (``aggregator.jacobian_free_weights(losses, task_weights)``) and runs ONE backward pass
of the weighted sum, built exactly as a user would write it::

    (w * torch.stack(losses)).sum().backward()      # w detached, in the losses' dtype

so every parameter's ``.grad`` is bit for bit what that line gives (also hooks that only
``.backward()`` fires run, and sparse embeddings get sparse gradients, as with ``.backward()``).
No Jacobian, Gramian or per-task gradient is computed: the result's ``gramian``, ``grad_norms``
and ``cosines`` are ``None`` (take :func:`mtl_opt.problems.rrg.diagnostics`-style per-task
gradients separately when you want them), ``weights`` and ``loss_weights`` are ``w`` and
``losses`` the loss values. ``direction`` is the shared parameters' new ``.grad`` concatenated,
available when they had no ``.grad`` before the call and were not modified since.

What parameters receive matches the Jacobian path with ``h = w``: shared and other parameters
``Σ_i w_i ∇L_i``; task group ``i`` ``w_i ∇L_i``, which is what the one backward pass gives as
long as no other task's loss reaches the group. When one does, the step falls back to the
Jacobian path with the same weights (``LinearScalarization(w)``), so a group still receives
only its own task's gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtl_opt._validation import _non_finite
from mtl_opt.aggregator import GradientAggregator
from mtl_opt._backward.graph import _per_task_roots, _reachable_leaves, _unreached_targets
from mtl_opt._backward.result import MTLBackwardResult, _BlockedAggregationResult

__all__ = ["weighted_sum_backward"]


class _WeightedSumResult(_BlockedAggregationResult):
    """The aggregation of a one-backward step: weights ``w``, no Gramian; the direction is the
    shared ``.grad`` pieces when they were written fresh by this call."""

    def __repr__(self) -> str:
        return f"AggregationResult(direction=<in .grad>, weights={self.weights!r}, gramian=None)"

    @property  # type: ignore[override]
    def direction(self) -> Tensor:  # noqa: D401
        """The shared parameters' ``.grad`` written by this call, concatenated."""
        if self._pieces is None:
            raise RuntimeError(
                "this step ran one backward pass of Σ w_i L_i, which was added to .grad tensors "
                "that already held gradients, so the step's own direction was never formed; "
                "read the shared parameters' .grad (or zero them before the step)"
            )
        return super().direction


def weighted_sum_backward(
    aggregator: GradientAggregator,
    loss_list: list[Tensor],
    L: Tensor,
    losses: object,
    values: Tensor,
    shared: list[tuple[str, Tensor]],
    groups: list[list[tuple[str, Tensor]]],
    task_weights: object | None,
    retain_graph: bool,
) -> MTLBackwardResult | Tensor:
    """One backward pass of ``Σ w_i L_i``; returns the diagnostics, or only ``w`` when a task
    group is reached by another task's loss (the caller then takes the Jacobian path with
    these fixed weights). Inputs were validated by :func:`mtl_opt.mtl_backward`."""
    leaves = _reachable_leaves(loss_list)
    reached = {id(p) for p in leaves}
    for name, p in shared:
        if id(p) not in reached:
            raise ValueError(f"{name} is not reached by any loss: shared parameters must be used "
                             "to compute the losses")
    tw = None if task_weights is None else torch.as_tensor(task_weights, dtype=torch.float64)
    if any(groups) and _foreign_loss_reaches_a_group(loss_list, L, losses, groups):
        return aggregator.jacobian_free_weights(values, tw)
    w = aggregator.jacobian_free_weights(values, tw)
    fresh = all(p.grad is None for _, p in shared)
    had_grad = [p.grad is not None for p in leaves]
    stacked = L if isinstance(losses, Tensor) else torch.stack(loss_list)
    (w.to(device=stacked.device, dtype=stacked.dtype) * stacked).sum().backward(
        retain_graph=retain_graph)
    _check_written_gradients(leaves, had_grad, shared, groups)
    agg = _WeightedSumResult([p.grad for _, p in shared] if fresh else [], w, None)  # type: ignore[arg-type]
    if fresh:
        agg._freeze_versions()
    else:
        object.__setattr__(agg, "_pieces", None)
    return MTLBackwardResult(
        aggregation=agg, losses=values, loss_weights=w, gramian=None, grad_norms=None,
        cosines=None, batched=False, fallback_reason=None, level="parameters",
    )


def _check_written_gradients(
    leaves: list[Tensor],
    had_grad: list[bool],
    shared: list[tuple[str, Tensor]],
    groups: list[list[tuple[str, Tensor]]],
) -> None:
    """Every gradient the backward pass wrote is finite; else clear the ``.grad`` it created
    and raise naming the parameter (one sum per gradient, one host sync: see
    :func:`mtl_opt._validation.check_gradients`).

    Unlike the Jacobian path, one backward pass writes before it can check: a ``.grad`` that
    held a gradient before the call keeps the non-finite sum (the message says so); every
    ``.grad`` the call created is reset to ``None``. Either way the error comes before any
    optimizer step.
    """
    written = [(i, p.grad) for i, p in enumerate(leaves) if p.grad is not None]
    bad = _non_finite([g for _, g in written])
    if not bad:
        return
    names = {id(p): f"shared parameter {name}" for name, p in shared}
    for i, group in enumerate(groups):
        names.update({id(p): f"task {i} parameter {name}, from the loss of task {i}" for name, p in group})
    first = leaves[written[bad[0]][0]]
    where = names.get(id(first), f"the parameter of shape {tuple(first.shape)} outside shared_params "
                                 "and task_params")
    kept = [leaves[written[b][0]] for b in bad if had_grad[written[b][0]]]
    for p, had in zip(leaves, had_grad):
        if not had:
            p.grad = None
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    note = (f"; {len(kept)} of them held a gradient before this call and now hold the non-finite "
            "sum" if kept else "; the .grad tensors this call created were cleared")
    raise ValueError(
        f"the gradient of {where}{more} is not finite (NaN or inf) although the losses are{note}. "
        "Look for an operation whose derivative is infinite at the current values (sqrt or log "
        "at 0, division by zero) or rescale the losses"
    )


def _foreign_loss_reaches_a_group(
    loss_list: list[Tensor], L: Tensor, losses: object, groups: list[list[tuple[str, Any]]]
) -> bool:
    roots = _per_task_roots(loss_list, L, losses)
    for j, root in enumerate(roots):
        targets = {id(p): name for i, g in enumerate(groups) if i != j for name, p in g}
        if targets and len(_unreached_targets(root, targets)) < len(targets):
            return True
    return False
