"""The Gramian of linear layers from their inputs and output gradients, without their Jacobian.

A shared weight ``W`` (out × in) used as ``Y = X Wᵀ (+ b)`` (``torch.nn.Linear``, ``F.linear``,
any ``addmm``/``mm`` against ``Wᵀ``) over ``N`` input rows ``X`` (N × in) receives, from task
``k``, the gradient ``∇_W L_k = Δ_kᵀ X`` where ``Δ_k = ∂L_k/∂Y`` (N × out). Its share of the
Gramian is therefore

    ⟨∇_W L_i, ∇_W L_j⟩ = Σ_{a,b} (Δ_i Δ_jᵀ)_{ab} (X Xᵀ)_{ab}

and the bias's share is ``(1ᵀ Δ_i)(Δ_jᵀ 1)``. Both need only the N × N products, never the
K × out × in Jacobian rows; a weight used several times (shared layers, recurrent steps) stacks
its uses' rows. The aggregated update is then one product per use, ``(Σ_k β_k Δ_k)ᵀ X``, the
product that a plain backward pass computes for the weighted loss.

This is the factorisation behind per-sample-gradient norms (Goodfellow, "Efficient per-example
gradient computations", 2015) and TorchJD's ``autogram`` engine, applied to task gradients. The
batched backward pass then stops at each layer's output (a ``GradientEdge``): autograd skips the
K weight-gradient products, and no K × d Jacobian is held for these parameters.

Which parameters qualify is read off the autograd graph, not assumed: a weight qualifies only when
every edge into its gradient accumulator is ``TBackward0`` under the ``mat2`` input of an
``AddmmBackward0`` (with ``alpha = 1``) or ``MmBackward0`` node, whose saved first factor is
``X``; a
bias only when every edge into its accumulator is the ``self`` input (``beta = 1``) of such a
node. A parameter that is also used any other way (a tied embedding, a cast under autocast, a
convolution), whose saved input cannot be read, that has tensor hooks (``register_hook``, which
see the gradient a factored parameter never gets), or for which the N × N products would cost
more than its Jacobian rows, keeps its Jacobian rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = ["LayerPlan", "plan_linear_layers"]

# The factored Gramian runs in float64: its N × N products are cheap next to the K rows it
# replaces. It is used when 2 · (N² in + K² N² out) ≤ K · N · in · out (float64 counted twice).
_FLOAT64_COST = 2.0
# Above this many stacked task rows (K · N) the cross products are formed pair by pair.
_MAX_STACKED_ROWS = 4096


@dataclass
class _Use:
    """One ``Y = X Wᵀ (+ b)`` node of the graph: its autograd node and its saved input X."""

    node: Any
    X: Tensor
    out: int  # the weight's output size: the width of Y


@dataclass
class _Factored:
    """A shared parameter whose Gramian share and update come from its uses' (X, Δ)."""

    index: int  # position among the shared parameters
    kind: str  # "weight" or "bias"
    uses: list[int]  # positions in LayerPlan.uses


@dataclass
class LayerPlan:
    """Which shared parameters are factored, through which graph nodes; the rest keep rows."""

    uses: list[_Use]
    factored: list[_Factored]
    rest: list[int]  # shared-parameter positions whose Jacobian rows are computed as usual
    edges: list[GradientEdge] = field(default_factory=list)

    def inputs(self, shared: list[Tensor]) -> list[Any]:
        """The batched call's first inputs: each use's output edge, then the rest parameters."""
        return [*self.edges, *(shared[j] for j in self.rest)]


def _walk_parents(root: Any) -> tuple[dict[int, list[tuple[Any, int]]], dict[int, Any]]:
    """Every edge of the graph under ``root``, reversed: ``parents[id(child)] = [(node, slot)]``
    where ``slot`` is the input of ``node`` that the edge feeds; and ``acc[id(leaf)]`` the
    gradient accumulator of each leaf. Nodes are kept referenced so that their ids stay unique."""
    parents: dict[int, list[tuple[Any, int]]] = {}
    acc: dict[int, Any] = {}
    keep: dict[int, Any] = {id(root): root}
    stack = [root]
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            acc[id(variable)] = node
            continue
        for slot, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            parents.setdefault(id(child), []).append((node, slot))
            if id(child) not in keep:
                keep[id(child)] = child
                stack.append(child)
    return parents, acc


def _saved_input(node: Any, W: Tensor) -> Tensor | None:
    """The ``X`` of a ``Y = X Wᵀ (+ b)`` node, or None when the node is not exactly that."""
    name = node.name()
    try:
        if name == "AddmmBackward0":
            if node._saved_alpha != 1 or node._saved_beta != 1:
                return None
        elif name != "MmBackward0":
            return None
        X = node._saved_mat1 if name == "AddmmBackward0" else node._saved_self
        mat2 = node._saved_mat2
    except (AttributeError, RuntimeError):  # freed graph, in-place modified input, new names
        return None
    if (
        not isinstance(X, Tensor) or X.dim() != 2 or X.shape[1] != W.shape[1]
        or X.dtype != W.dtype or X.device != W.device or X.is_sparse or X.is_complex()
        or (mat2 is not None and tuple(mat2.shape) != (W.shape[1], W.shape[0]))
    ):  # (mat2 is not saved when X needs no gradient)
        return None
    return X.detach()


def _has_hooks(p: Tensor) -> bool:
    """Whether ``p`` has tensor hooks (``register_hook``): they see its batched gradient, which
    a factored parameter never gets, so such a parameter keeps its rows."""
    return bool(p._backward_hooks)


def plan_linear_layers(L: Tensor, shared: list[Tensor], n_tasks: int) -> LayerPlan | None:
    """The factored parameters among ``shared`` for the losses ``L`` (None when there are none).

    All shared parameters must be float32 or float64 of one dtype on one device.
    """
    if L.grad_fn is None or not shared:
        return None
    dtype, device = shared[0].dtype, shared[0].device
    if dtype not in (torch.float32, torch.float64) or any(
        p.dtype != dtype or p.device != device for p in shared
    ):
        return None
    parents, acc = _walk_parents(L.grad_fn)
    K = n_tasks

    uses: list[_Use] = []
    use_of: dict[int, int] = {}  # id(node) -> position in uses
    factored: list[_Factored] = []
    done: set[int] = set()
    for j, W in enumerate(shared):
        node = acc.get(id(W))
        if W.dim() != 2 or node is None or not parents.get(id(node)) or _has_hooks(W):
            continue
        found: list[_Use] = []
        for transpose, slot in parents[id(node)]:
            if transpose.name() != "TBackward0" or slot != 0 or not parents.get(id(transpose)):
                found = []
                break
            for op, op_slot in parents[id(transpose)]:
                wanted = 2 if op.name() == "AddmmBackward0" else 1
                X = _saved_input(op, W) if op_slot == wanted else None
                if X is None or id(op) in use_of:
                    found = []
                    break
                found.append(_Use(op, X, W.shape[0]))
            if not found:
                break
        if not found:
            continue
        out, inp = W.shape
        N = sum(u.X.shape[0] for u in found)
        factored_cost = _FLOAT64_COST * (N * N * inp + K * K * N * N * out)
        if factored_cost > K * N * inp * out:
            continue
        positions = []
        for u in found:
            use_of[id(u.node)] = len(uses)
            positions.append(len(uses))
            uses.append(u)
        factored.append(_Factored(j, "weight", positions))
        done.add(j)

    for j, b in enumerate(shared):
        node = acc.get(id(b))
        if j in done or b.dim() != 1 or node is None or not parents.get(id(node)) or _has_hooks(b):
            continue
        positions = []
        for op, slot in parents[id(node)]:
            if slot != 0 or op.name() != "AddmmBackward0" or id(op) not in use_of:
                positions = []
                break
            try:
                ok = op._saved_beta == 1 and uses[use_of[id(op)]].out == b.shape[0]
            except (AttributeError, RuntimeError):
                ok = False
            if not ok:
                positions = []
                break
            positions.append(use_of[id(op)])
        if positions:
            factored.append(_Factored(j, "bias", positions))
            done.add(j)

    if not factored:
        return None
    rest = [j for j in range(len(shared)) if j not in done]
    edges = [GradientEdge(u.node, 0) for u in uses]
    return LayerPlan(uses, factored, rest, edges)


def _cross(Ds: Tensor, Xs: Tensor) -> Tensor:
    """``M_ij = Σ_ab (Δ_i Δ_jᵀ)_ab (X Xᵀ)_ab`` for ``Ds`` (K, N, out) and ``Xs`` (N, in), float64."""
    K, N, _ = Ds.shape
    P = Xs @ Xs.T
    if K * N <= _MAX_STACKED_ROWS:
        flat = Ds.reshape(K * N, -1)
        Q = (flat @ flat.T).view(K, N, K, N)
        return torch.einsum("iajb,ab->ij", Q, P)
    M = torch.empty(K, K, dtype=torch.float64, device=Ds.device)
    for i in range(K):
        for j in range(i, K):
            M[i, j] = M[j, i] = ((Ds[i] @ Ds[j].T) * P).sum()
    return M


@torch.no_grad()
def factored_gramian(plan: LayerPlan, deltas: list[Tensor]) -> Tensor:
    """The factored parameters' share of ``G Gᵀ`` (K × K, float64, on their device).

    ``deltas[u]`` is ``(K, N_u, out_u)``: the K tasks' gradients at use ``u``'s output.
    """
    K = deltas[0].shape[0]
    M = torch.zeros(K, K, dtype=torch.float64, device=deltas[0].device)
    for f in plan.factored:
        if f.kind == "weight":
            Xs = torch.cat([plan.uses[u].X for u in f.uses]).double()
            Ds = torch.cat([deltas[u] for u in f.uses], dim=1).double()
            M += _cross(Ds, Xs)
        else:
            S = sum(deltas[u].sum(dim=1, dtype=torch.float64) for u in f.uses)
            M += S @ S.T  # type: ignore[union-attr]
    return M


@torch.no_grad()
def factored_rows(plan: LayerPlan, deltas: list[Tensor]) -> dict[int, Tensor]:
    """Each factored parameter's Jacobian rows (K, n), materialised: for error messages only."""
    rows: dict[int, Tensor] = {}
    for f in plan.factored:
        if f.kind == "weight":
            g = sum(torch.matmul(deltas[u].transpose(1, 2), plan.uses[u].X) for u in f.uses)
        else:
            g = sum(deltas[u].sum(dim=1) for u in f.uses)
        rows[f.index] = g.reshape(deltas[0].shape[0], -1)  # type: ignore[union-attr]
    return rows


@torch.no_grad()
def factored_updates(
    plan: LayerPlan, deltas: list[Tensor], beta_row: Tensor, shared: list[Tensor]
) -> dict[int, Tensor]:
    """``βᵀ G_j`` of each factored parameter: ``Σ_u (βᵀΔ_u)ᵀ X_u`` for a weight, ``Σ_u 1ᵀ(βᵀΔ_u)``
    for a bias. ``beta_row`` is ``β`` (K,) in the parameters' dtype and device."""
    combined = [torch.tensordot(beta_row, D, dims=1) for D in deltas]  # (N_u, out_u) each
    updates: dict[int, Tensor] = {}
    for f in plan.factored:
        p = shared[f.index]
        first, *more = f.uses
        if f.kind == "weight":
            g = torch.mm(combined[first].T, plan.uses[first].X)
            for u in more:
                g.addmm_(combined[u].T, plan.uses[u].X)
        else:
            g = combined[first].sum(dim=0)
            for u in more:
                g += combined[u].sum(dim=0)
        updates[f.index] = g.view(p.shape)
    return updates

