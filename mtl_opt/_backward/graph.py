"""Walks of the autograd graph: which leaves the losses reach, and which each task's own loss
reaches (the checks of ``task_params`` and ``features=``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["_per_task_roots", "_reachable_leaves", "_unreached_targets"]


def _reachable_leaves(roots: Sequence[Tensor]) -> list[Tensor]:
    """Leaf tensors that require grad and that the roots depend on, in discovery order."""
    leaves: list[Tensor] = []
    seen_leaves: set[int] = set()
    stack = []
    for r in roots:
        if r.grad_fn is not None:
            stack.append(r.grad_fn)
        elif r.requires_grad and id(r) not in seen_leaves:
            seen_leaves.add(id(r))
            leaves.append(r)
    visited: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):  # AccumulateGrad: a leaf
            if id(variable) not in seen_leaves:
                seen_leaves.add(id(variable))
                leaves.append(variable)
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in visited:
                stack.append(nxt)
    return leaves


def _per_task_roots(loss_list: list[Tensor], L: Tensor, losses: object) -> list[Tensor | Any]:
    """For each task, the tensor or autograd node whose graph holds exactly its loss.

    A list of losses gives them directly. A 1-D tensor gives one graph node for all K entries
    (``L.unbind()[i]`` reaches every entry through that node), so per-task reachability needs
    the node that built it: for ``torch.stack([L_0, ..., L_{K-1}])`` its inputs, in order.
    Any other 1-D tensor is rejected with ``task_params`` (its entries cannot be told apart).
    """
    if not isinstance(losses, Tensor):
        return list(loss_list)
    node = L.grad_fn
    if node is not None and type(node).__name__ == "StackBackward0" and len(node.next_functions) == len(loss_list):
        roots: list[Tensor | Any] = []
        for nxt, _ in node.next_functions:
            roots.append(nxt)  # None: that entry does not depend on any grad-requiring tensor
        return roots
    raise ValueError(
        "with task_params, give the losses as a list [loss_0, ..., loss_{K-1}] or as "
        "torch.stack([...]): the entries of this 1-D tensor come from one operation "
        f"({type(node).__name__ if node is not None else 'a leaf'}), so the parameters each "
        "task's own loss reaches cannot be checked"
    )


def _unreached_targets(root: Tensor | Any, targets: dict[int, str]) -> list[str]:
    """Names of the target leaves that ``root`` (a tensor or an autograd node) does not depend
    on (breadth-first, so that the heads, which sit next to the loss, are found without walking
    the whole trunk)."""
    missing = dict(targets)
    if isinstance(root, Tensor) and root.grad_fn is None:
        missing.pop(id(root), None)
        return list(missing.values())
    if root is None:
        return list(missing.values())
    start = root.grad_fn if isinstance(root, Tensor) else root
    queue = deque([start])
    visited = {id(start)}
    while queue and missing:
        node = queue.popleft()
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            missing.pop(id(variable), None)
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in visited:
                visited.add(id(nxt))
                queue.append(nxt)
    return list(missing.values())
