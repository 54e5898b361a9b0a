"""Stage 2 of :func:`mtl_opt.mtl_backward`: the per-task gradients, as Jacobian blocks.

One batched autograd call (``vmap`` over ``grad_outputs = I_K``) gives every input K rows, kept as
blocks ``G_j`` (K × n_j); with factored linear layers (:mod:`mtl_opt._layerwise`, reached only
through ``plan_linear_layers``, ``hooked_layers`` and the plan the blocks carry) the call stops at
those layers' outputs and returns their output gradients ``Δ`` instead. The per-task loop (one
backward pass per task) writes the rows straight into ``G``; it is the fallback of the batched
call and the path of the representation level. Heads (task groups, other parameters) get their
``h``-weighted combination here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mtl_opt._backward.inputs import BackwardCall, Heads, Parallel
from mtl_opt._layerwise import LayerPlan, hooked_layers, plan_linear_layers
from mtl_opt._task_split import split_task_rows
from mtl_opt.aggregator import is_gramian_weighting

__all__ = ["BatchedJacobianFallbackWarning", "jacobian_blocks"]


class BatchedJacobianFallbackWarning(RuntimeWarning):
    """The batched Jacobian call failed and K separate backward passes were used instead."""


def jacobian_blocks(call: BackwardCall, heads: Heads) -> _TaskGrads:
    """The K rows of every input the Jacobian is taken over (shared parameters or features), as
    blocks or ``G``, the heads' combined updates, checked: every given parameter reached, no hook
    that changed a factored layer's output gradient."""
    plan = None
    if (
        call.level == "parameters" and call.factor_linear and call.K > 1
        and call.parallel is not False and is_gramian_weighting(call.aggregator)
    ):
        plan = plan_linear_layers(call.L, call.first, call.K)
        if call.sync is not None:
            plan = call.sync.layer_plan(plan, call.K)  # factored over all ranks' rows, or rows
    # At the features, "auto" takes one pass per task: each runs through its own head only.
    parallel = False if call.level == "features" and call.parallel == "auto" else call.parallel
    grads = _task_grads(
        call.loss_list, call.L, call.first, heads.params, heads.owners, call.h, parallel,
        call.retain_graph or call.level == "features", plan,
    )
    if call.sync is not None:
        call.sync.task_grads(grads, call.level)  # the global batch's Jacobian: averaged over ranks
    if grads.plan is not None and grads.deltas is not None:
        grads.n_factored = len(grads.plan.factored)
    # Every given parameter must be reached by some loss.
    for j, reached in enumerate(grads.first_reached):
        if not reached:
            if call.level == "parameters":
                raise ValueError(f"{call.shared[j][0]} is not reached by any loss: no task depends on it")
            raise ValueError(f"features #{j} is not reached by any loss")
    for name, update in zip(heads.names, grads.head):
        if update is None:
            raise ValueError(f"{name} is not reached by any loss")
    if grads.n_factored:
        assert grads.plan is not None and grads.deltas is not None
        hooked = hooked_layers(grads.plan, grads.deltas, dict(zip(grads.plan.rest, grads.blocks or [])))
        if hooked:
            raise RuntimeError(
                f"a hook on the output of the linear layer with bias {call.shared[hooked[0]][0]} "
                "changed its gradient (y.register_hook or a hook on its autograd node); "
                "factor_linear takes that layer's weight gradient from the gradient before such "
                "hooks, so pass factor_linear=False to mtl_backward (or MultiTaskOptimizer) for "
                "this model"
            )
    return grads


@dataclass
class _TaskGrads:
    """The per-task gradients, already in the shape the caller needs.

    ``G`` is the (K, d) Jacobian of the first inputs (shared parameters or features), with
    ``first_reached[j]`` telling whether any loss reaches first input ``j``; ``head[j]`` is the
    combined update of head input ``j`` (``h_i ∇L_i`` for a parameter of task ``i``'s group,
    ``Σ_i h_i ∇L_i`` for any other), or ``None`` when no loss reaches it.
    """

    G: Tensor | None
    first_reached: list[bool]
    head: list[Tensor | None]
    batched: bool
    fallback_reason: str | None
    blocks: list[Tensor] | None = None  # batched path: the (K, n_j) blocks, G not yet built
    # Factored linear layers (batched path): the plan, and each use's output gradients
    # (K, N_u, out_u); ``blocks`` then holds the rows of the plan's ``rest`` parameters only.
    plan: LayerPlan | None = None
    deltas: list[Tensor] | None = None
    # How many shared linear weights take their share from (X, Δ) instead of rows.
    n_factored: int = 0

    def map_rows(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Replace every per-task gradient this call holds (the Jacobian's rows, as blocks or
        ``G``, and the heads' combined updates) by ``fn`` of it: the one step between the
        Jacobian and the Gramian stages, e.g. a sum over processes (every quantity here is
        additive over the batch). Factored linear layers are not: their Gramian share
        ``Σ (Δ_i Δ_jᵀ) ⊙ (X Xᵀ)`` of a global batch is not the sum of the local ones, so a plan
        with factored layers refuses (``RuntimeError``); use ``factor_linear=False`` there."""
        if self.n_factored:
            raise RuntimeError(
                "the factored linear layers' Gramian is not additive over batches; compute "
                "the Jacobian with factor_linear=False to combine it across processes"
            )
        if self.blocks is not None:
            self.blocks = [fn(b) for b in self.blocks]
        if self.G is not None:
            self.G = fn(self.G)
        self.head = [None if g is None else fn(g) for g in self.head]

    def flat(self) -> Tensor:
        """``G`` (K, d), concatenating the blocks on first use (one copy of the Jacobian)."""
        if self.G is None and self.blocks is not None:
            self.G = torch.cat(self.blocks, dim=1)
            self.blocks = None
        assert self.G is not None
        return self.G


def _combine_head_rows(
    rows: list[Tensor | None], owners: list[int | None], h: Tensor, single: list[int | None] | None = None,
) -> list[Tensor | None]:
    out: list[Tensor | None] = []
    for row, owner, task in zip(rows, owners, single or [None] * len(rows)):
        if row is None:
            out.append(None)
        elif task is not None:  # task `task`'s gradient alone (mtl_opt._task_split)
            out.append(row * h[task].to(dtype=row.dtype, device=row.device) if owner in (None, task)
                       else torch.zeros_like(row))
        elif owner is None:
            out.append(torch.tensordot(h.to(dtype=row.dtype, device=row.device), row, dims=1))
        else:
            out.append(row[owner] * h[owner].to(dtype=row.dtype, device=row.device))
    return out


def _batched_grads(
    L: Tensor, first: list[Tensor], heads: list[Tensor], owners: list[int | None], h: Tensor,
    retain_graph: bool, plan: LayerPlan | None = None,
) -> _TaskGrads:
    """One vmapped autograd call with ``grad_outputs = I_K``: every input gets K rows.

    With a ``plan`` (factored linear layers), the call stops at the factored layers' outputs
    instead of asking for their weights, and returns those output gradients as ``deltas``.
    """
    K = L.shape[0]
    eye = torch.eye(K, dtype=L.dtype, device=L.device)
    firsts: list[Any] = first if plan is None else plan.inputs(first)
    split = split_task_rows(L, firsts + heads, retain_graph)  # each task's head once, unbatched
    if split is None:
        rows = torch.autograd.grad(
            L, firsts + heads, grad_outputs=eye, is_grads_batched=True,
            retain_graph=retain_graph, allow_unused=True,
        )
        single = None
    else:
        rows = [*split.as_rows(len(firsts), K), *split.rows[len(firsts):]]
        single = split.single[len(firsts):]
    rows = [g.to_dense() if g is not None and g.is_sparse else g for g in rows]
    first_rows, head_rows = rows[: len(firsts)], rows[len(firsts):]
    if plan is not None:
        n_edges = len(plan.uses)
        # An edge whose gradient is undefined (a backward that returns None for it) gets zeros.
        deltas = [
            D if D is not None else torch.zeros(
                K, u.X.shape[0], u.out, dtype=u.X.dtype, device=u.X.device
            )
            for D, u in zip(first_rows[:n_edges], plan.uses)
        ]
        rest_rows = first_rows[n_edges:]
        reached = [True] * len(first)
        for j, r in zip(plan.rest, rest_rows):
            reached[j] = r is not None
        blocks = [r.reshape(K, -1) for r in rest_rows] if all(reached) else None  # type: ignore[union-attr]
        return _TaskGrads(
            None, reached, _combine_head_rows(head_rows, owners, h, single), True, None, blocks,
            plan, deltas,  # type: ignore[arg-type]
        )
    reached = [r is not None for r in first_rows]
    blocks = None
    if all(reached):
        # Kept as blocks: a GramianAggregator never needs the concatenated G (see mtl_backward).
        blocks = [r.reshape(K, -1) for r in first_rows]  # type: ignore[union-attr]
    return _TaskGrads(None, reached, _combine_head_rows(head_rows, owners, h, single), True, None, blocks)


def _looped_grads(
    loss_list: list[Tensor], first: list[Tensor], heads: list[Tensor], owners: list[int | None],
    h: Tensor, retain_graph: bool,
) -> _TaskGrads:
    """One backward pass per task; rows go straight into G, head updates are summed as they come
    (peak memory: one task's gradients plus G)."""
    K = len(loss_list)
    sizes = [t.numel() for t in first]
    dtype = first[0].dtype
    for t in first[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    G = torch.zeros(K, sum(sizes), dtype=dtype, device=first[0].device)
    reached = [False] * len(first)
    head: list[Tensor | None] = [None] * len(heads)
    head_reached = [False] * len(heads)
    inputs = first + heads
    for i, loss in enumerate(loss_list):
        grads = torch.autograd.grad(
            loss, inputs, retain_graph=retain_graph or i < K - 1, allow_unused=True
        )
        offset = 0
        for j, (g, n) in enumerate(zip(grads[: len(first)], sizes)):
            if g is not None:
                reached[j] = True
                G[i, offset: offset + n].copy_((g.to_dense() if g.is_sparse else g).reshape(-1))
            offset += n
        for j, g in enumerate(grads[len(first):]):
            if g is None:
                continue
            head_reached[j] = True
            if owners[j] is not None and owners[j] != i:
                continue
            term = (g.to_dense() if g.is_sparse else g) * h[i].to(dtype=g.dtype, device=g.device)
            head[j] = term if head[j] is None else head[j] + term
        del grads
    for j, p in enumerate(heads):
        if head_reached[j] and head[j] is None:  # reached only by other tasks' losses
            head[j] = torch.zeros_like(p)
    return _TaskGrads(G, reached, [u if r else None for u, r in zip(head, head_reached)], False, None)


def _task_grads(
    loss_list: list[Tensor], L: Tensor, first: list[Tensor], heads: list[Tensor],
    owners: list[int | None], h: Tensor, parallel: Parallel, retain_graph: bool,
    plan: LayerPlan | None = None,
) -> _TaskGrads:
    K = len(loss_list)
    if K == 1 or parallel is False:
        try:
            return _looped_grads(loss_list, first, heads, owners, h, retain_graph)
        except RuntimeError as exc:
            _raise_if_stale_graph(exc)
            raise
    if parallel is True:
        try:
            return _batched_grads(L, first, heads, owners, h, retain_graph, plan)
        except (RuntimeError, NotImplementedError) as exc:
            _raise_if_stale_graph(exc)
            raise RuntimeError(
                f"the batched Jacobian failed (parallel=True): {_first_line(exc)}; use "
                "parallel='auto' or parallel=False to compute it with one backward pass per task"
            ) from exc
    try:
        return _batched_grads(L, first, heads, owners, h, retain_graph=True, plan=plan)
    except (RuntimeError, NotImplementedError) as exc:
        _raise_if_stale_graph(exc)  # the per-task loop would fail the same way
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        warnings.warn(
            f"the batched Jacobian failed ({reason}); computed it with {K} separate backward "
            "passes instead (same result, slower). Pass parallel=False to skip the batched "
            "attempt.",
            BatchedJacobianFallbackWarning,
            stacklevel=4,  # the caller of mtl_backward
        )
        result = _looped_grads(loss_list, first, heads, owners, h, retain_graph)
        result.fallback_reason = reason
        return result


_STALE_GRAPH_CAUSES = {
    "backward through the graph a second time": "its graph was already freed by an earlier "
    "backward pass (mtl_backward, MultiTaskOptimizer.step/backward or .backward() on the same "
    "losses)",
    "modified by an inplace operation": "a tensor it saved was modified in place since the "
    "forward pass (typically the parameters, by an optimizer step taken after these losses "
    "were computed)",
}


def _raise_if_stale_graph(exc: BaseException) -> None:
    """Re-raise autograd's "graph freed" and "modified in place" errors with their cause.

    Both mean the losses cannot be differentiated again, whichever way the Jacobian is
    computed (batched or per task): the fix is a fresh forward pass per step.
    """
    text = str(exc)
    for marker, cause in _STALE_GRAPH_CAUSES.items():
        if marker in text:
            raise RuntimeError(
                f"these losses cannot be differentiated again: {cause}. Compute the losses "
                "with a fresh forward pass for every step (after the previous optimizer step); "
                "to take several gradients of the same losses before stepping, pass "
                "retain_graph=True to all but the last call"
            ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
