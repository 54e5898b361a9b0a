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
where the heads feed it (same result to rounding). The batched call holds K rows of every
input's gradient, the blocks
``G_j`` (K × n_j) of ``G = [G_1 | ... | G_n]``; the per-task loop copies each task's gradients
straight into ``G`` (peak: one task's gradients plus ``G``).

No flat Jacobian for Gramian methods: when the aggregator is a :class:`GramianAggregator` (that
keeps the base class's ``aggregate``) and the blocks come from the batched call, ``G`` is never
concatenated. The Gramian is ``M = Σ_j G_j G_jᵀ`` (in the blocks' dtype, then float64 on the
CPU, with the checks and the float32 range fallback of :func:`mtl_opt._gramian.gramian_of`;
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
taken with respect to ``z`` instead of ``θ``: ``Z = [∇_z L_1; ...; ∇_z L_K]`` comes from one
backward pass per task that stops at ``z`` (``parallel="auto"`` or ``False``). Each pass runs
through the graph of its own loss only, so when the heads are separate modules the K passes
together cost one backward pass of the heads; the batched call (``parallel=True``) would run
every head K times, once for each row of ``I_K`` (measured on the RRG small model: the step at
1.8–1.95× the weighted-sum step batched, 1.02–1.06× with the per-task passes). The aggregator (a :class:`GramianAggregator`) computes its
weights ``β`` from ``Z Zᵀ``, and one backward pass of ``Σ β_i L_i`` through the encoder (started
at ``z`` with the gradient ``βᵀ Z``) fills the shared ``.grad``. This is Sener & Koltun's
MGDA-UB ("Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018): since
``∇_θ L_i = (∂z/∂θ)ᵀ ∇_z L_i``, weights chosen on ``Z`` approximate those chosen on ``G`` (for
MGDA they minimise an upper bound of ``‖βᵀ G‖``), they are not the parameter-level weights. It
needs every effect of the shared parameters on the losses to pass through ``z``.

Stages
------
:func:`mtl_backward` runs five stages, one module each in :mod:`mtl_opt._backward`:

1. ``inputs``: the arguments checked once (:class:`~mtl_opt._backward.inputs.BackwardCall`),
   and the graph walk that finds the heads (task groups and other parameters);
2. ``jacobian``: the Jacobian blocks, batched or looped (with the fallback), the heads'
   combined gradients, the reach and hook checks;
3. ``weights.gramian``: ``M = G Gᵀ`` from the blocks (:mod:`mtl_opt._gramian` owns the products,
   the float64 range fallback and the non-finite errors);
4. ``weights.weigh``: ``β`` and the shared updates ``βᵀ G_j`` (or ``aggregate(G)``);
5. ``update``: the pass through the encoder at the features, the finiteness check of
   everything written, the accumulation into ``.grad`` and the result.

The blocks cross from stage 2 to stage 3 as one object, so that a step between them (an
all-reduce of the per-task gradients over a process group) is one call on it,
``jac.map_rows(fn)``.

Limits
------
The gradients come from ``torch.autograd.grad``, not ``.backward()``: hooks that only
``.backward()`` fires (``register_post_accumulate_grad_hook``, DistributedDataParallel's
gradient all-reduce) do not run, and tensor hooks on the inputs see K-row batched gradients on
the batched path, so DDP does not average them; under a process group the ``distributed=``
option does (:mod:`mtl_opt.distributed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from torch import Tensor

from mtl_opt._backward.graph import _per_task_roots, _reachable_leaves, _unreached_targets  # noqa: F401
from mtl_opt._backward.inputs import (  # noqa: F401  (Params, Parallel, _param_list: the optimizer's)
    Params,
    Parallel,
    _check_unique,
    _param_list,
    _stack_losses,
    heads_of,
    loss_weights,
    prepare_call,
)
from mtl_opt._backward.jacobian import BatchedJacobianFallbackWarning, jacobian_blocks
from mtl_opt._backward.result import MTLBackwardResult, _BlockedAggregationResult  # noqa: F401
from mtl_opt._backward.update import write_updates
from mtl_opt._backward.weights import gramian, weigh
from mtl_opt._gramian import gramian_of_blocks  # noqa: F401
from mtl_opt.distributed import DistributedMode, synchroniser
from mtl_opt.aggregator import GradientAggregator

__all__ = [
    "BatchedJacobianFallbackWarning",
    "MTLBackwardResult",
    "gramian_of_blocks",
    "loss_weights",
    "mtl_backward",
]


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
    distributed: DistributedMode = "global",
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

        distributed: under an initialised ``torch.distributed`` process group, ``"global"``
            aggregates the global batch's Jacobian (averaged over the ranks; the same update on
            every rank), ``"local"`` averages the ranks' own directions, ``"off"`` ignores the
            group (see :mod:`mtl_opt.distributed`).

    Returns:
        :class:`MTLBackwardResult` with the aggregation and the Jacobian's diagnostics.

    Every other parameter the losses reach receives ``Σ_i h_i ∇L_i`` (see the module docstring
    for ``h``). Nothing is written to ``.grad`` unless the whole call succeeds.
    """
    sync = synchroniser(distributed)  # None: no process group (or distributed="off")
    if sync is not None:
        loss_list, _ = _stack_losses(losses)
        sync.check_step(loss_list)
        if sync.mode == "local" or features is not None:  # this rank's call, then averaged
            return sync.averaged_call(lambda agg: mtl_backward(
                losses, shared_params, agg, task_params=task_params,
                task_weights=task_weights, features=features, retain_graph=retain_graph,
                parallel=parallel, factor_linear=factor_linear, distributed="off"),
                aggregator, loss_list)
    call = prepare_call(
        losses, shared_params, aggregator, task_params=task_params, task_weights=task_weights,
        features=features, retain_graph=retain_graph, parallel=parallel,
        factor_linear=factor_linear, sync=sync,
    )
    if call.aggregator.kind == "loss" and call.level == "parameters":
        # LS and the loss weightings: one backward pass of Σ w_i L_i (mtl_opt._one_backward).
        from mtl_opt._one_backward import weighted_sum_backward

        with sync.new_grads_averaged(call.loss_list) if sync else contextlib.nullcontext([]) as out:
            done = weighted_sum_backward(
                call.aggregator, call.loss_list, call.L, losses, call.values, call.shared,
                call.groups, task_weights, retain_graph,
            )
            out.append(done)
        if isinstance(done, MTLBackwardResult):
            return done
        call = call.with_loss_weights(done)  # a task group reached by another task's loss

    heads = heads_of(call)  # 1. graph walk: the parameters outside the Jacobian
    jac = jacobian_blocks(call, heads)  # 2. the Jacobian blocks, batched or per task
    M = gramian(call, jac)  # 3. M = G Gᵀ of the blocks (None: aggregate(G) forms it)
    step = weigh(call, jac, M)  # 4. the weights β and the shared updates
    return write_updates(call, heads, jac, step)  # 5. into .grad
