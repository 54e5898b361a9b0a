"""Stage 5 of :func:`mtl_opt.mtl_backward`: the updates into ``.grad``.

At the features, the shared parameters' updates come from one backward pass of ``Σ β_i L_i``
through the encoder (started at ``z`` with ``βᵀ Z``). Everything the call writes is checked finite
before anything is written; then every update is accumulated like autograd's accumulation, and the
result carries the Gramian's diagnostics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_opt._backward.inputs import BackwardCall, Heads
from mtl_opt._backward.jacobian import _TaskGrads
from mtl_opt._backward.result import MTLBackwardResult, _BlockedAggregationResult, gramian_diagnostics
from mtl_opt._backward.weights import Weighted, _split_flat
from mtl_opt._validation import check_gradients

__all__ = ["write_updates"]


def write_updates(call: BackwardCall, heads: Heads, jac: _TaskGrads, step: Weighted) -> MTLBackwardResult:
    """Accumulate the shared, task and other parameters' updates into ``.grad`` (all or none)."""
    if step.shared_updates is None:
        shared_updates, owned = _through_features(call, step.aggregation.direction)
    else:
        shared_updates, owned = step.shared_updates, step.owned

    # Everything this call writes is checked finite before anything is written: the shared
    # direction by the aggregation (check_direction), the rest here, in one fused check.
    names = heads.names + [""] * (len(heads.params) - len(heads.names))
    written = [
        (f"{name}, from the loss of task {owner}" if owner is not None else
         f"the parameter of shape {tuple(p.shape)} outside shared_params and task_params "
         "(it receives Σ_i h_i ∇L_i)", g)
        for p, g, owner, name in zip(heads.params, jac.head, heads.owners, names)
        if g is not None
    ]
    if call.level == "features":
        written += [
            (f"{name} (through the features)", g) for (name, _), g in zip(call.shared, shared_updates)
        ]
    check_gradients(written)

    # Head updates (group i: h_i ∇L_i; other parameters: Σ h_i ∇L_i) were combined by the
    # Jacobian stage: fresh tensors owned by this call.
    for p, g, own in zip(call.shared_tensors, shared_updates, owned):
        _accumulate(p, g, owned=own)
    for p, g in zip(heads.params, jac.head):
        if g is not None:
            _accumulate(p, g, owned=True)
    if isinstance(step.aggregation, _BlockedAggregationResult):
        step.aggregation._freeze_versions()

    norms, cosines = gramian_diagnostics(step.gramian)
    return MTLBackwardResult(
        aggregation=step.aggregation,
        losses=call.values,
        loss_weights=call.h,
        gramian=step.gramian,
        grad_norms=norms,
        cosines=cosines,
        batched=jac.batched,
        fallback_reason=jac.fallback_reason,
        level=call.level,
        factored_params=jac.n_factored,
    )


def _through_features(call: BackwardCall, direction: Tensor) -> tuple[list[Tensor], list[bool]]:
    """The shared parameters' updates at the features: one pass of ``Σ β_i L_i`` through the
    encoder, started at the features with the gradient ``βᵀ Z`` (the direction)."""
    feats = call.features
    grad_z = [piece.view_as(z) for piece, z in zip(_split_flat(direction, feats), feats)]
    through = torch.autograd.grad(
        feats, call.shared_tensors, grad_outputs=grad_z, retain_graph=call.retain_graph,
        allow_unused=True,
    )
    for (name, _), g in zip(call.shared, through):
        if g is None:
            raise ValueError(
                f"{name} is not reached through the features: features= must be the output "
                "of the shared parameters"
            )
    # Fresh tensors from autograd, unless one passes grad_z (hence the direction) through
    # unchanged (e.g. features that are a view of a parameter).
    direction_storage = direction.untyped_storage().data_ptr()
    owned = [g.untyped_storage().data_ptr() != direction_storage for g in through]  # type: ignore[union-attr]
    return list(through), owned  # type: ignore[arg-type]


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
