"""The Gramian of linear layers from their inputs and output gradients, without their Jacobian.

A shared weight ``W`` (out × in) used as ``Y = X Wᵀ (+ b)`` (``torch.nn.Linear``, ``F.linear``,
any ``addmm``/``mm`` against ``Wᵀ``) over ``N`` input rows ``X`` (N × in) receives, from task
``k``, the gradient ``∇_W L_k = Δ_kᵀ X`` where ``Δ_k = ∂L_k/∂Y`` (N × out). Its share of the
Gramian is therefore

    ⟨∇_W L_i, ∇_W L_j⟩ = Σ_{a,b} (Δ_i Δ_jᵀ)_{ab} (X Xᵀ)_{ab}

which needs only N × N products, never the K × out × in Jacobian rows; a weight used several
times (shared layers, recurrent steps) stacks its uses' rows. The aggregated update is then one
product per use, ``(Σ_k β_k Δ_k)ᵀ X``, the product that a plain backward pass computes for the
weighted loss. Biases (``out`` values each) keep their Jacobian rows, which double as a check:
autograd captures ``Δ`` at the layer's output before any hook registered on that output
(``y.register_hook``) runs, while the bias rows are computed after it; a bias added only by
factored uses whose rows differ from ``Σ_rows Δ`` reveals such a hook (:func:`hooked_layers`), and
the call raises rather than return an update that ignores it.

This is the factorisation behind per-sample-gradient norms (Goodfellow, "Efficient per-example
gradient computations", 2015) and TorchJD's ``autogram`` engine, applied to task gradients. The
batched backward pass then stops at each layer's output (a ``GradientEdge``): autograd skips the
K weight-gradient products, and no K × d Jacobian is held for these parameters.

Convolutions (1-D and 2-D, not transposed) are the same product over their unfolded input, one
row per (example, output position), per group (:mod:`mtl_opt._conv_rows`): their weight is
factored when every edge into its accumulator is the weight input of a ``ConvolutionBackward0``
node, their bias is checked like a linear layer's.

An embedding table ``E`` (vocabulary × width) looked up at ids ``t_1..t_N`` (``nn.Embedding``,
``F.embedding``; dense, not ``scale_grad_by_freq``) receives ``∇_E L_k = Σ_n e_{t_n} Δ_k[n]ᵀ``:
the rows of the same id add up, so with ``S_k[u] = Σ_{n: t_n = u} Δ_k[n]`` over the U distinct
ids (the padding id left out) its Gramian share is ``⟨S_i, S_j⟩`` and its update scatters
``Σ_k β_k S_k`` into the table, K × U × width values instead of K × vocabulary × width rows.

Which weights qualify is read off the autograd graph, not assumed: a weight qualifies only when
every edge into its gradient accumulator is ``TBackward0`` under the ``mat2`` input of an
``AddmmBackward0`` (with ``alpha = 1``) or ``MmBackward0`` node, whose saved first factor is
``X``; a bias is checked only when every edge into its accumulator is the ``self`` input
(``beta = 1``) of such a node. A weight that is also used any other way (a tied embedding, a cast
under autocast, a transposed or 3-D convolution), whose saved input cannot be read without running saved-tensor
hooks (activation checkpointing, CPU offloading) or is empty, that has tensor hooks of its own
(``register_hook``, which see the gradient a factored weight never gets), or for which the N × N
products would cost more than its Jacobian rows, keeps its Jacobian rows.

Limit: a hook on a factored layer's output that changes the gradient is caught through the
layer's bias; a layer without a shared bias (``bias=False``) cannot be checked, so pass
``factor_linear=False`` to :func:`mtl_opt.mtl_backward` when such hooks modify gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from mtl_opt._conv_rows import ConvGeometry, conv_geometry, unfold_rows

__all__ = ["LayerPlan", "plan_linear_layers"]

# The factored Gramian runs in float64: its N × N products are cheap next to the K rows it
# replaces. It is used when 2 · (N² in + K² N² out) ≤ K · N · in · out (float64 counted twice).
_FLOAT64_COST = 2.0
# Convolutions are factored too (mtl_opt._conv_rows); benchmarks/bench_rrg.py turns this off
# for its "linear layers only" rows.
_FACTOR_CONV = True
# Above this many stacked task rows (K · N) the cross products are formed pair by pair.
_MAX_STACKED_ROWS = 4096


@dataclass
class _Use:
    """One ``Y = X Wᵀ (+ b)`` node of the graph: its autograd node and its saved input X.

    A convolution is the same product over the unfolded input (:mod:`mtl_opt._conv_rows`):
    ``X`` then holds one row per (example, output position), ``groups`` column blocks of
    ``in/groups`` columns each, and ``Δ`` (K, N, out, *spatial) is read as (K, rows, out)."""

    node: Any
    X: Tensor
    out: int  # the weight's output size: the width of Y
    groups: int = 1
    conv: ConvGeometry | None = None  # set while X is still the raw convolution input
    table: int = 0  # an embedding lookup: X holds the N token ids, ``table`` the vocabulary size
    padding_idx: int | None = None  # an embedding's id that receives no gradient


@dataclass
class _ParamUses:
    """A shared parameter and the factored uses it enters: a factored weight (its Gramian share
    and update come from the uses' (X, Δ)), or a bias added only by factored uses (its rows,
    computed by autograd from the gradient *after* any hook on the layer's output, must equal
    their ``Σ_rows Δ``, the gradient *before* such hooks; see :func:`hooked_layers`)."""

    index: int  # position among the shared parameters
    uses: list[int]  # positions in LayerPlan.uses


@dataclass
class LayerPlan:
    """Which shared weights are factored, through which graph nodes; the rest keep rows."""

    uses: list[_Use]
    factored: list[_ParamUses]  # the weights
    rest: list[int]  # shared-parameter positions whose Jacobian rows are computed as usual
    checks: list[_ParamUses]  # the biases that check the uses' Δ

    def inputs(self, shared: list[Tensor]) -> list[Any]:
        """The batched call's first inputs: each use's output edge, then the rest parameters."""
        return [*(GradientEdge(u.node, 0) for u in self.uses), *(shared[j] for j in self.rest)]


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
    """The ``X`` of a ``Y = X Wᵀ (+ b)`` node, or None when the node is not exactly that, or when
    reading ``X`` would run saved-tensor hooks (activation checkpointing would recompute, CPU
    offloading would copy back, the whole layer's input ahead of the backward pass)."""
    name = node.name()
    try:
        if name == "AddmmBackward0":
            if node._saved_alpha != 1 or node._saved_beta != 1:
                return None
            raw = node._raw_saved_mat1
        elif name == "MmBackward0":
            raw = node._raw_saved_self
        else:
            return None
        if getattr(raw, "unpack_hook", True) is not None:
            return None
        X = raw.unpack()
    except (AttributeError, RuntimeError):  # freed graph, in-place modified input, new names
        return None
    if (
        not isinstance(X, Tensor) or X.layout != torch.strided or X.dim() != 2
        or X.shape[0] == 0 or X.shape[1] != W.shape[1] or X.dtype != W.dtype
        or X.device != W.device or X.is_complex()
    ):
        return None
    return X.detach()


def _has_hooks(p: Tensor) -> bool:
    """Whether ``p`` has tensor hooks (``register_hook``): they see its batched gradient, which
    a factored weight never gets, so such a weight keeps its rows."""
    return bool(p._backward_hooks)


def plan_linear_layers(L: Tensor, shared: list[Tensor], n_tasks: int) -> LayerPlan | None:
    """The factored weights among ``shared`` for the losses ``L`` (None when there are none).

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
    factored: list[_ParamUses] = []
    for j, W in enumerate(shared):
        node = acc.get(id(W))
        if W.dim() not in (2, 3, 4) or node is None or not parents.get(id(node)) or _has_hooks(W):
            continue
        if W.dim() == 2:
            found = _linear_uses(W, parents[id(node)], parents, use_of)
            if not found:
                found = _embedding_uses(W, parents[id(node)], use_of)
                if found:
                    positions = []
                    for u in found:
                        use_of[id(u.node)] = len(uses)
                        positions.append(len(uses))
                        uses.append(u)
                    factored.append(_ParamUses(j, positions))
                    continue
        elif not _FACTOR_CONV:
            continue
        else:
            found = _conv_uses(W, parents[id(node)], use_of)
        if not found:
            continue
        out = W.shape[0]
        groups = found[0].groups
        inp = W[0].numel() * groups  # columns of X (of all groups)
        N = sum(u.conv.rows if u.conv is not None else u.X.shape[0] for u in found)
        factored_cost = _FLOAT64_COST * (N * N * inp + K * K * N * N * out)
        if factored_cost > K * N * inp * out / groups:
            continue
        positions = []
        for u in found:
            if u.conv is not None:
                u.X, u.conv = unfold_rows(u.X, u.conv), None
            use_of[id(u.node)] = len(uses)
            positions.append(len(uses))
            uses.append(u)
        factored.append(_ParamUses(j, positions))
    if not factored:
        return None

    # Biases keep their rows; one added only by factored uses checks those uses' Δ.
    checks: list[_ParamUses] = []
    for j, b in enumerate(shared):
        node = acc.get(id(b))
        if b.dim() != 1 or node is None or not parents.get(id(node)):
            continue
        into_b = parents[id(node)]
        if all(
            id(op) in use_of and uses[use_of[id(op)]].out == b.shape[0] and (
                (slot == 0 and op.name() == "AddmmBackward0" and op._saved_beta == 1)
                or (slot == 2 and op.name() == "ConvolutionBackward0")
            )
            for op, slot in into_b
        ):
            checks.append(_ParamUses(j, [use_of[id(op)] for op, _ in into_b]))

    done = {f.index for f in factored}
    rest = [j for j in range(len(shared)) if j not in done]
    return LayerPlan(uses, factored, rest, checks)


def _linear_uses(
    W: Tensor, into_W: list[tuple[Any, int]], parents: dict[int, list[tuple[Any, int]]],
    use_of: dict[int, int],
) -> list[_Use]:
    """Every use of ``W`` as ``X Wᵀ``, or [] when any edge into ``W``'s accumulator is not one."""
    found: list[_Use] = []
    for transpose, slot in into_W:
        if transpose.name() != "TBackward0" or slot != 0 or not parents.get(id(transpose)):
            return []
        for op, op_slot in parents[id(transpose)]:
            wanted = 2 if op.name() == "AddmmBackward0" else 1
            X = _saved_input(op, W) if op_slot == wanted else None
            if X is None or id(op) in use_of:
                return []
            found.append(_Use(op, X, W.shape[0]))
    return found


def _conv_uses(W: Tensor, into_W: list[tuple[Any, int]], use_of: dict[int, int]) -> list[_Use]:
    """Every use of ``W`` as the weight of a convolution, or [] when any edge into ``W``'s
    accumulator is not one that :func:`mtl_opt._conv_rows.conv_geometry` accepts."""
    found: list[_Use] = []
    for op, slot in into_W:
        if slot != 1 or id(op) in use_of:
            return []
        read = conv_geometry(op, W)
        if read is None or (found and read[1].groups != found[0].groups):
            return []
        X, geometry = read
        found.append(_Use(op, X, W.shape[0], geometry.groups, geometry))
    return found


def _embedding_uses(W: Tensor, into_W: list[tuple[Any, int]], use_of: dict[int, int]) -> list[_Use]:
    """Every use of ``W`` (vocabulary × width) as a dense embedding table (``nn.Embedding``,
    ``F.embedding``; not sparse, not ``scale_grad_by_freq``), or [] when any edge into ``W``'s
    accumulator is not one. Its factored share costs K·N·width, never more than its K rows
    (K·vocabulary·width) for N ≤ vocabulary lookups, so no cost rule applies beyond that."""
    found: list[_Use] = []
    for op, slot in into_W:
        if slot != 0 or op.name() != "EmbeddingBackward0" or id(op) in use_of:
            return []
        try:
            if op._saved_sparse or op._saved_scale_grad_by_freq:
                return []
            raw = op._raw_saved_indices
            if getattr(raw, "unpack_hook", True) is not None:
                return []
            ids = raw.unpack()
            padding_idx = int(op._saved_padding_idx)
        except (AttributeError, RuntimeError, TypeError):
            return []
        if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.device != W.device:
            return []
        found.append(_Use(op, ids.detach().reshape(-1, 1), W.shape[1], table=W.shape[0],
                          padding_idx=padding_idx if 0 <= padding_idx < W.shape[0] else None))
    if sum(u.X.shape[0] for u in found) > W.shape[0]:
        return []  # more lookups than rows in the table: its Jacobian rows are cheaper
    return found


def _table_rows(D: Tensor, uses: list[_Use]) -> tuple[Tensor, Tensor]:
    """Task gradients of an embedding table on the ids it looked up: ``(ids (U,), S (..., U,
    width))`` with ``S[.., u] = Σ_{n: id_n = ids[u]} Δ[.., n]``, the padding id's lookups left
    out. ``D`` (..., N, width) stacks the uses' output gradients in the order of ``uses``."""
    ids = torch.cat([u.X.reshape(-1) for u in uses])
    keep = torch.ones_like(ids, dtype=torch.bool)
    offset = 0
    for u in uses:
        n = u.X.shape[0]
        if u.padding_idx is not None:
            keep[offset: offset + n] &= ids[offset: offset + n] != u.padding_idx
        offset += n
    unique, inverse = torch.unique(ids[keep], return_inverse=True)
    S = D.new_zeros((*D.shape[:-2], unique.shape[0], D.shape[-1]))
    S.index_add_(-2, inverse, D[..., keep, :])
    return unique, S


def _delta_rows(D: Tensor, use: _Use) -> Tensor:
    """``Δ`` as (K, rows, out): a convolution's (K, N, out, *spatial) gets one row per
    (example, position), in the order of :func:`mtl_opt._conv_rows.unfold_rows`; an
    embedding's (K, *ids, width) one row per looked-up id."""
    if D.dim() == 3:
        return D
    if use.table:
        return D.reshape(D.shape[0], -1, D.shape[-1])
    return D.movedim(2, -1).reshape(D.shape[0], -1, D.shape[2])


def _blocks(groups: int, out: int, inp: int) -> list[tuple[slice, slice]]:
    """The (Δ columns, X columns) of each group: a grouped weight is block-diagonal."""
    o, i = out // groups, inp // groups
    return [(slice(g * o, (g + 1) * o), slice(g * i, (g + 1) * i)) for g in range(groups)]


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
    """The factored weights' share of ``G Gᵀ`` (K × K, float64, on their device).

    ``deltas[u]`` is ``(K, N_u, out_u)``: the K tasks' gradients at use ``u``'s output.
    """
    K = deltas[0].shape[0]
    M = torch.zeros(K, K, dtype=torch.float64, device=deltas[0].device)
    for f in plan.factored:
        Ds = torch.cat([_delta_rows(deltas[u], plan.uses[u]) for u in f.uses], dim=1).double()
        Xs = torch.cat([plan.uses[u].X for u in f.uses])
        Xs = Xs if plan.uses[f.uses[0]].table else Xs.double()
        groups = plan.uses[f.uses[0]].groups
        if plan.uses[f.uses[0]].table:
            _, S = _table_rows(Ds, [plan.uses[u] for u in f.uses])
            flat = S.reshape(K, -1)
            M += flat @ flat.T
            continue
        if groups == 1:
            M += _cross(Ds, Xs)
            continue
        for d_cols, x_cols in _blocks(groups, Ds.shape[2], Xs.shape[1]):
            M += _cross(Ds[..., d_cols], Xs[:, x_cols])
    return M


@torch.no_grad()
def factored_rows(plan: LayerPlan, deltas: list[Tensor]) -> list[Tensor]:
    """Each factored weight's Jacobian rows (K, n), materialised: for error messages only."""
    rows = []
    for f in plan.factored:
        first = plan.uses[f.uses[0]]
        if first.table:
            Ds = torch.cat([_delta_rows(deltas[u], plan.uses[u]) for u in f.uses], dim=1)
            g = _table_update(Ds, [plan.uses[u] for u in f.uses])
        else:
            g = sum(_grouped_product(_delta_rows(deltas[u], plan.uses[u]), plan.uses[u]) for u in f.uses)
        rows.append(g.reshape(deltas[0].shape[0], -1))  # type: ignore[union-attr]
    return rows


def _table_update(D: Tensor, uses: list[_Use]) -> Tensor:
    """The dense gradient of an embedding table, (..., vocabulary, width), from ``D`` (..., N,
    width), as the embedding's own backward pass forms it."""
    ids, S = _table_rows(D, uses)
    out = D.new_zeros((*D.shape[:-2], uses[0].table, D.shape[-1]))
    out.index_copy_(-2, ids, S)
    return out


def _grouped_product(D: Tensor, use: _Use) -> Tensor:
    """``Dᵀ X`` per group, stacked by output channel: (..., out, in/groups) for ``D``
    (..., rows, out)."""
    if use.groups == 1:
        return torch.matmul(D.transpose(-1, -2), use.X)
    return torch.cat([
        torch.matmul(D[..., d_cols].transpose(-1, -2), use.X[:, x_cols])
        for d_cols, x_cols in _blocks(use.groups, D.shape[-1], use.X.shape[1])
    ], dim=-2)


@torch.no_grad()
def hooked_layers(plan: LayerPlan, deltas: list[Tensor], rest_rows: dict[int, Tensor]) -> list[int]:
    """The shared biases (positions) whose rows disagree with their uses' ``Σ_rows Δ``.

    A hook on a factored layer's output (``y.register_hook``, or one on its autograd node) runs
    after autograd hands the factored path its ``Δ``, but before the layer's own backward, which
    computes the bias rows: a hook that changes the gradient shows up as a mismatch here. The
    tolerance (relative to ``Σ_rows |Δ|``) covers summation order: 1e-3 in float32, 1e-9 in
    float64. One device-to-host transfer for all checks.
    """
    if not plan.checks:
        return []
    ratios = []
    for c in plan.checks:
        sums = sum(_delta_rows(deltas[u], plan.uses[u]).sum(dim=1) for u in c.uses)
        scale = sum(_delta_rows(deltas[u], plan.uses[u]).abs().sum(dim=1) for u in c.uses)
        err = (rest_rows[c.index] - sums).abs()  # type: ignore[operator]
        ratios.append((err / (scale + torch.finfo(err.dtype).tiny)).max())  # type: ignore[operator]
    tol = 1e-3 if deltas[0].dtype == torch.float32 else 1e-9
    flags = (torch.stack(ratios) > tol).tolist()
    return [c.index for c, bad in zip(plan.checks, flags) if bad]


@torch.no_grad()
def factored_updates(
    plan: LayerPlan, deltas: list[Tensor], beta_row: Tensor, shared: list[Tensor]
) -> dict[int, Tensor]:
    """``βᵀ G_j`` of each factored weight: ``Σ_u (βᵀΔ_u)ᵀ X_u``. ``beta_row`` is ``β`` (K,) in
    the parameters' dtype and device."""
    updates: dict[int, Tensor] = {}
    for f in plan.factored:
        first, *more = f.uses
        if plan.uses[first].table:
            Ds = torch.cat([_delta_rows(deltas[u], plan.uses[u]) for u in f.uses], dim=1)
            g = _table_update(torch.tensordot(beta_row, Ds, dims=1), [plan.uses[u] for u in f.uses])
        elif plan.uses[first].groups == 1:
            g = torch.mm(torch.tensordot(beta_row, _delta_rows(deltas[first], plan.uses[first]), dims=1).T,
                         plan.uses[first].X)
            for u in more:
                g.addmm_(torch.tensordot(beta_row, _delta_rows(deltas[u], plan.uses[u]), dims=1).T,
                         plan.uses[u].X)
        else:
            g = sum(_grouped_product(torch.tensordot(beta_row, _delta_rows(deltas[u], plan.uses[u]), dims=1),
                                     plan.uses[u]) for u in f.uses)
        updates[f.index] = g.reshape(shared[f.index].shape)
    return updates
