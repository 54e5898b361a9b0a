"""Many methods on one Jacobian: the Gramian once, the heavy passes shared.

A comparison study that runs N methods on the same Jacobian ``G`` (K × d) would, called one by
one, pay N Gramians ``G Gᵀ`` and N combinations ``βᵀ G``: 2N passes over ``G``.
:func:`aggregate_many` pays two, whatever N:

1. ``M = G Gᵀ`` once (one device-to-host transfer of a K × K matrix);
2. every Gramian method solves its K × K problem on ``M`` (float64, CPU);
3. the N weight vectors are stacked into ``B`` (N × K) and ``D = B G`` is one matrix product.

Methods that are not Gramian weightings (element-wise ones such as GradDrop) are called on ``G``
as usual. Each method sees exactly what a separate call would show it: its state (random
generators, warm starts, update schedules) advances the same way, so the directions equal those
of separate calls up to floating-point rounding (the stacked product may sum in another order).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from mtl_opt._validation import check_direction, check_jacobian, gramian_of, gramian_rtol
from mtl_opt.aggregator import (
    AggregationResult,
    GradientAggregator,
    GramianAggregator,
    is_gramian_weighting,
    combine_rows,
)

__all__ = ["aggregate_many"]


def aggregate_many(
    G: Tensor,
    aggregators: Mapping[str, GradientAggregator] | Iterable[GradientAggregator | str],
    /,
    *,
    losses: Tensor | None = None,
    task_weights: Tensor | None = None,
    return_results: bool = False,
) -> dict[str, Tensor] | dict[str, AggregationResult]:
    """Directions of several methods on the same Jacobian, with one Gramian for all.

    Args:
        G: the Jacobian (K, d), float, finite.
        aggregators: a mapping ``label -> aggregator``, or a sequence of aggregators and/or
            registered method names (built with their default hyperparameters); a sequence is
            labelled by each method's registered name, which must then be unique.
        losses, task_weights: call-time context, given to every method exactly as a separate
            call would (so a method that takes no task weights raises if ``task_weights`` is set).
        return_results: return :class:`AggregationResult` (direction, weights, Gramian) per
            label instead of the bare directions.

    Returns:
        ``{label: direction}`` (each (d,), ``G``'s dtype and device), in the order given; or
        ``{label: AggregationResult}`` with ``return_results=True``.
    """
    named = _label(aggregators)
    check_jacobian(G)
    K = G.shape[0]

    gramian_methods = {k: a for k, a in named.items() if is_gramian_weighting(a)}
    results: dict[str, AggregationResult] = {}
    if gramian_methods:
        M64 = gramian_of(G)  # also the finiteness check of G
        rtol = gramian_rtol(G.dtype, G.shape[1])
        betas: dict[str, Tensor] = {}
        for label, agg in gramian_methods.items():
            losses_t, weights_t = agg._check_context(K, losses, task_weights)
            betas[label] = agg._checked_weights(M64, losses_t, weights_t, rtol=rtol)
        B = torch.stack(list(betas.values()))
        D = combine_rows(B, G)  # (N, d): one product for all; half dtypes combined in float32
        for i, (label, beta) in enumerate(betas.items()):
            check_direction(D[i], gramian_methods[label], beta=beta, gramian=M64)
            results[label] = AggregationResult(direction=D[i], weights=beta, gramian=M64)
    for label, agg in named.items():
        if label not in gramian_methods:
            results[label] = agg.aggregate(G, losses=losses, task_weights=task_weights)

    ordered = {label: results[label] for label in named}
    if return_results:
        return ordered
    return {label: r.direction for label, r in ordered.items()}


def _label(
    aggregators: Mapping[str, GradientAggregator] | Iterable[GradientAggregator | str],
) -> dict[str, GradientAggregator]:
    from mtl_opt.registry import get_aggregator

    if isinstance(aggregators, Mapping):
        named = dict(aggregators)
        for label, agg in named.items():
            if not isinstance(label, str):
                raise TypeError(f"aggregator labels must be strings, got {label!r}")
            if not isinstance(agg, GradientAggregator):
                raise TypeError(
                    f"aggregators[{label!r}] is a {type(agg).__name__}, not a GradientAggregator"
                )
    else:
        if isinstance(aggregators, (str, GradientAggregator)):
            raise TypeError("aggregate_many takes a sequence or mapping of aggregators, not one")
        named = {}
        for item in aggregators:
            agg = get_aggregator(item) if isinstance(item, str) else item
            if not isinstance(agg, GradientAggregator):
                raise TypeError(f"{item!r} is not a GradientAggregator or a method name")
            label = getattr(type(agg), "method_name", type(agg).__name__)
            if label in named:
                raise ValueError(
                    f"two aggregators are both labelled {label!r}; pass a mapping "
                    "{label: aggregator} to tell them apart"
                )
            named[label] = agg
    if not named:
        raise ValueError("aggregate_many needs at least one aggregator")
    return named
