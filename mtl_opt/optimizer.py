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
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.8)
    for epoch in range(n_epochs):
        for batch in loader:
            loss_lm, loss_cls = model(batch)
            opt.zero_grad()
            info = opt.step([loss_lm, loss_cls], task_weights=[1, 4])
        sched.step()

``step(losses)`` runs :func:`mtl_opt.mtl_backward` then the wrapped optimizer's ``step()`` and
returns the diagnostics (:class:`mtl_opt.MTLBackwardResult`). To act on the gradients in
between, call ``backward(losses)``, then ``step()`` without losses::

    opt.backward([loss_lm, loss_cls], task_weights=[1, 4])
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

Mixed precision: bfloat16 autocast needs nothing more. A float16 ``GradScaler`` does not fit:
its overflow steps make the Jacobian non-finite, which raises ``ValueError`` (never a silent
NaN step) instead of being skipped, and methods that are not positively homogeneous (Nash-MTL)
would not be unscaled correctly. LR schedulers attach to the wrapped optimizer,
``opt.optimizer``.
"""

from __future__ import annotations

import copy

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtl_opt.aggregator import GradientAggregator
from mtl_opt.backward import (
    MTLBackwardResult,
    Params,
    Parallel,
    _check_unique,
    _param_list,
    mtl_backward,
)

__all__ = ["MultiTaskOptimizer"]


class MultiTaskOptimizer:
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
            loop is used from then on (no failed attempt per step).
        factor_linear: passed to :func:`mtl_opt.mtl_backward`: shared linear layers take their
            Gramian share and update from their inputs and output gradients (no Jacobian rows).

    LR schedulers attach to the wrapped optimizer (``opt.optimizer``); ``param_groups`` is the
    wrapped optimizer's own list, so changes are shared.
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
        self.optimizer = optimizer
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
        self._check_params_in_optimizer()

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
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's param groups (the same list object)."""
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        """The wrapped optimizer's per-parameter state."""
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the wrapped optimizer's parameters."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        task_weights: Sequence[float] | Tensor | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
        *,
        retain_graph: bool = False,
    ) -> MTLBackwardResult:
        """:func:`mtl_opt.mtl_backward` with this optimizer's settings; no optimizer step."""
        parallel: Parallel = self.parallel
        if parallel == "auto" and self._resolved is not None:
            parallel = self._resolved
        try:
            result = mtl_backward(
                losses,
                self.shared_params,
                self.aggregator,
                task_params=self.task_params,
                task_weights=task_weights,
                features=features,
                retain_graph=retain_graph,
                parallel=parallel,
                factor_linear=self.factor_linear,
            )
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

    def step(
        self,
        losses: Sequence[Tensor] | Tensor | None = None,
        task_weights: Sequence[float] | Tensor | None = None,
        features: Tensor | Sequence[Tensor] | None = None,
    ) -> MTLBackwardResult | None:
        """Aggregate the task gradients into ``.grad`` and step the wrapped optimizer.

        ``step(losses, task_weights=None, features=None)`` returns the backward diagnostics.
        ``step()`` without losses only steps the wrapped optimizer, after :meth:`backward`.
        """
        if losses is None:
            if task_weights is not None or features is not None:
                raise ValueError("task_weights and features need the losses: step(losses, ...)")
            if not self._pending_backward:
                raise RuntimeError(
                    "step() without losses needs a backward(losses) first; "
                    "otherwise call step(losses)"
                )
            self.optimizer.step()
            self._pending_backward = False
            return None
        result = self.backward(losses, task_weights=task_weights, features=features)
        self.optimizer.step()
        self._pending_backward = False
        return result

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
