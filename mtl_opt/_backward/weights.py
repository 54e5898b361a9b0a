"""Stages 3 and 4 of :func:`mtl_opt.mtl_backward`: the Gramian of the Jacobian blocks, and the
aggregator's weights with the shared parameters' updates.

A Gramian weighting over float32/float64 blocks (:func:`_blocked_eligible`), or any plan with
factored linear layers, never concatenates ``G``: :func:`gramian` forms ``M = Σ_j G_j G_jᵀ`` (plus
the factored layers' share) with :func:`mtl_opt._gramian.gramian_of_blocks`, the one owner of the
float64 range fallback and the non-finite errors, and :func:`weigh` calls the aggregator's weights
once (stateful methods advance exactly as with ``aggregate``) and forms ``βᵀ G_j`` per parameter.
Any other aggregation runs ``aggregator.aggregate`` on the concatenated ``G`` (which forms its
Gramian with :func:`mtl_opt._gramian.gramian_of`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mtl_opt._backward.inputs import BackwardCall
from mtl_opt._backward.jacobian import _TaskGrads
from mtl_opt._backward.result import _BlockedAggregationResult
from mtl_opt._gramian import gramian_of, gramian_of_blocks
from mtl_opt._layerwise import factored_gramian, factored_rows, factored_updates
from mtl_opt._validation import check_direction, gramian_rtol
from mtl_opt.aggregator import (
    AggregationResult,
    GradientAggregator,
    GramianAggregator,
    is_gramian_weighting,
)

__all__ = ["Weighted", "gramian", "weigh"]


@dataclass(frozen=True)
class Weighted:
    """The aggregation of one call: the aggregator's result, the float64 Gramian, and the
    shared parameters' updates (``None`` at the features, where one backward pass through the
    encoder gives them; ``owned[j]``: update ``j`` is a fresh tensor ``.grad`` may become)."""

    aggregation: AggregationResult
    gramian: Tensor
    shared_updates: list[Tensor] | None
    owned: list[bool]


def gramian(call: BackwardCall, jac: _TaskGrads) -> Tensor | None:
    """Stage 3: ``M = G Gᵀ`` (float64, CPU) from the blocks and the factored layers' share, or
    ``None`` when the aggregation takes the concatenated ``G`` (the aggregator forms ``M``)."""
    if not _on_blocks(call, jac):
        return None
    blocks = jac.blocks or []
    plan, deltas = jac.plan, jac.deltas
    if plan is None or deltas is None:
        return gramian_of_blocks(blocks)
    return gramian_of_blocks(
        blocks, extra=factored_gramian(plan, deltas),
        extra_rows=lambda: factored_rows(plan, deltas),
    )


def weigh(call: BackwardCall, jac: _TaskGrads, M: Tensor | None) -> Weighted:
    """Stage 4: the weights ``β`` and the shared parameters' updates ``βᵀ G_j`` (or the
    aggregator's direction split into the parameters' shapes); frees the Jacobian's rows."""
    if M is not None:
        return _weigh_blocks(call, jac, M)
    return _weigh_flat(call, jac)


def _on_blocks(call: BackwardCall, jac: _TaskGrads) -> bool:
    return bool(jac.n_factored) or (
        call.level == "parameters" and _blocked_eligible(call.aggregator, jac.blocks)
    )


def _weigh_blocks(call: BackwardCall, jac: _TaskGrads, M: Tensor) -> Weighted:
    """What ``aggregator.aggregate(cat(blocks), losses=values, task_weights=...)`` computes, on
    the blocks: the same context checks and one ``_checked_weights`` call, then ``βᵀ G_j`` per
    parameter. With factored linear weights (their uses' output gradients ``deltas``), the
    blocks are the rows of ``plan.rest`` only; the factored weights' ``βᵀ G_j`` come from
    ``(X, Δ)``."""
    aggregator = call.aggregator
    assert isinstance(aggregator, GramianAggregator)
    params = call.shared_tensors
    blocks, plan, deltas = jac.blocks or [], jac.plan, jac.deltas
    ref = blocks[0] if deltas is None else deltas[0]
    losses_t, weights_t = aggregator._check_context(
        ref.shape[0], call.values, call.task_weights  # type: ignore[arg-type]
    )
    owners: Sequence[int] = range(len(params)) if plan is None or deltas is None else plan.rest
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
    jac.blocks = jac.deltas = None  # the Jacobian can be freed before .grad is written
    return Weighted(_BlockedAggregationResult(pieces, beta, M), M, pieces, [True] * len(pieces))


def _weigh_flat(call: BackwardCall, jac: _TaskGrads) -> Weighted:
    """``aggregator.aggregate`` of the concatenated Jacobian (K, d)."""
    aggregator = call.aggregator
    G = jac.flat()
    if call.task_weights is None:
        agg = aggregator.aggregate(G, losses=call.values)
    else:
        agg = aggregator.aggregate(G, losses=call.values, task_weights=call.task_weights)
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
    jac.G = None
    if call.level == "features":
        return Weighted(agg, M, None, [])
    updates = _split(direction, call.shared_tensors)
    return Weighted(agg, M, updates, [False] * len(updates))  # views of the direction: copied


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


def _split_flat(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    return list(torch.split(flat, [t.numel() for t in like]))


def _split(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    return [piece.view(p.shape) for piece, p in zip(_split_flat(flat, params), params)]
