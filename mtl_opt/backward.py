"""From task losses to ``.grad``: the Jacobian, the aggregation, and who receives what.

:func:`mtl_backward` replaces ``loss.backward()`` in a multi-task training loop::

    losses = [loss_report, loss_cls]                       # K scalar losses
    result = mtl_backward(losses, model.encoder, agg)      # fills every .grad
    optimizer.step()

What each parameter receives
----------------------------
Let ``L_1..L_K`` be the losses, ``θ`` the concatenation of the shared parameters and
``G = [∇_θ L_1; ...; ∇_θ L_K]`` (K × d) their Jacobian. Let ``h`` (K,) be the aggregator's *loss
weights* (:func:`loss_weights`): the call's ``task_weights`` when given, else the method's own
per-task weights (linear scalarization's ``weights``, CAME-Grad's ``task_weights`` ω), else ones.

* **shared parameters** receive the aggregated direction ``d = aggregator(G)``, split back into
  the parameters' shapes;
* **task parameters** (``task_params=[group_1, ..., group_K]``): group ``i`` receives
  ``h_i ∇L_i`` and nothing from the other losses (a head is trained by its own task only). A
  group parameter that its own loss does not reach raises (groups listed in another order than
  the losses would otherwise silently get nothing); the losses must then be a list or
  ``torch.stack`` of the K losses, whose entries the autograd graph tells apart;
* **every other parameter** that the losses reach (found by walking the autograd graph, as
  ``.backward()`` does) receives ``Σ_i h_i ∇L_i``, the gradient of the weighted joint loss.

Every shared or task parameter must be reached by some loss (else ``ValueError`` naming it).
Everything is *accumulated* into ``.grad`` exactly like ``.backward()`` (added to an existing
``.grad``; gradients are written dense, also for sparse embeddings), and nothing is written
unless the whole call succeeds. With ``LinearScalarization(w)`` every parameter therefore
receives what ``(w * losses).sum().backward()`` would give it.

Methods that read no Jacobian (``aggregator.kind == "loss"``: linear scalarization and
the loss weightings, :class:`mtl_opt.LossWeighting`) skip everything below: the method gives
this step's ``w`` from the losses and ONE backward pass of ``Σ w_i L_i`` fills ``.grad`` bit for
bit as that line does (``h = w``; no Gramian in the result; :mod:`mtl_opt._one_backward`).

One backward pass
-----------------
All per-task gradients (shared, task and other parameters) come from ONE batched autograd call,
``torch.autograd.grad(L, inputs, grad_outputs=I_K, is_grads_batched=True)``, which vectorises the
K vector-Jacobian products with ``vmap``; task and other parameters then combine their K rows
with ``h``. The call is split by the graph (:mod:`mtl_opt._task_split`): each task's own subgraph
(its head) runs once, unbatched, and only the part several losses share runs batched, started
where the heads feed it (same result to rounding). The batched call holds K rows of every input's gradient, the blocks
``G_j`` (K × n_j) of ``G = [G_1 | ... | G_n]``; the per-task loop copies each task's gradients
straight into ``G`` (peak: one task's gradients plus ``G``).

No flat Jacobian for Gramian methods: when the aggregator is a :class:`GramianAggregator` (that
keeps the base class's ``aggregate``) and the blocks come from the batched call, ``G`` is never
concatenated. The Gramian is ``M = Σ_j G_j G_jᵀ`` (in the blocks' dtype, then float64 on the
CPU, with the checks and the float32 range fallback of :func:`mtl_opt._validation.gramian_of`;
:func:`gramian_of_blocks`), ``β`` comes from the aggregator's one weights call (so stateful
methods advance exactly as with ``aggregate(G)``), and each parameter's piece ``βᵀ G_j``
becomes its ``.grad`` without a copy (or is added to an existing ``.grad``). The result's
``direction`` is then concatenated on first access; it refuses (``RuntimeError``) once those
``.grad`` tensors were modified in place, e.g. by ``clip_grad_norm_``, so read it first. Other
aggregators (and float16/bfloat16 or mixed-dtype parameters) use the concatenated ``G``.
Gradients that this call computed itself (task and other parameters, the ``features=`` pass
through the encoder) also become ``.grad`` without a copy when ``.grad`` is ``None``. Some graphs cannot be batched (operations without a batching rule, such
as sparse embedding gradients or custom autograd functions that read values in their backward);
with ``parallel="auto"`` the call then falls back to K separate backward passes, warns with
:class:`BatchedJacobianFallbackWarning` and records the reason in the result. The two paths
give the same gradients to rounding. ``parallel=True`` forces the batched call (its failure
raises), ``parallel=False`` the loop.

Memory: a failed batched call may already have freed part of the graph, so ``"auto"`` keeps the
graph's saved tensors during its batched attempt (``retain_graph=True``); they are freed only
when the caller drops the losses, so a loop that rebinds ``losses`` after the next forward holds
two graphs at once. :class:`mtl_opt.MultiTaskOptimizer` settles ``"auto"`` on its first step and
then passes ``parallel=True`` or ``False``, which never retain the graph unless asked; a
hand-written loop can do the same with ``result.batched``.

Linear layers without Jacobian rows
-----------------------------------
With a :class:`GramianAggregator` on the batched path, a shared weight ``W`` used as
``Y = X Wᵀ (+ b)`` (``nn.Linear``, ``F.linear``, ``x @ W.T``) over ``N`` input rows gets no
Jacobian rows (``factor_linear=True``, the default). The batched call stops at the layer's output
(a ``GradientEdge``), which gives ``Δ_k = ∂L_k/∂Y`` (N × out) and spares autograd the K
weight-gradient products; ``∇_W L_k = Δ_kᵀ X``, so the weight's share of the Gramian is
``⟨Δ_iᵀX, Δ_jᵀX⟩ = Σ_ab (Δ_i Δ_jᵀ)_ab (X Xᵀ)_ab`` (float64) and its update one product
``(Σ_k β_k Δ_k)ᵀ X``. A layer used several times stacks its uses' rows. Biases keep their rows.
1-D and 2-D convolutions (any stride, padding, dilation, groups) are the same product over their
unfolded input, one row per example and output position (:mod:`mtl_opt._conv_rows`); embedding
tables sum the output gradients of the lookups that share an id.
Which weights qualify is read off the graph (:mod:`mtl_opt._layerwise`): every edge into the
weight's accumulator must come from such a product, so a weight also used any other way (tied to
an embedding, cast under autocast) keeps its Jacobian rows, and so do layers whose
saved input sits behind saved-tensor hooks (checkpointing, offloading) and layers whose N × N
products would cost more than their rows (long sequences). The result is the same to rounding;
``result.factored_params`` counts the factored weights. The per-task loop (``parallel=False`` or
the fallback) always uses the rows. Autograd captures ``Δ`` before hooks on ``Y`` run
(``y.register_hook``); a hook that changes the gradient shows in the layer's bias rows, which are
computed after it, and the call raises ``RuntimeError`` (bias-free layers cannot be checked: pass
``factor_linear=False`` when such hooks modify gradients).

Representation-level aggregation (MGDA-UB)
------------------------------------------
With ``features=z`` (the shared encoder's output, still part of the graph), the Jacobian is
taken with respect to ``z`` instead of ``θ``: ``Z = [∇_z L_1; ...; ∇_z L_K]`` costs one batched
backward pass through the heads only. The aggregator (a :class:`GramianAggregator`) computes its
weights ``β`` from ``Z Zᵀ``, and one backward pass of ``Σ β_i L_i`` through the encoder (started
at ``z`` with the gradient ``βᵀ Z``) fills the shared ``.grad``. This is Sener & Koltun's
MGDA-UB ("Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018): since
``∇_θ L_i = (∂z/∂θ)ᵀ ∇_z L_i``, weights chosen on ``Z`` approximate those chosen on ``G`` (for
MGDA they minimise an upper bound of ``‖βᵀ G‖``), they are not the parameter-level weights. It
needs every effect of the shared parameters on the losses to pass through ``z``.

Limits
------
The gradients come from ``torch.autograd.grad``, not ``.backward()``: hooks that only
``.backward()`` fires (``register_post_accumulate_grad_hook``, DistributedDataParallel's
gradient all-reduce) do not run, and tensor hooks on the inputs see K-row batched gradients on
the batched path. Under DDP the per-rank Jacobians are therefore not averaged; aggregate them
yourself or train on one process.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import Tensor, nn

from mtl_opt._layerwise import (
    LayerPlan,
    factored_gramian,
    factored_rows,
    factored_updates,
    hooked_layers,
    plan_linear_layers,
)
from mtl_opt._task_split import split_task_rows
from mtl_opt._validation import (
    GRAMIAN_BLOCK,
    _diagonal_in_range,
    _gram,
    check_direction,
    check_gradients,
    check_task_vector,
    gramian_of,
    gramian_rtol,
    underflow_threshold,
)
from mtl_opt.aggregator import (
    AggregationResult,
    GradientAggregator,
    GramianAggregator,
    is_gramian_weighting,
    combine_rows,
)

__all__ = [
    "BatchedJacobianFallbackWarning",
    "MTLBackwardResult",
    "loss_weights",
    "mtl_backward",
]

Params = Union[nn.Module, Tensor, Iterable[Tensor]]
Parallel = Union[Literal["auto"], bool]


class BatchedJacobianFallbackWarning(RuntimeWarning):
    """The batched Jacobian call failed and K separate backward passes were used instead."""


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


# --------------------------------------------------------------------------------------------
# Loss weights h
# --------------------------------------------------------------------------------------------
def loss_weights(
    aggregator: GradientAggregator, n_tasks: int, task_weights: object | None = None
) -> Tensor:
    """The weights ``h`` (K,) float64 that parameters outside the Jacobian apply to the losses.

    In order of precedence: the call's ``task_weights`` (only for methods with
    ``accepts_task_weights``); else the method's own per-task weights,
    :meth:`GradientAggregator.loss_weights` (linear scalarization's ``w``, CAME-Grad's ``ω``),
    where ``None`` means ones.
    """
    if task_weights is not None:
        if not aggregator.accepts_task_weights:
            raise ValueError(
                f"{type(aggregator).__name__} has no per-task weights to override; scale the "
                "losses instead or use a method that takes task weights (ls, came_grad)"
            )
        return check_task_vector(task_weights, n_tasks, "task_weights")
    own = aggregator.loss_weights(n_tasks)
    if own is None:
        return torch.ones(n_tasks, dtype=torch.float64)
    return check_task_vector(own, n_tasks, f"{type(aggregator).__name__}.loss_weights")


# --------------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------------
def _stack_losses(losses: object) -> tuple[list[Tensor], Tensor]:
    """The K losses as a list of 0-dim tensors and as one (K,) tensor (both in the graph)."""
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            hint = " (wrap a single loss in a list: [loss])" if losses.dim() == 0 else ""
            raise ValueError(
                f"losses must be a sequence or a 1-D tensor of K scalar losses, got a tensor of "
                f"shape {tuple(losses.shape)}{hint}"
            )
        if losses.numel() == 0:
            raise ValueError("losses is empty (K = 0): there is no task to train")
        if not losses.is_floating_point():
            raise TypeError(f"losses must be floating-point, got dtype {losses.dtype}")
        if not losses.requires_grad:
            raise ValueError(
                "the losses do not require grad: were they computed under torch.no_grad() or "
                "from detached tensors?"
            )
        return list(losses.unbind()), losses
    if isinstance(losses, (str, bytes)) or not isinstance(losses, Sequence):
        if isinstance(losses, Iterable) and not isinstance(losses, (str, bytes)):
            losses = list(losses)
        else:
            raise TypeError(
                f"losses must be a sequence or a 1-D tensor of K scalar losses, got "
                f"{type(losses).__name__}"
            )
    if len(losses) == 0:
        raise ValueError("losses is empty (K = 0): there is no task to train")
    out: list[Tensor] = []
    for i, loss in enumerate(losses):
        if not isinstance(loss, Tensor):
            raise TypeError(f"the loss of task {i} must be a torch.Tensor, got {type(loss).__name__}")
        if loss.dim() != 0:
            raise ValueError(
                f"the loss of task {i} must be a scalar, got shape {tuple(loss.shape)} "
                "(reduce it, e.g. with .mean())"
            )
        if not loss.is_floating_point():
            raise TypeError(f"the loss of task {i} must be floating-point, got dtype {loss.dtype}")
        if not loss.requires_grad:
            raise ValueError(
                f"the loss of task {i} does not require grad: was it computed under "
                "torch.no_grad() or from detached tensors?"
            )
        if loss.device != losses[0].device:
            raise ValueError(
                f"the losses are on different devices: task 0 on {losses[0].device}, "
                f"task {i} on {loss.device}"
            )
        out.append(loss)
    return out, torch.stack(out)


def _loss_values(L: Tensor) -> Tensor:
    """Detached float64 CPU copy of the losses, checked finite (one host sync)."""
    values = L.detach().to(device="cpu", dtype=torch.float64)
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = {i: values[i].item() for i in range(values.numel()) if not bool(finite[i])}
        names = ", ".join(f"task {i} = {v}" for i, v in bad.items())
        raise ValueError(f"non-finite loss: {names}")
    return values


def _param_list(params: object, what: str) -> list[tuple[str, Tensor]]:
    """(name, tensor) pairs of a module or an iterable of tensors, checked and deduplicated."""
    if isinstance(params, nn.Module):
        named = [
            (f"{what} '{n}' (shape {tuple(p.shape)})", p)
            for n, p in params.named_parameters()
            if p.requires_grad
        ]
        if not named:
            raise ValueError(f"the module given as {what}s has no parameter that requires grad")
        return named
    if isinstance(params, Tensor):
        items = [params]
    elif isinstance(params, Iterable) and not isinstance(params, (str, bytes)):
        items = list(params)
    else:
        raise TypeError(
            f"{what}s must be an nn.Module or an iterable of tensors, got {type(params).__name__}"
        )
    if not items:
        raise ValueError(f"no {what}s were given")
    named = []
    for j, p in enumerate(items):
        name = f"{what} #{j}"
        if not isinstance(p, Tensor):
            raise TypeError(f"{name} is not a tensor but {type(p).__name__}")
        name = f"{name} (shape {tuple(p.shape)})"
        if not p.is_floating_point():
            raise TypeError(f"{name} must be floating-point, got dtype {p.dtype}")
        if not p.requires_grad:
            raise ValueError(f"{name} does not require grad (frozen parameters cannot be trained)")
        if not p.is_leaf:
            raise ValueError(f"{name} is not a leaf tensor: .grad is only kept on leaves")
        named.append((name, p))
    return named


def _check_unique(groups: list[list[tuple[str, Tensor]]]) -> None:
    seen: dict[int, str] = {}
    for named in groups:
        for name, p in named:
            if id(p) in seen:
                raise ValueError(f"{name} was given twice (also as {seen[id(p)]})")
            seen[id(p)] = name


def _task_groups(task_params: object, n_tasks: int) -> list[list[tuple[str, Tensor]]]:
    if task_params is None:
        return [[] for _ in range(n_tasks)]
    if isinstance(task_params, (nn.Module, Tensor)) or not isinstance(task_params, Sequence):
        raise TypeError(
            "task_params must be a sequence of K parameter groups ([params_of_task_0, ...]), "
            f"got {type(task_params).__name__}"
        )
    if len(task_params) != n_tasks:
        raise ValueError(
            f"task_params has {len(task_params)} groups but there are {n_tasks} losses "
            "(one group per task, in the order of the losses)"
        )
    return [_param_list(group, f"task {i} parameter") for i, group in enumerate(task_params)]


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


def _features_list(features: object) -> list[Tensor]:
    items = [features] if isinstance(features, Tensor) else features
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or len(items) == 0:
        raise TypeError(
            f"features must be a tensor or a non-empty sequence of tensors, got {type(features).__name__}"
        )
    for j, z in enumerate(items):
        if not isinstance(z, Tensor):
            raise TypeError(f"features #{j} is not a tensor but {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"features #{j} must be floating-point, got dtype {z.dtype}")
        if not z.requires_grad:
            raise ValueError(
                f"features #{j} does not require grad: pass the encoder's output itself, "
                "not a detached copy"
            )
    return list(items)


# --------------------------------------------------------------------------------------------
# Per-task gradients
# --------------------------------------------------------------------------------------------
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
            stacklevel=3,  # the caller of mtl_backward
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


# --------------------------------------------------------------------------------------------
# The public entry point
# --------------------------------------------------------------------------------------------
def mtl_backward(
    losses: Sequence[Tensor] | Tensor,
    shared_params: Params,
    aggregator: GradientAggregator,
    *,
    task_params: Sequence[Params] | None = None,
    task_weights: Sequence[float] | Tensor | None = None,
    features: Tensor | Sequence[Tensor] | None = None,
    retain_graph: bool = False,
    parallel: Parallel = "auto",
    factor_linear: bool = True,
) -> MTLBackwardResult:
    """Backpropagate K task losses through an aggregator, accumulating into ``.grad``.

    Args:
        losses: K scalar losses (a sequence of 0-dim tensors or one 1-D tensor), in task order.
        shared_params: the parameters all tasks share (an ``nn.Module`` — its parameters that
            require grad — or an iterable of tensors); the Jacobian is taken over their
            concatenation and they receive ``aggregator(G)``.
        aggregator: any :class:`GradientAggregator`; called as
            ``aggregator.aggregate(G, losses=<detached losses>, task_weights=...)``
            (``task_weights`` only when given here).
        task_params: optional ``[group_0, ..., group_{K-1}]``: group ``i`` (a module or an
            iterable of tensors) receives ``h_i ∇L_i`` only, and must be reached by loss ``i``
            (checked; the losses must then be a list or ``torch.stack`` of the K losses).
        task_weights: per-task weights for this call, passed to the aggregator (which must
            accept them) and used as ``h``.
        features: the shared representation (a tensor or a sequence of tensors in the graph)
            for representation-level aggregation (MGDA-UB, an approximation; see module docs).
            Needs a :class:`GramianAggregator`.
        retain_graph: keep the graph after the call (as in ``.backward()``).
        parallel: ``"auto"`` (batched, falling back to a loop), ``True`` (batched only) or
            ``False`` (one backward pass per task).
        factor_linear: on the batched path with a :class:`GramianAggregator`, take the
            Gramian share and the update of shared linear-layer weights from the layers'
            inputs and output gradients instead of their Jacobian rows (see "Linear layers
            without Jacobian rows" in the module docs). Same result to rounding; ``False``
            forces the Jacobian rows.

    Returns:
        :class:`MTLBackwardResult` with the aggregation and the Jacobian's diagnostics.

    Every other parameter the losses reach receives ``Σ_i h_i ∇L_i`` (see the module docstring
    for ``h``). Nothing is written to ``.grad`` unless the whole call succeeds.
    """
    if not isinstance(aggregator, GradientAggregator):
        raise TypeError(
            f"aggregator must be a GradientAggregator (e.g. mtl_opt.get_aggregator('came_grad')), "
            f"got {type(aggregator).__name__}"
        )
    if parallel not in ("auto", True, False) or (parallel != "auto" and not isinstance(parallel, bool)):
        raise ValueError(f"parallel must be 'auto', True or False, got {parallel!r}")
    if not isinstance(retain_graph, bool):
        raise TypeError(f"retain_graph must be a bool, got {retain_graph!r}")
    if not isinstance(factor_linear, bool):
        raise TypeError(f"factor_linear must be a bool, got {factor_linear!r}")
    level: Literal["parameters", "features"] = "parameters" if features is None else "features"
    if features is not None and not is_gramian_weighting(aggregator):
        raise TypeError(
            f"features= (representation-level aggregation, MGDA-UB) needs a GramianAggregator "
            f"(a method of kind 'gramian'), whose weights β can be applied to the losses; "
            f"{type(aggregator).__name__} is of kind {aggregator.kind!r}. Aggregate at the "
            "parameters instead (drop features=)."
        )

    loss_list, L = _stack_losses(losses)
    K = len(loss_list)
    shared = _param_list(shared_params, "shared parameter")
    groups = _task_groups(task_params, K)
    _check_unique([shared, *groups])
    devices = {p.device for _, p in shared}
    if len(devices) > 1:
        raise ValueError(
            f"the shared parameters are on several devices ({sorted(map(str, devices))}); their "
            "Jacobian is one (K, d) tensor, so they must share a device"
        )
    h = loss_weights(aggregator, K, task_weights)
    values = _loss_values(L)
    feats = _features_list(features) if features is not None else []
    if feats:
        # Checked before any work so that a stateful aggregator is not advanced by a failing call.
        below = {id(p) for p in _reachable_leaves(feats)}
        for name, p in shared:
            if id(p) not in below:
                raise ValueError(
                    f"{name} is not reached through the features: features= must be the output "
                    "of the shared parameters"
                )

    if task_params is not None:
        # A group that its own loss does not reach (e.g. groups given in another order than the
        # losses) would silently receive nothing.
        roots = _per_task_roots(loss_list, L, losses)
        for i, group in enumerate(groups):
            lost = _unreached_targets(roots[i], {id(p): name for name, p in group})
            if lost:
                raise ValueError(
                    f"{lost[0]} is not reached by the loss of task {i}"
                    + (f" (nor are {len(lost) - 1} more of its group)" if len(lost) > 1 else "")
                    + ": task_params must list each task's own parameters, in the order of the "
                    "losses"
                )

    if aggregator.kind == "loss" and level == "parameters":
        # LS and the loss weightings: one backward pass of Σ w_i L_i (mtl_opt._one_backward).
        from mtl_opt._one_backward import weighted_sum_backward

        done = weighted_sum_backward(aggregator, loss_list, L, losses, values, shared, groups,
                                     task_weights, retain_graph)
        if isinstance(done, MTLBackwardResult):
            return done
        # A task group reached by another task's loss: the Jacobian path with this step's w.
        from mtl_opt.methods.linear_scalarization import LinearScalarization

        aggregator, task_weights, h = LinearScalarization(done.tolist()), None, done

    # Parameters outside shared and task groups that the losses reach: they get Σ h_i ∇L_i.
    given = {id(p) for _, p in shared} | {id(p) for g in groups for _, p in g}
    others = [p for p in _reachable_leaves(loss_list) if id(p) not in given]

    group_params = [(name, p) for g in groups for name, p in g]
    head_inputs = [p for _, p in group_params] + others
    owners: list[int | None] = [i for i, g in enumerate(groups) for _ in g] + [None] * len(others)
    first = [p for _, p in shared] if level == "parameters" else feats
    plan = None
    if (
        level == "parameters" and factor_linear and K > 1 and parallel is not False
        and is_gramian_weighting(aggregator)
    ):
        plan = plan_linear_layers(L, first, K)
    grads = _task_grads(
        loss_list, L, first, head_inputs, owners, h, parallel, retain_graph or level == "features",
        plan,
    )

    # Every given parameter must be reached by some loss.
    for j, reached in enumerate(grads.first_reached):
        if not reached:
            if level == "parameters":
                raise ValueError(f"{shared[j][0]} is not reached by any loss: no task depends on it")
            raise ValueError(f"features #{j} is not reached by any loss")
    for (name, _), update in zip(group_params, grads.head):
        if update is None:
            raise ValueError(f"{name} is not reached by any loss")
    shared_t = [p for _, p in shared]
    factored = 0 if grads.plan is None or grads.deltas is None else len(grads.plan.factored)
    if factored:
        assert grads.plan is not None and grads.deltas is not None
        hooked = hooked_layers(grads.plan, grads.deltas, dict(zip(grads.plan.rest, grads.blocks or [])))
        if hooked:
            raise RuntimeError(
                f"a hook on the output of the linear layer with bias {shared[hooked[0]][0]} "
                "changed its gradient (y.register_hook or a hook on its autograd node); "
                "factor_linear takes that layer's weight gradient from the gradient before such "
                "hooks, so pass factor_linear=False to mtl_backward (or MultiTaskOptimizer) for "
                "this model"
            )
    if factored or (level == "parameters" and _blocked_eligible(aggregator, grads.blocks)):
        # GramianAggregator at the parameters: M and βᵀG_j per parameter, never the flat G.
        assert isinstance(aggregator, GramianAggregator)
        agg, M, shared_updates = _aggregate_blocks(
            aggregator, grads.blocks or [], shared_t, values, task_weights, grads.plan,
            grads.deltas,
        )
        grads.blocks = grads.deltas = None  # the Jacobian can be freed before .grad is written
        owned = [True] * len(shared_updates)
    else:
        G = grads.flat()
        # The aggregation of the Jacobian (K, d) over the concatenation.
        if task_weights is None:
            agg = aggregator.aggregate(G, losses=values)
        else:
            agg = aggregator.aggregate(G, losses=values, task_weights=task_weights)
        direction = agg.direction
        if tuple(direction.shape) != (G.shape[1],):
            raise RuntimeError(
                f"{type(aggregator).__name__} returned a direction of shape "
                f"{tuple(direction.shape)}, expected ({G.shape[1]},)"
            )
        if type(aggregator).aggregate is not GradientAggregator.aggregate:
            # A subclass that replaced aggregate() skipped its direction check.
            check_direction(direction, aggregator, beta=agg.weights, gramian=agg.gramian, G=G)
        M = agg.gramian if agg.gramian is not None else gramian_of(G)
        del G

        # Shared updates: the direction itself, or (features=) one pass of Σ β_i L_i through z.
        if level == "parameters":
            shared_updates = _split(direction, shared_t)
            owned = [False] * len(shared_updates)  # views of the returned direction: copied
        else:
            grad_z = [piece.view_as(z) for piece, z in zip(_split_flat(direction, feats), feats)]
            grads.G = None
            through = torch.autograd.grad(
                feats, shared_t, grad_outputs=grad_z, retain_graph=retain_graph, allow_unused=True
            )
            for (name, _), g in zip(shared, through):
                if g is None:
                    raise ValueError(
                        f"{name} is not reached through the features: features= must be the "
                        "output of the shared parameters"
                    )
            shared_updates = list(through)  # type: ignore[arg-type]
            # Fresh tensors from autograd, unless one passes grad_z (hence the direction)
            # through unchanged (e.g. features that are a view of a parameter).
            direction_storage = direction.untyped_storage().data_ptr()
            owned = [g.untyped_storage().data_ptr() != direction_storage for g in through]  # type: ignore[union-attr]

    # Everything this call writes is checked finite before anything is written: the shared
    # direction by the aggregation (check_direction), the rest here, in one fused check.
    written = [
        (f"{name}, from the loss of task {owner}" if owner is not None else
         f"the parameter of shape {tuple(p.shape)} outside shared_params and task_params "
         "(it receives Σ_i h_i ∇L_i)", g)
        for (p, g, owner), name in zip(
            zip(head_inputs, grads.head, owners),
            [n for n, _ in group_params] + [""] * len(others),
        )
        if g is not None
    ]
    if level == "features":
        written += [
            (f"{name} (through the features)", g) for (name, _), g in zip(shared, shared_updates)
        ]
    check_gradients(written)

    # Head updates (group i: h_i ∇L_i; other parameters: Σ h_i ∇L_i) were combined above: fresh
    # tensors owned by this call.
    for p, g, own in zip(shared_t, shared_updates, owned):
        _accumulate(p, g, owned=own)
    for p, g in zip(head_inputs, grads.head):
        if g is not None:
            _accumulate(p, g, owned=True)
    if isinstance(agg, _BlockedAggregationResult):
        agg._freeze_versions()

    norms = torch.sqrt(torch.clamp(torch.diagonal(M), min=0.0))
    outer = norms[:, None] * norms[None, :]
    cosines = torch.where(outer > 0, M / torch.where(outer > 0, outer, torch.ones_like(outer)),
                          torch.zeros_like(M))
    return MTLBackwardResult(
        aggregation=agg,
        losses=values,
        loss_weights=h,
        gramian=M,
        grad_norms=norms,
        cosines=cosines,
        batched=grads.batched,
        fallback_reason=grads.fallback_reason,
        level=level,
        factored_params=factored,
    )


def _split_flat(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    return list(torch.split(flat, [t.numel() for t in like]))


def _split(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    return [piece.view(p.shape) for piece, p in zip(_split_flat(flat, params), params)]


def _accumulate(p: Tensor, g: Tensor, *, owned: bool = False) -> None:
    """Add ``g`` to ``p.grad`` like autograd's accumulation.

    Without a ``.grad``, an ``owned`` gradient (a fresh tensor that nothing else holds) of
    ``p``'s dtype, device and strides becomes ``.grad`` itself, as autograd's own accumulation
    steals a fresh gradient; any other is copied into a fresh tensor laid out like ``p``.
    """
    g = g.detach()
    if p.grad is None:
        if (
            owned and g.dtype == p.dtype and g.device == p.device and not g.is_sparse
            and g.shape == p.shape and g.stride() == p.stride()
        ):
            p.grad = g
            return
        g = g.to(dtype=p.dtype, device=p.device)
        fresh = torch.empty_like(p, memory_format=torch.preserve_format)
        fresh.copy_(g)
        p.grad = fresh
        return
    g = g.to(dtype=p.dtype, device=p.device)
    if p.grad.is_sparse:
        p.grad = p.grad + g
    else:
        p.grad.add_(g)


# --------------------------------------------------------------------------------------------
# The blocked path: a GramianAggregator over the per-parameter blocks of G
# --------------------------------------------------------------------------------------------
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


def _blocked_eligible(aggregator: GradientAggregator, blocks: list[Tensor] | None) -> bool:
    """Whether the aggregation can run on the blocks: a Gramian weighting
    (:func:`mtl_opt.aggregator.is_gramian_weighting`, asked of its declared ``kind``), over
    float32/float64 blocks of one dtype on one real device with d > 0. Anything else takes the
    flat path."""
    if blocks is None or not blocks or not is_gramian_weighting(aggregator):
        return False
    dtype, device = blocks[0].dtype, blocks[0].device
    if dtype not in (torch.float32, torch.float64) or device.type == "meta":
        return False
    if any(b.dtype != dtype or b.device != device for b in blocks):
        return False
    return sum(b.shape[1] for b in blocks) > 0


def _gram_blocks(blocks: list[Tensor]) -> Tensor:
    """``Σ_j G_j G_jᵀ`` in the blocks' dtype, on their device."""
    M = _gram(blocks[0])
    for b in blocks[1:]:
        if b.shape[1] > 2 * GRAMIAN_BLOCK:
            M.add_(_gram(b))
        elif b.shape[1] > 0:
            M.addmm_(b, b.T)
    return M


def gramian_of_blocks(
    blocks: list[Tensor],
    *,
    extra: Tensor | None = None,
    extra_rows: Callable[[], list[Tensor]] | None = None,
) -> Tensor:
    """:func:`mtl_opt._validation.gramian_of` of ``G = [G_1 | ... | G_n]`` given its column
    blocks, without concatenating them: ``M = Σ_j G_j G_jᵀ``, float64 CPU, exactly symmetric.

    Same semantics as ``gramian_of``: the product runs in the blocks' dtype; a float32 diagonal
    entry that is non-finite or below :func:`~mtl_opt._validation.underflow_threshold` of the
    total width (of a row that is not exactly zero) triggers a float64 recomputation; a
    non-finite result raises naming the task rows that hold NaN/inf, or the overflow.

    ``extra`` is a share of ``M`` computed elsewhere (K × K, float64, on the blocks' device; the
    factored linear layers), added before the checks and moved to the CPU in the same transfer.
    When it is not finite, ``extra_rows()`` materialises the Jacobian blocks it stands for, so
    that the error names the same rows as the unfactored path.
    """
    M = _gram_blocks(blocks) if blocks else None
    if extra is not None:
        both = extra[None] if M is None else torch.stack([M.to(torch.float64), extra])
        both = both.cpu()  # the one device-to-host transfer
        a_extra = both[-1].numpy()
        if not np.isfinite(a_extra).all():
            if extra_rows is not None:
                gramian_of_blocks(blocks + extra_rows())  # raises, naming the rows
            raise ValueError("the Gramian G Gᵀ of the linear layers is not finite")
        a = _checked_block_gramian(blocks, both[0].numpy()) if M is not None else np.zeros_like(a_extra)
        a = a + a_extra
        if not np.isfinite(a).all():
            raise ValueError("the Gramian G Gᵀ overflows float64; rescale the losses")
    else:
        assert M is not None, "gramian_of_blocks needs blocks or extra"
        if M.device.type != "cpu":
            M = M.cpu()  # the one device-to-host transfer
        a = _checked_block_gramian(blocks, M.numpy())
    return torch.from_numpy((a + a.T) * 0.5)


def _checked_block_gramian(blocks: list[Tensor], a: np.ndarray) -> np.ndarray:
    """``a = Σ_j G_j G_jᵀ`` (on the CPU, in the blocks' dtype or float64) as float64, with the
    float32 range fallback and the errors of :func:`gramian_of_blocks`."""
    K = blocks[0].shape[0]
    d = sum(b.shape[1] for b in blocks)
    if blocks[0].dtype != torch.float64:
        a = a.astype(np.float64)
        if not _diagonal_in_range(a, underflow_threshold(d)):
            diag = np.diagonal(a)
            suspect = ~np.isfinite(diag) | (diag < underflow_threshold(d))
            recompute = bool((~np.isfinite(diag)).any())
            for i in np.nonzero(suspect)[0].tolist():
                if recompute:
                    break
                if diag[i] != 0.0 or any(bool(b[i].any()) for b in blocks):
                    recompute = True  # a nonzero row whose squared norm underflowed
            if recompute:
                a = _gram_blocks([b.double() for b in blocks]).cpu().numpy()
    if not np.isfinite(a).all():
        finite_rows = torch.ones(K, dtype=torch.bool)
        for b in blocks:
            finite_rows &= torch.isfinite(b).all(dim=1).cpu()
        if not bool(finite_rows.all()):
            bad = [i for i, ok in enumerate(finite_rows.tolist()) if not ok]
            raise ValueError(f"the Jacobian is not finite: task row(s) {bad} contain NaN or inf")
        bad = [i for i, x in enumerate(np.diagonal(a).tolist()) if not np.isfinite(x)]
        if bad:
            raise ValueError(
                f"the squared norm of task row(s) {bad} of the Jacobian overflows float64; "
                "rescale the losses"
            )
        raise ValueError("the Gramian G Gᵀ overflows float64; rescale the losses")
    return a


def _aggregate_blocks(
    aggregator: GramianAggregator, blocks: list[Tensor], params: list[Tensor], values: Tensor,
    task_weights: object | None, plan: LayerPlan | None = None, deltas: list[Tensor] | None = None,
) -> tuple[_BlockedAggregationResult, Tensor, list[Tensor]]:
    """What ``aggregator.aggregate(cat(blocks), losses=values, task_weights=...)`` computes, on
    the blocks: the same context checks, Gramian and one ``_checked_weights`` call (so stateful
    methods advance exactly as with ``aggregate``), then ``βᵀ G_j`` per parameter.

    With a ``plan`` (factored linear weights, their uses' output gradients ``deltas``), the
    blocks are the rows of ``plan.rest`` only; the factored weights' Gramian share and ``βᵀ G_j``
    come from ``(X, Δ)``."""
    ref = blocks[0] if deltas is None else deltas[0]
    losses_t, weights_t = aggregator._check_context(
        ref.shape[0], values, task_weights  # type: ignore[arg-type]
    )
    if plan is None or deltas is None:
        M = gramian_of_blocks(blocks)
        owners: Sequence[int] = range(len(params))
    else:
        M = gramian_of_blocks(
            blocks, extra=factored_gramian(plan, deltas),
            extra_rows=lambda: factored_rows(plan, deltas),
        )
        owners = plan.rest
    d = sum(p.numel() for p in params)
    beta = aggregator._checked_weights(M, losses_t, weights_t, rtol=gramian_rtol(ref.dtype, d))
    # βᵀ G_j as a (1, K) × (K, n_j) product (β moved to the parameters' device and dtype once):
    # what combine_rows computes, as one GEMM per block.
    row = beta.to(device=ref.device, dtype=ref.dtype, non_blocking=True)
    updates = {} if plan is None or deltas is None else factored_updates(plan, deltas, row, params)
    factored_pieces = list(updates.values())  # (Σ β_k Δ_k)ᵀ X: not covered by the βᵀG bound
    for j, b in zip(owners, blocks):
        updates[j] = torch.mm(row[None], b).view(params[j].shape)
    pieces = [updates[j] for j in range(len(params))]
    check_direction(pieces, aggregator, beta=beta, gramian=M, unbounded=factored_pieces)
    return _BlockedAggregationResult(pieces, beta, M), M, pieces
