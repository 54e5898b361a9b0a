"""A multi-task wrapper around any ``torch.optim.Optimizer``.

The training loop keeps its usual shape; ``step`` takes the task losses. The CAME-Grad authors
call ``optimizer.step([loss_lm, loss_cls], task_weights=[1, 4])`` on a wrapped AdamW; the same
loop here::

    opt = mtl_opt.MultiTaskOptimizer(
        torch.optim.AdamW(model.parameters(), lr=5e-5),
        mtl_opt.get_aggregator("came_grad"),          # rho=0.5, kappa=1.5, nu=0.2
        shared_params=model.encoder,
        task_params=[model.report_decoder, model.classifier],   # optional
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    for epoch in range(n_epochs):
        for batch in loader:
            loss_lm, loss_cls = model(batch)
            opt.zero_grad()
            info = opt.step([loss_lm, loss_cls], task_weights=[1, 4])
        sched.step()

``step(losses)`` runs :func:`mtl_opt.mtl_backward` then the wrapped optimizer's ``step()`` and
returns the diagnostics (:class:`mtl_opt.MTLBackwardResult`).

To the rest of PyTorch the wrapper *is* the optimizer (``isinstance(opt, torch.optim.Optimizer)``):
``param_groups``, ``state``, ``defaults`` and the step/state-dict hooks are the wrapped optimizer's
own objects, so LR schedulers, ``GradScaler`` and training frameworks attach to ``opt`` directly
(``StepLR(opt, ...)`` changes the wrapped optimizer's learning rate).

Clipping is an option of ``step``: ``step(losses, clip_norm=1.0)`` or ``clip_value=0.1`` (the
CAME-Grad authors' baseline clips by value 0.1). It acts on the gradients this step wrote, after
aggregation: the aggregated direction in the shared parameters' ``.grad``, each task group's
``h_i ∇L_i`` and the ``Σ h_i ∇L_i`` of any other parameter, that is on every ``.grad`` of the
wrapped optimizer's param groups, exactly as ``torch.nn.utils.clip_grad_norm_`` (one total norm
over all of them) or ``clip_grad_value_`` would after a plain ``loss.backward()``. To act on the
gradients in any other way, call ``backward(losses)``, then ``step()`` without losses.

Mixed precision: bfloat16 autocast needs nothing more. For float16 with a ``GradScaler``, give the
scaler to ``backward`` and let it step the optimizer::

    opt.zero_grad()
    opt.backward([loss_lm, loss_cls], grad_scaler=scaler)   # the losses are scaled here
    scaler.step(opt)          # unscales every .grad; skips the step if one holds inf/NaN
    scaler.update()

``backward`` scales the losses by ``scaler.get_scale()`` for the backward pass, but the aggregator
sees the *unscaled* Gramian and losses (``M / s²``, ``L / s``), so methods that are not positively
homogeneous (Nash-MTL, loss-normalised MGDA, any norm clip) get their true weights; the parameters
receive ``s`` times the true gradients, which ``scaler.step`` (or ``scaler.unscale_(opt)``)
divides out. A scaled backward pass that overflows (a non-finite loss or Jacobian) does not raise:
``backward`` returns ``None`` and fills the shared parameters' ``.grad`` with inf, so that
``scaler.step`` skips the step and ``scaler.update`` lowers the scale, as with a plain model.
"""

from __future__ import annotations

import copy
import math

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_opt.aggregator import GradientAggregator, GramianAggregator, is_gramian_weighting
from mtl_opt.distributed import DistributedMode, broadcast_aggregator_state, check_mode
from mtl_opt.backward import (
    MTLBackwardResult,
    Params,
    Parallel,
    _check_unique,
    _param_list,
    mtl_backward,
)

__all__ = ["MultiTaskOptimizer"]


# The hook tables of torch.optim.Optimizer: the wrapper shares the wrapped optimizer's own.
_HOOK_TABLES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class MultiTaskOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that each step aggregates the task gradients with ``aggregator``.

    Args:
        optimizer: any ``torch.optim.Optimizer``; every shared and task parameter must be in
            its param groups (checked here).
        aggregator: a :class:`mtl_opt.GradientAggregator`.
        shared_params: the shared parameters (a module or an iterable of tensors); they receive
            the aggregated direction.
        task_params: optional ``[group_0, ..., group_{K-1}]``; group ``i`` receives
            ``h_i ∇L_i`` (see :mod:`mtl_opt.backward`). Other parameters the losses reach receive
            ``Σ h_i ∇L_i``.
        parallel: passed to :func:`mtl_opt.mtl_backward`. ``"auto"`` settles on the first
            multi-task step: if the batched Jacobian worked it is used from then on without
            keeping the graph alive for a fallback (no extra memory); if it failed, the per-task
            loop is used from then on (no failed attempt per step). Steps with ``features=``
            (representation level) take one pass per task under ``"auto"`` and settle nothing.
        factor_linear: passed to :func:`mtl_opt.mtl_backward`: shared linear layers take their
            Gramian share and update from their inputs and output gradients (no Jacobian rows).
        distributed: passed to :func:`mtl_opt.mtl_backward` (``"global"``, ``"local"`` or
            ``"off"``; see :mod:`mtl_opt.distributed`). Built under a process group in the first
            two modes, the wrapper gives every rank rank 0's aggregator state (seeded
            generators included): a collective, so build it on every rank.

    It is a ``torch.optim.Optimizer`` that shares the wrapped one's ``param_groups`` (the same
    list), ``state``, ``defaults`` and hook tables (``register_step_pre_hook`` and the state-dict
    hooks register on the wrapped optimizer and receive it as their ``optimizer`` argument), so
    LR schedulers, ``GradScaler`` and frameworks attach to it directly.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        aggregator: GradientAggregator,
        shared_params: Params,
        *,
        task_params: Sequence[Params] | None = None,
        parallel: Parallel = "auto",
        factor_linear: bool = True,
        distributed: DistributedMode = "global",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (e.g. torch.optim.AdamW), "
                f"got {type(optimizer).__name__}"
            )
        if not isinstance(aggregator, GradientAggregator):
            raise TypeError(
                f"aggregator must be a GradientAggregator, got {type(aggregator).__name__}"
            )
        if parallel not in ("auto", True, False) or (
            parallel != "auto" and not isinstance(parallel, bool)
        ):
            raise ValueError(f"parallel must be 'auto', True or False, got {parallel!r}")
        if not isinstance(factor_linear, bool):
            raise TypeError(f"factor_linear must be a bool, got {factor_linear!r}")
        # Optimizer.__init__ is not called: it would build param groups of its own. Everything
        # it would create is the wrapped optimizer's object instead.
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        for table in _HOOK_TABLES:
            setattr(self, table, getattr(optimizer, table))
        self.aggregator = aggregator
        # Modules are kept as modules (parameter names in error messages); iterables, which
        # may be one-shot generators, become lists.
        self.shared_params: Params = _keep(shared_params)
        _param_list(self.shared_params, "shared parameter")  # validate now
        if task_params is None:
            self.task_params: list[Params] | None = None
        else:
            if isinstance(task_params, (torch.nn.Module, Tensor)) or not isinstance(
                task_params, Sequence
            ):
                raise TypeError(
                    "task_params must be a sequence of parameter groups, one per task, got "
                    f"{type(task_params).__name__}"
                )
            self.task_params = [_keep(g) for g in task_params]
        self.parallel: Parallel = parallel
        self.factor_linear = factor_linear
        self._resolved: bool | None = None  # what "auto" settled on after its first try
        self._pending_backward = False
        self.last_result: MTLBackwardResult | None = None
        self.last_grad_norm: Tensor | None = None
        self._check_params_in_optimizer()
        self.distributed: DistributedMode = check_mode(distributed)
        if self.distributed != "off":
            broadcast_aggregator_state(aggregator)  # same state on every rank (no-op alone)

    def _check_params_in_optimizer(self) -> None:
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        groups = [_param_list(self.shared_params, "shared parameter")]
        groups += [_param_list(g, f"task {i} parameter") for i, g in enumerate(self.task_params or [])]
        _check_unique(groups)
        named = [pair for group in groups for pair in group]
        missing = [name for name, p in named if id(p) not in held]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"{len(missing)} parameter(s) given to MultiTaskOptimizer are not in the wrapped "
                f"optimizer's param groups, so they would never be updated: {shown}"
            )

    # ----------------------------------------------------------------------------------------
    # The training-loop API
    # ----------------------------------------------------------------------------------------
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's param groups (the same list object)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        """The wrapped optimizer's per-parameter state."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the wrapped optimizer."""
        self.optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:  # copy/pickle the wrapper whole, not as a bare optimizer
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the wrapped optimizer's parameters."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._pending_backward = False

    def backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        task_weights: Sequence[float] | Tensor | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        *,
        retain_graph: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> MTLBackwardResult | None:
        """:func:`mtl_opt.mtl_backward` with this optimizer's settings; no optimizer step.

        With ``grad_scaler`` (an enabled ``torch.amp.GradScaler``), the backward pass runs on the
        losses times the scaler's scale ``s`` while the aggregator weighs the unscaled Gramian
        and losses; every ``.grad`` this call writes is ``s`` times the true one, for
        ``grad_scaler.step(opt)`` to unscale, and the returned diagnostics (losses, Gramian) are
        those of the scaled losses; the weights β are the unscaled problem's. On overflow it
        returns ``None`` with inf in the shared ``.grad`` (see the module docstring).
        """
        aggregator = self.aggregator
        scale: float | None = None
        if grad_scaler is not None:
            if not isinstance(grad_scaler, torch.amp.GradScaler):
                raise TypeError(
                    f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
                )
            if grad_scaler.is_enabled():
                if not is_gramian_weighting(aggregator):
                    raise TypeError(
                        f"grad_scaler needs a Gramian method (its weights are computed on the "
                        f"unscaled Gramian); {type(aggregator).__name__} is not one"
                    )
                losses = _scaled(losses, grad_scaler)  # first: the scaler creates its scale lazily
                scale = float(grad_scaler.get_scale())
                aggregator = _LossScaled(aggregator, scale)
        parallel: Parallel = self.parallel
        if parallel == "auto" and self._resolved is not None and features is None:
            # (the features level takes per-task passes under "auto": nothing to settle)
            parallel = self._resolved
        try:
            result = mtl_backward(
                losses,
                self.shared_params,
                aggregator,
                task_params=self.task_params,
                task_weights=task_weights,
                features=features,
                retain_graph=retain_graph,
                parallel=parallel,
                factor_linear=self.factor_linear,
                distributed=self.distributed,
            )
        except ValueError as exc:
            if scale is None or not _is_overflow(exc):
                raise
            self._mark_overflow()
            return None
        except RuntimeError as exc:
            if self.parallel == "auto" and self._resolved is True and "batched Jacobian" in str(exc):
                raise RuntimeError(
                    "the batched Jacobian worked on earlier steps but failed on this one, after "
                    "consuming the graph; build the MultiTaskOptimizer with parallel=False for "
                    f"this model ({exc})"
                ) from exc
            raise
        if self.parallel == "auto" and self._resolved is None:
            if result.fallback_reason is not None:
                self._resolved = False
            elif result.batched:
                self._resolved = True
        self._pending_backward = True
        self.last_result = result
        return result

    def _mark_overflow(self) -> None:
        """A scaled backward pass overflowed: inf in the shared ``.grad``, for the scaler."""
        for _, p in _param_list(self.shared_params, "shared parameter"):
            p.grad = torch.full_like(p, math.inf)
        self._pending_backward = True
        self.last_result = None

    def step(  # type: ignore[override]
        self,
        losses: Sequence[Tensor] | Tensor | None = None,
        task_weights: Sequence[float] | Tensor | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        *,
        clip_norm: float | None = None,
        clip_value: float | None = None,
        closure: Callable[[], Any] | None = None,
    ) -> MTLBackwardResult | None:
        """Aggregate the task gradients into ``.grad``, optionally clip, and step.

        ``step(losses, task_weights=None, features=None)`` returns the backward diagnostics.
        ``step()`` without losses only steps the wrapped optimizer, after :meth:`backward`.

        ``clip_norm=c`` rescales every gradient of the wrapped optimizer's param groups by
        ``min(1, c / ‖g‖)``, ``‖g‖`` their one total 2-norm (``clip_grad_norm_``), and
        ``clip_value=v`` clamps each entry into ``[-v, v]`` (``clip_grad_value_``), after
        aggregation: the shared parameters' aggregated direction, the task heads' and any other
        parameter's gradients. The total norm before clipping is kept in ``last_grad_norm``.
        The returned ``result.direction`` then describes the unclipped direction and, having
        been changed in place, can no longer be read (its weights and Gramian can).

        ``closure`` (the ``torch.optim.Optimizer`` protocol, used by training frameworks) is
        called once under ``torch.enable_grad()``; what it returns, if not ``None``, is taken
        as the losses.
        """
        if clip_norm is not None and clip_value is not None:
            raise ValueError("give clip_norm or clip_value, not both")
        for name, value in (("clip_norm", clip_norm), ("clip_value", clip_value)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value <= 0
            ):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if closure is not None:
            with torch.enable_grad():
                returned = closure()
            if returned is not None:
                if losses is not None:
                    raise ValueError("give the losses or a closure that returns them, not both")
                losses = returned
        result: MTLBackwardResult | None = None
        if losses is None:
            if task_weights is not None or features is not None:
                raise ValueError("task_weights and features need the losses: step(losses, ...)")
            if not self._pending_backward:
                raise RuntimeError(
                    "step() without losses needs a backward(losses) first; "
                    "otherwise call step(losses)"
                )
        else:
            result = self.backward(losses, task_weights=task_weights, features=features)
        if clip_norm is not None or clip_value is not None:
            self._clip(clip_norm, clip_value)
        self.optimizer.step()
        self._pending_backward = False
        return result

    def _clip(self, clip_norm: float | None, clip_value: float | None) -> None:
        grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if clip_norm is not None:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(grads, clip_norm)
        else:
            self.last_grad_norm = torch.nn.utils.get_total_norm([p.grad for p in grads])
            torch.nn.utils.clip_grad_value_(grads, clip_value)

    # ----------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's and the aggregator's state."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "aggregator": self.aggregator.state_dict(),
            "aggregator_class": type(self.aggregator).__name__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the aggregator class must match)."""
        if not isinstance(state, dict) or not {"optimizer", "aggregator"} <= set(state):
            raise ValueError(
                "not a MultiTaskOptimizer state dict: expected the keys 'optimizer' and "
                "'aggregator' (a plain optimizer state dict goes to .optimizer.load_state_dict)"
            )
        saved = state.get("aggregator_class")
        if saved is not None and saved != type(self.aggregator).__name__:
            raise ValueError(
                f"the state was saved with aggregator {saved} but this optimizer uses "
                f"{type(self.aggregator).__name__}"
            )
        # Atomic: the aggregator state is validated on a copy first, and the wrapped optimizer
        # is restored if its own load fails, so a rejected state changes nothing.
        copy.deepcopy(self.aggregator).load_state_dict(state["aggregator"])
        backup = copy.deepcopy(self.optimizer.state_dict())
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.aggregator.load_state_dict(state["aggregator"])
        except BaseException:
            self.optimizer.load_state_dict(backup)
            raise

    def __repr__(self) -> str:
        shared = [p for _, p in _param_list(self.shared_params, "shared parameter")]
        n_shared = sum(p.numel() for p in shared)
        tasks = "" if self.task_params is None else f", task_params={len(self.task_params)} groups"
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"MultiTaskOptimizer(\n  aggregator={self.aggregator!r},\n"
            f"  shared_params={len(shared)} tensors ({n_shared} values){tasks},\n"
            f"  parallel={self.parallel!r},\n  optimizer=\n{inner}\n)"
        )


def _keep(params: Params) -> Params:
    if isinstance(params, (torch.nn.Module, Tensor)):
        return params
    if isinstance(params, (str, bytes)) or not hasattr(params, "__iter__"):
        return params  # _param_list raises the clear error
    return list(params)


def _scaled(
    losses: Sequence[Tensor] | Tensor, scaler: torch.amp.GradScaler
) -> Sequence[Tensor] | Tensor:
    if isinstance(losses, Tensor) or not isinstance(losses, Sequence):
        return scaler.scale(losses)  # a non-tensor gets mtl_backward's error below
    return [scaler.scale(loss) if isinstance(loss, Tensor) else loss for loss in losses]


def _is_overflow(exc: ValueError) -> bool:
    """Whether mtl_backward refused a non-finite loss, Jacobian or Gramian (a scaled overflow)."""
    text = str(exc)
    return "finite" in text or "overflow" in text


class _LossScaled(GramianAggregator):
    """``inner`` on the Jacobian of the losses times ``scale``, weighing the unscaled problem.

    The Gramian of ``s·G`` is ``s² M`` and the losses are ``s·L``; the weights are
    ``β = inner(M, L)``, computed on ``M = (s² M) / s²`` and ``L = (s·L) / s``, so the direction
    ``βᵀ(s·G) = s·d`` is exactly ``s`` times the unscaled method's (for every method, homogeneous
    or not), and ``GradScaler`` divides ``s`` out of it as from any other gradient.
    """

    def __init__(self, inner: GramianAggregator, scale: float) -> None:
        self.inner = inner
        self.scale = scale
        self.uses_losses = inner.uses_losses
        self.requires_losses = inner.requires_losses
        self.accepts_task_weights = inner.accepts_task_weights

    def loss_weights(self, n_tasks: int) -> Tensor | None:
        return self.inner.loss_weights(n_tasks)

    def __repr__(self) -> str:
        return f"{self.inner!r} on losses scaled by {self.scale:g}"

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        s = self.scale
        return self.inner._checked_weights(
            M / (s * s), None if losses is None else losses / s, task_weights
        )
