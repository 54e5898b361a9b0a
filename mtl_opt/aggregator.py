"""The aggregator interface: a Jacobian in, one update direction out.

Tasks ``i = 1..K`` have gradients ``g_i`` over the same ``d`` shared parameters, stacked as the
Jacobian ``G`` of shape ``(K, d)``. An aggregator maps ``G`` to one direction of shape ``(d,)``.

Most methods only need the Gramian ``M = G Gᵀ`` (K × K) to find coefficients ``β`` and then return
``d = βᵀ G``; they subclass :class:`GramianAggregator` and implement :meth:`GramianAggregator.weights`.
That costs two passes over ``G`` (one matmul for ``M``, one for ``βᵀG``); everything
method-specific is a K × K problem solved in float64 on the CPU.

Call-time context
-----------------
Some methods need more than the Jacobian: MGDA's loss normalisation needs the task losses, and a
training loop may pass per-step task weights (the CAME-Grad authors call
``optimizer.step([loss_lm, loss_cls], task_weights=[1, 4])``). Both travel as keyword arguments of
:meth:`GradientAggregator.aggregate` / ``__call__``. A method that cannot use a piece of context it
was given raises :class:`ValueError` rather than ignoring it (see ``uses_losses`` and
``accepts_task_weights``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtl_opt._gramian import gramians_of_batch
from mtl_opt._validation import (
    check_direction,
    check_finite_rows,
    check_gramian,
    check_gramian_batch,
    check_jacobian,
    check_task_vector,
    gramian_of,
    gramian_rtol,
)
from mtl_opt.solvers import gramian_precision

__all__ = [
    "AggregationResult", "GradientAggregator", "GramianAggregator", "KINDS", "PROPERTIES", "STATES",
    "is_gramian_weighting",
]

#: What a method is, declared by its class attribute ``kind``:
#: ``"gramian"``: a Gramian weighting, ``β = weights(M, losses=, task_weights=)`` and ``d = βᵀG``;
#: ``"loss"``: a loss weighting, ``d = Σ w_i g_i`` with ``w`` from the losses (and call context)
#: alone, so no Jacobian is needed; ``"general"``: the direction is computed from ``G`` itself.
KINDS: tuple[str, ...] = ("gramian", "loss", "general")

#: The properties a method may declare in its ``properties`` (each checked by a test):
#: ``non_conflicting``: ``G d ≥ 0`` (no task's loss increases to first order);
#: ``permutation_invariant``: permuting the rows of ``G`` leaves ``d`` unchanged;
#: ``linear_under_scaling``: ``agg(s G) = s · agg(G)`` for ``s > 0``;
#: ``stationary_at_pareto_stationary``: ``d = 0`` when a convex combination of the rows is 0.
#: What a method keeps between calls, declared by its class attribute ``state``: ``"none"``;
#: ``"random"``: a seeded generator (``seed=``), so calls differ and :meth:`reset` re-seeds;
#: ``"tracked"``: quantities tracked over calls (EMAs, learned weights, steps) in ``state_dict``;
#: ``"tracked, random"``: both.
STATES: tuple[str, ...] = ("none", "random", "tracked", "tracked, random")

PROPERTIES: tuple[str, ...] = (
    "non_conflicting", "permutation_invariant", "linear_under_scaling",
    "stationary_at_pareto_stationary",
)


@dataclass(frozen=True)
class AggregationResult:
    """What one aggregation produced.

    Attributes:
        direction: the update direction, shape ``(d,)``, dtype and device of ``G``.
        weights: the coefficients ``β`` with ``direction = βᵀ G`` (float64, CPU), or ``None`` for
            methods that are not a Gramian weighting.
        gramian: ``M = G Gᵀ`` (float64, CPU) when the method computed it, else ``None``.
    """

    direction: Tensor
    weights: Tensor | None = None
    gramian: Tensor | None = None


class GradientAggregator:
    """Base class of every aggregator: ``agg(G) -> d``.

    Subclasses implement :meth:`_aggregate`. Hyperparameters are constructor keywords, stored as
    attributes of the same name, so ``repr`` and :meth:`hyperparameters` show them.

    Class attributes:
        uses_losses: the method can use the task losses passed at call time.
        requires_losses: the method cannot run without them.
        accepts_task_weights: the method has a notion of per-task weights that a call may override.
        kind: what the method is (see :data:`KINDS`); the engine asks it and never inspects
            which methods a subclass overrode. ``"general"`` here, ``"gramian"`` on
            :class:`GramianAggregator`, ``"loss"`` on :class:`mtl_opt.LossWeighting` and linear
            scalarization. A subclass that inherits ``"gramian"`` or ``"loss"`` but replaces the
            code that keeps that promise (``aggregate``, ``_aggregate`` or
            ``_validate_jacobian``) becomes ``"general"``; one that declares the kind in its
            own body while replacing ``aggregate`` or ``_validate_jacobian`` is a
            :class:`TypeError` (a class may replace ``_aggregate`` for speed and still declare
            its kind: it then promises the same ``βᵀG``).
        needs_jacobian: derived from ``kind``, never declared: False for the loss weightings,
            whose update is ``Σ_i w_i ∇L_i`` with ``w`` given by :meth:`jacobian_free_weights`;
            :func:`mtl_opt.mtl_backward` then runs one backward pass of the weighted sum and
            builds no Jacobian.
        state: what the method keeps between calls, from :data:`STATES`.
        properties: the mathematical properties the method has, from :data:`PROPERTIES`
            (``mtl-opt methods`` lists them; tests/test_method_properties.py checks each).
    """

    kind: ClassVar[str] = "general"
    needs_jacobian: ClassVar[bool] = True
    state: ClassVar[str] = "none"
    properties: ClassVar[frozenset[str]] = frozenset()
    uses_losses: ClassVar[bool] = False
    requires_losses: ClassVar[bool] = False
    accepts_task_weights: ClassVar[bool] = False

    def __init_subclass__(cls, protocol: bool = False, **kwargs: Any) -> None:
        """Checks the declarations and derives ``needs_jacobian``; ``protocol=True`` marks the
        base classes that define how a kind is computed (:class:`GramianAggregator`,
        :class:`mtl_opt.LossWeighting`)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "needs_jacobian" in own:
            raise TypeError(
                f"{cls.__name__} sets needs_jacobian; declare kind = 'loss' (no Jacobian), "
                "'gramian' or 'general' instead: needs_jacobian is derived from it"
            )
        if cls.kind not in KINDS:
            raise TypeError(f"{cls.__name__}.kind must be one of {KINDS}, got {cls.kind!r}")
        if cls.state not in STATES:
            raise TypeError(f"{cls.__name__}.state must be one of {STATES}, got {cls.state!r}")
        unknown = set(cls.properties) - set(PROPERTIES)
        if unknown:
            raise TypeError(
                f"{cls.__name__}.properties has unknown entries {sorted(unknown)}; "
                f"known: {list(PROPERTIES)}"
            )
        if cls.kind != "general" and not protocol:
            replaced = [
                name for name in ("aggregate", "_validate_jacobian", "_aggregate")
                if name in own and not (name == "_aggregate" and "kind" in own)
            ]
            if "kind" in own and replaced:
                raise TypeError(
                    f"{cls.__name__} declares kind = {cls.kind!r} but replaces "
                    f"{', '.join(replaced)}, so its result need not be the method's weights "
                    "times G; declare kind = 'general'"
                )
            if replaced:
                cls.kind = "general"  # the inherited promise no longer holds
        cls.needs_jacobian = cls.kind != "loss"

    # ----------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------
    def __call__(
        self, G: Tensor, /, *, losses: Tensor | None = None, task_weights: Tensor | None = None
    ) -> Tensor:
        """Aggregate the Jacobian ``G`` (K, d) into one direction (d,) of the same dtype/device."""
        return self.aggregate(G, losses=losses, task_weights=task_weights).direction

    def aggregate(
        self, G: Tensor, /, *, losses: Tensor | None = None, task_weights: Tensor | None = None
    ) -> AggregationResult:
        """Like ``__call__`` but also returns the weights and Gramian when the method has them."""
        self._validate_jacobian(G)
        losses_t, weights_t = self._check_context(G.shape[0], losses, task_weights)
        result = self._aggregate(G, losses=losses_t, task_weights=weights_t)
        check_direction(result.direction, self, beta=result.weights, gramian=result.gramian, G=G)
        return result

    def aggregate_batch(
        self, G: Tensor, /, *, losses: Tensor | None = None, task_weights: Tensor | None = None
    ) -> Tensor:
        """Directions of ``B`` independent problems: ``G`` (B, K, d) -> (B, d).

        Used by studies that run many starts and seeds at once. ``losses`` is (B, K) when given;
        ``task_weights`` (K,) is shared by the batch. Each batch entry is treated as its own run:
        stateful methods keep state per entry (the batch size must then stay fixed between
        calls until :meth:`reset`). The default loops over the batch; methods override
        :meth:`_aggregate_batch` (or, for Gramian methods, :meth:`GramianAggregator._batch_weights`)
        with a vectorised form.
        """
        if not isinstance(G, Tensor) or G.dim() != 3:
            shape = tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__
            raise ValueError(f"a batch of Jacobians must have shape (B, K, d), got {shape}")
        if G.shape[0] == 0:
            raise ValueError("the batch of Jacobians is empty (B = 0)")
        self._validate_jacobian(G[0])
        if not isinstance(self, GramianAggregator):
            check_finite_rows(G.reshape(-1, G.shape[-1]))
        B, K = G.shape[0], G.shape[1]
        losses_t, weights_t = self._check_batch_context(B, K, losses, task_weights)
        out = self._aggregate_batch(G, losses=losses_t, task_weights=weights_t)
        check_direction(out, self, G=G)
        return out

    def reset(self) -> None:
        """Forget all state accumulated over calls (random generators are re-seeded)."""

    def loss_weights(self, n_tasks: int) -> Tensor | None:
        """The method's own per-task weights ``h`` (K,) that :func:`mtl_opt.mtl_backward` applies
        to the losses of parameters outside the Jacobian (task heads, other parameters).

        ``None`` (the default) means all ones. Methods with a per-task weights hyperparameter
        (linear scalarization's ``w``, CAME-Grad's ``ω``) override it.
        """
        return None

    def jacobian_free_weights(self, losses: Tensor, task_weights: Tensor | None = None) -> Tensor:
        """This step's weights ``w`` (K,) float64 CPU from the detached losses (K,) and the
        call's ``task_weights``, for methods with ``needs_jacobian = False``; advances the
        method's state like one aggregation."""
        raise TypeError(f"{type(self).__name__} needs the Jacobian: its update is not a loss weighting")

    def state_dict(self) -> dict[str, Any]:
        """State accumulated over calls (not hyperparameters). Empty for stateless methods."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(
                f"{type(self).__name__} is stateless but got state keys {sorted(state)}"
            )

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor keywords and their current values, in signature order."""
        names = [
            p.name
            for p in inspect.signature(type(self).__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        return {name: getattr(self, name) for name in names if hasattr(self, name)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_short_repr(v)}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    # ----------------------------------------------------------------------------------------
    # For subclasses
    # ----------------------------------------------------------------------------------------
    def _validate_jacobian(self, G: Tensor) -> None:
        """Shape, dtype and finiteness (the latter costs one pass over ``G`` and a host sync)."""
        check_jacobian(G)
        check_finite_rows(G)

    def _aggregate(
        self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None
    ) -> AggregationResult:
        raise NotImplementedError

    def _aggregate_batch(
        self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None
    ) -> Tensor:
        rows = [
            self._aggregate(
                G[b], losses=None if losses is None else losses[b], task_weights=task_weights
            ).direction
            for b in range(G.shape[0])
        ]
        return torch.stack(rows) if rows else G.new_zeros((0, G.shape[-1]))

    def _check_batch_context(
        self, B: int, K: int, losses: Tensor | None, task_weights: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """The batched form of :meth:`_check_context`: ``losses`` (B, K), finite in every row."""
        losses_t = None
        if losses is not None:
            if not isinstance(losses, Tensor) or tuple(losses.shape) != (B, K):
                got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                raise ValueError(f"batched losses must have shape (B, K) = {(B, K)}, got {got}")
            losses_t = losses.detach().to(device="cpu", dtype=torch.float64)
            if not bool(torch.isfinite(losses_t).all()):
                raise ValueError("the losses must be finite")
            if not self.uses_losses:
                losses_t = None
        elif self.requires_losses:
            self._check_context(K, None, None)  # raises the standard message
        # The losses were checked above; one row satisfies requires_losses.
        _, weights_t = self._check_context(K, None if losses_t is None else losses_t[0], task_weights)
        return losses_t, weights_t

    def _check_context(
        self, n_tasks: int, losses: Tensor | None, task_weights: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        name = type(self).__name__
        if losses is not None:
            losses = check_task_vector(losses, n_tasks, "losses")
            if not self.uses_losses:
                # Losses are harmless extra information; methods that do not use them ignore them
                # by design (every method is called the same way by mtl_backward).
                losses = None
        elif self.requires_losses:
            raise ValueError(
                f"{self!r} needs the task losses: call it with losses=... "
                "(mtl_backward and MultiTaskOptimizer pass them automatically)"
            )
        if task_weights is not None:
            if not self.accepts_task_weights:
                raise ValueError(
                    f"{name} has no per-task weights to override; scale the losses instead "
                    "or use a method that takes task weights (ls, came_grad)"
                )
            task_weights = check_task_vector(task_weights, n_tasks, "task_weights")
        return losses, task_weights


class GramianAggregator(GradientAggregator, protocol=True):
    """An aggregator that is a weighting of the rows: ``d = weights(G Gᵀ) @ G``.

    Subclasses implement :meth:`_weights`, which receives the Gramian as a float64 CPU tensor and
    returns ``β`` (K,) float64. The Gramian is the only device-to-host transfer of a call.

    Its ``kind`` is ``"gramian"``. A subclass that replaces ``_aggregate`` only to skip work
    (random weighting needs no Gramian) and still returns ``βᵀG`` with the β of :meth:`weights`
    declares its kind in its own body (``kind = "gramian"``), so that
    :func:`mtl_opt.mtl_backward` may still aggregate per parameter block.
    """

    kind = "gramian"

    def weights(
        self, M: Tensor, /, *, losses: Tensor | None = None, task_weights: Tensor | None = None
    ) -> Tensor:
        """Coefficients ``β`` (K,) for the Gramian ``M`` (K, K); float64 on the CPU."""
        M64 = check_gramian(M)
        losses_t, weights_t = self._check_context(M64.shape[0], losses, task_weights)
        return self._checked_weights(M64, losses_t, weights_t, rtol=_given_gramian_rtol(M))

    def _validate_jacobian(self, G: Tensor) -> None:
        # Finiteness is checked on the Gramian's diagonal inside gramian_of: no extra pass.
        check_jacobian(G)

    def _aggregate(
        self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None
    ) -> AggregationResult:
        M64 = gramian_of(G)
        rtol = gramian_rtol(G.dtype, G.shape[1])
        beta = self._checked_weights(M64, losses, task_weights, rtol=rtol)
        return AggregationResult(direction=combine_rows(beta, G), weights=beta, gramian=M64)

    def batch_weights(
        self, M: Tensor, /, *, losses: Tensor | None = None, task_weights: Tensor | None = None
    ) -> Tensor:
        """Weights of ``B`` independent problems: Gramians (B, K, K) -> (B, K), float64 CPU.

        Every entry gets the checks of :meth:`weights` (finite, symmetric, positive
        semidefinite); ``losses`` (B, K) must be finite in every row.
        """
        M64 = check_gramian_batch(M)
        B, K = M64.shape[0], M64.shape[1]
        losses_t, weights_t = self._check_batch_context(B, K, losses, task_weights)
        return self._checked_batch_weights(M64, losses_t, weights_t, rtol=_given_gramian_rtol(M))

    def _aggregate_batch(
        self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None
    ) -> Tensor:
        M = gramians_of_batch(G)
        rtol = gramian_rtol(G.dtype, G.shape[2])
        beta = self._checked_batch_weights(M, losses, task_weights, rtol=rtol)
        return combine_rows_batch(beta, G)

    def _checked_batch_weights(
        self, M64: Tensor, losses: Tensor | None, task_weights: Tensor | None,
        rtol: float | None = None,
    ) -> Tensor:
        """:meth:`_batch_weights`, checked; ``rtol``: the Gramians' relative precision
        (:func:`mtl_opt._validation.gramian_rtol`), the solves' zero-norm threshold."""
        with gramian_precision(rtol):
            beta = self._batch_weights(M64, losses=losses, task_weights=task_weights)
        if beta.shape != M64.shape[:2]:
            raise RuntimeError(
                f"{type(self).__name__} returned batch weights of shape {tuple(beta.shape)}, "
                f"expected {tuple(M64.shape[:2])}"
            )
        if not bool(torch.isfinite(beta).all()):
            raise RuntimeError(f"{type(self).__name__} produced non-finite batch weights")
        return beta

    def _batch_weights(
        self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None
    ) -> Tensor:
        """Default: one :meth:`_weights` call per batch entry. Override with a vectorised form;
        stateful methods must override it to keep one state per batch entry."""
        rows = [
            self._weights(M[b], losses=None if losses is None else losses[b], task_weights=task_weights)
            for b in range(M.shape[0])
        ]
        return torch.stack(rows) if rows else M.new_zeros(M.shape[:2])

    def _checked_weights(
        self, M64: Tensor, losses: Tensor | None, task_weights: Tensor | None,
        rtol: float | None = None,
    ) -> Tensor:
        """:meth:`_weights`, checked; ``rtol``: the Gramian's relative precision
        (:func:`mtl_opt._validation.gramian_rtol`), the solve's zero-norm threshold."""
        with gramian_precision(rtol):
            beta = self._weights(M64, losses=losses, task_weights=task_weights)
        if beta.shape != (M64.shape[0],):
            raise RuntimeError(
                f"{type(self).__name__} returned weights of shape {tuple(beta.shape)}, "
                f"expected ({M64.shape[0]},)"
            )
        # β is K numbers: checked in Python (a fraction of a NumPy/torch reduction's overhead).
        if not all(map(math.isfinite, beta.tolist())):
            raise RuntimeError(
                f"{type(self).__name__} produced non-finite weights {beta.tolist()} "
                f"for the Gramian {M64.tolist()}"
            )
        return beta

    def _weights(
        self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None
    ) -> Tensor:
        raise NotImplementedError


def is_gramian_weighting(aggregator: GradientAggregator) -> bool:
    """Whether the engine may compute ``aggregator``'s result as ``βᵀG`` with
    ``β = weights(M, losses=, task_weights=)`` from the Gramian alone: a ``"gramian"`` method,
    or a ``"loss"`` method that also gives those weights (linear scalarization, whose β ignores
    ``M``)."""
    return aggregator.kind == "gramian" or (
        aggregator.kind == "loss" and isinstance(aggregator, GramianAggregator)
    )


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _given_gramian_rtol(M: Tensor) -> float:
    """The zero-norm threshold for a Gramian given directly: its own dtype's precision (the
    width of the Jacobian behind it is unknown)."""
    return gramian_rtol(M.dtype, 1) if isinstance(M, Tensor) and M.is_floating_point() else 1e-14


def combine_rows(beta: Tensor, G: Tensor) -> Tensor:
    """``βᵀ G`` on ``G``'s device and in its dtype: the second (and last) pass over ``G``.

    ``β`` (float64, CPU) travels host-to-device without blocking; a Jacobian that is already
    float64 on the CPU is combined without a copy of ``β``. ``β`` is a constant: the result is
    differentiable w.r.t. ``G`` when ``G`` requires grad. float16/bfloat16 Jacobians are
    combined in float32 (β is not rounded to half precision) and cast back. Whether the result
    fits the dtype is checked once, by the caller, with
    :func:`mtl_opt._validation.check_direction`.
    """
    if G.dtype in _HALF_DTYPES:
        return (beta.to(device=G.device, dtype=torch.float32) @ G.float()).to(G.dtype)
    if beta.device == G.device:  # a dtype-only cast: cheaper than a device move's dispatch
        return (beta if beta.dtype == G.dtype else beta.to(G.dtype)) @ G
    return beta.to(device=G.device, dtype=G.dtype, non_blocking=True) @ G


def combine_rows_batch(beta: Tensor, G: Tensor) -> Tensor:
    """The batched :func:`combine_rows`: ``β`` (B, K) and ``G`` (B, K, d) -> (B, d), with the
    same dtype rules (half-precision Jacobians combined in float32 and cast back; the caller
    checks the result with :func:`mtl_opt._validation.check_direction`)."""
    if G.dtype in _HALF_DTYPES:
        beta32 = beta.to(device=G.device, dtype=torch.float32)
        return torch.einsum("bk,bkd->bd", beta32, G.float()).to(G.dtype)
    return torch.einsum("bk,bkd->bd", beta.to(device=G.device, dtype=G.dtype), G)


def _short_repr(value: Any) -> str:
    if isinstance(value, Tensor):
        return repr(value.tolist())
    return repr(value)
