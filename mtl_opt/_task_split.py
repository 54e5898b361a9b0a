"""The batched Jacobian without batching the task heads: each task's own subgraph runs once.

``torch.autograd.grad(L, inputs, grad_outputs=I_K, is_grads_batched=True)`` runs the backward
pass of the *whole* graph K times (vectorised by ``vmap``), also through the parts that only one
loss reaches: a report decoder that only the report loss reads is differentiated for the
classification loss too, where its gradient is zero. In a multi-task model those task heads are
usually the larger part of the backward pass.

Split the graph by which losses reach each node. With ``m(v) ⊆ {1..K}`` the tasks whose loss
reaches node ``v``:

* ``P_i = {v : m(v) = {i}}``, task ``i``'s own subgraph (its head, its loss);
* ``S = {v : |m(v)| ≥ 2}``, the shared subgraph (the encoder);
* the frontier edges ``e`` of task ``i``, from a node of ``P_i`` into a node of ``S``.

The chain rule through the frontier gives, for every input ``θ`` below ``S``,

    ∇_θ L_i = Σ_e (∂z_e/∂θ)ᵀ ∇_{z_e} L_i

so the Jacobian rows are one batched backward pass through ``S`` alone, started at the frontier
edges with the K stacked per-task gradients ``[∇_{z_e} L_1; ...; ∇_{z_e} L_K]`` (zero for the
tasks whose head does not feed ``e``), after one ordinary backward pass through each ``P_i``
(``∇_{z_e} L_i`` and the gradients of the inputs inside ``P_i``). The work is the plain
backward pass of every head plus K passes through the shared part, instead of K passes through
everything; the result is the same to rounding (summation order).

Hooks keep their place: a tensor hook on a frontier tensor runs when the batched pass feeds
that node, as it did before; hooks inside a head see that head's own (single, unbatched)
gradient instead of a K-row batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = ["TaskRows", "split_task_rows"]

# benchmarks/bench_rrg.py turns this off for its "every task through every head" rows.
_SPLIT_HEADS = True


@dataclass
class TaskRows:
    """The per-task gradients of the requested inputs, in the order they were requested.

    ``rows[j]`` is either ``(K, *shape)`` (input ``j`` lies in the shared subgraph: one row per
    task) or, when ``single[j]`` is a task index ``i``, task ``i``'s own gradient ``(*shape)``
    (input ``j`` lies in task ``i``'s head: every other task's row is zero). ``None`` where no
    loss reaches the input (or its gradient is undefined).
    """

    rows: list[Tensor | None]
    single: list[int | None]

    def as_rows(self, n: int, K: int) -> list[Tensor | None]:
        """The first ``n`` inputs' gradients, each as K rows (a single task's gradient is
        placed in its row, the others are zeros)."""
        out: list[Tensor | None] = []
        for g, task in zip(self.rows[:n], self.single[:n]):
            if g is not None and task is not None:
                full = g.new_zeros((K, *g.shape), layout=torch.strided)
                full[task] = g
                g = full
            out.append(g)
        return out


def _task_masks(roots: list[tuple[Any, int]]) -> tuple[dict[int, int], dict[int, Any]]:
    """``masks[id(node)]``: the bit set of the tasks whose root reaches ``node``; ``nodes`` keeps
    each node referenced (so that ids stay unique while the masks are in use)."""
    masks: dict[int, int] = {}
    nodes: dict[int, Any] = {}
    for i, (root, _) in enumerate(roots):
        bit = 1 << i
        stack = [root]
        while stack:
            node = stack.pop()
            key = id(node)
            if masks.get(key, 0) & bit:
                continue
            masks[key] = masks.get(key, 0) | bit
            nodes[key] = node
            for child, _ in node.next_functions:
                if child is not None and not masks.get(id(child), 0) & bit:
                    stack.append(child)
    return masks, nodes


def _input_node(t: Tensor | GradientEdge, acc: dict[int, Any]) -> tuple[Any, int] | None:
    """The graph edge an input's gradient is read at: a leaf's accumulator, a non-leaf tensor's
    ``(grad_fn, output_nr)``, or the edge itself; None for a leaf outside the graph."""
    if isinstance(t, GradientEdge):
        return t.node, t.output_nr
    if t.grad_fn is not None:
        return t.grad_fn, t.output_nr
    node = acc.get(id(t))
    return None if node is None else (node, 0)


def _single_task(mask: int) -> int | None:
    """The task index when ``mask`` holds exactly one task."""
    if mask and not mask & (mask - 1):
        return mask.bit_length() - 1
    return None


def split_task_rows(
    L: Tensor, inputs: list[Tensor | GradientEdge], retain_graph: bool
) -> TaskRows | None:
    """What ``autograd.grad(L, inputs, grad_outputs=I_K, is_grads_batched=True,
    allow_unused=True)`` computes, with each task's own subgraph differentiated once, unbatched.

    ``L`` must be ``torch.stack`` of the K losses (its node's inputs are the per-task roots).
    Returns None when the split does not apply or saves nothing (no task has a subgraph of its
    own, or two tasks share a root): the caller then runs the plain batched call.
    """
    if not _SPLIT_HEADS:
        return None
    stack = L.grad_fn
    K = L.shape[0] if L.dim() == 1 else 0
    if stack is None or stack.name() != "StackBackward0" or K < 2:
        return None
    roots = list(stack.next_functions)
    if len(roots) != K or any(node is None for node, _ in roots):
        return None
    if len({id(node) for node, _ in roots}) != K:
        return None  # two losses from one node (e.g. unbind): no task-only root
    masks, nodes = _task_masks(roots)
    if any(_single_task(masks[id(node)]) is None for node, _ in roots):
        return None  # a loss that another loss's graph reaches: its root is shared
    acc = {id(n.variable): n for n in nodes.values() if isinstance(getattr(n, "variable", None), Tensor)}

    # The frontier of each task: edges from its own nodes into shared ones, in discovery order.
    frontier: dict[tuple[int, int], tuple[Any, int]] = {}
    task_edges: list[dict[tuple[int, int], int]] = [{} for _ in range(K)]
    feeders: list[tuple[Any, list[tuple[int, tuple[int, int]]]]] = []  # (node, [(slot, edge)])
    for key, node in nodes.items():
        i = _single_task(masks[key])
        if i is None:
            continue
        slots = []
        for slot, (child, nr) in enumerate(node.next_functions):
            if child is None or _single_task(masks[id(child)]) is not None:
                continue
            edge = (id(child), nr)
            frontier.setdefault(edge, (child, nr))
            task_edges[i].setdefault(edge, len(task_edges[i]))
            slots.append((slot, edge))
        if slots:
            feeders.append((node, slots))

    # Where each input is read: task i's own subgraph, the shared one, or nowhere.
    where: list[int | None] = []  # task index, -1 for shared, None for unreached
    for t in inputs:
        at = _input_node(t, acc)
        mask = masks.get(id(at[0]), 0) if at is not None else 0
        task = _single_task(mask)
        where.append(None if not mask else task if task is not None else -1)

    rows: list[Tensor | None] = [None] * len(inputs)
    single: list[int | None] = [None] * len(inputs)
    frontier_grads: dict[tuple[int, int], list[Tensor | None]] = {e: [None] * K for e in frontier}
    # Autograd reads an edge's gradient after the hooks of the tensor it belongs to (when the
    # node behind the edge does not run). The batched pass runs those hooks, once, on the K
    # rows, as the plain batched call does; so the frontier gradients are taken before them,
    # from what each head node sends into the frontier (a hook on the node, while it runs).
    def record(slots: list[tuple[int, tuple[int, int]]]) -> Any:
        def hook(grad_inputs: tuple[Tensor | None, ...], _: Any) -> None:
            for slot, edge in slots:
                g = grad_inputs[slot]
                if g is not None:
                    sent.setdefault(edge, []).append(g)
        return hook

    sent: dict[tuple[int, int], list[Tensor]] = {}
    handles = [node.register_hook(record(slots)) for node, slots in feeders]
    try:
        for i, (root, nr) in enumerate(roots):
            own = [j for j, w in enumerate(where) if w == i]
            edges = list(task_edges[i])
            if not own and not edges:
                continue
            meta = root._input_metadata[nr]
            seed = torch.ones(meta.shape, dtype=meta.dtype, device=meta.device)
            wanted: list[Any] = [GradientEdge(*frontier[e]) for e in edges] + [inputs[j] for j in own]
            sent.clear()
            got = torch.autograd.grad(
                [GradientEdge(root, nr)], wanted, grad_outputs=[seed], retain_graph=retain_graph,
                allow_unused=True,
            )
            for e in edges:
                parts = sent.get(e)  # what each of the head's nodes sent into edge e
                if parts:
                    frontier_grads[e][i] = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            for j, g in zip(own, got[len(edges):]):
                rows[j], single[j] = g, i
            del got
    finally:
        for handle in handles:
            handle.remove()

    shared = [j for j, w in enumerate(where) if w == -1]
    if shared:
        outputs, seeds = [], []
        for e, per_task in frontier_grads.items():
            known = next((g for g in per_task if g is not None), None)
            if known is None:
                continue  # no task's gradient is defined there
            seeds.append(torch.stack([g if g is not None else torch.zeros_like(known) for g in per_task]))
            outputs.append(GradientEdge(*frontier[e]))
        if outputs:
            got = torch.autograd.grad(
                outputs, [inputs[j] for j in shared], grad_outputs=seeds, is_grads_batched=True,
                retain_graph=retain_graph, allow_unused=True,
            )
            for j, g in zip(shared, got):
                rows[j] = g
    return TaskRows(rows, single)
