"""Stage 1 of :func:`mtl_opt.mtl_backward`: the arguments, checked once and gathered in a
:class:`BackwardCall`, and the graph walk that finds who receives ``h``-weighted gradients
(:func:`heads_of`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from mtl_opt._backward.graph import _per_task_roots, _reachable_leaves, _unreached_targets
from mtl_opt._validation import check_task_vector
from mtl_opt.aggregator import GradientAggregator, is_gramian_weighting

__all__ = ["BackwardCall", "Heads", "Params", "Parallel", "heads_of", "loss_weights", "prepare_call"]

Params = Union[nn.Module, Tensor, Iterable[Tensor]]
Parallel = Union[Literal["auto"], bool]
Named = list[tuple[str, Tensor]]


@dataclass(frozen=True)
class BackwardCall:
    """One :func:`mtl_opt.mtl_backward` call's arguments, checked.

    ``loss_list`` and ``L`` are the K losses (0-dim tensors, and stacked (K,)); ``losses`` what
    the caller gave; ``values`` their detached float64 CPU copy; ``h`` the loss weights;
    ``shared`` and ``groups`` the named shared parameters and task groups; ``features`` the
    representation (empty at the parameters).
    """

    aggregator: GradientAggregator
    task_weights: object | None
    h: Tensor
    loss_list: list[Tensor]
    L: Tensor
    losses: object
    values: Tensor
    shared: Named
    groups: list[Named]
    features: list[Tensor]
    retain_graph: bool
    parallel: Parallel
    factor_linear: bool
    sync: Any = None  # mtl_opt.distributed's synchroniser under a process group (global mode)
    level: Literal["parameters", "features"] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "level", "features" if self.features else "parameters")

    @property
    def K(self) -> int:
        return len(self.loss_list)

    @property
    def shared_tensors(self) -> list[Tensor]:
        return [p for _, p in self.shared]

    @property
    def first(self) -> list[Tensor]:
        """What the Jacobian is taken over: the shared parameters, or the features."""
        return self.shared_tensors if self.level == "parameters" else self.features

    def with_loss_weights(self, w: Tensor) -> BackwardCall:
        """This call as linear scalarization with weights ``w`` (a loss weighting whose task
        group is reached by another task's loss takes the Jacobian path)."""
        from mtl_opt.methods.linear_scalarization import LinearScalarization

        return replace(self, aggregator=LinearScalarization(w.tolist()), task_weights=None, h=w)


@dataclass(frozen=True)
class Heads:
    """The parameters outside the Jacobian: the task groups' (``owners[j] = i``: ``h_i ∇L_i``)
    and every other leaf the losses reach (``owners[j] = None``: ``Σ_i h_i ∇L_i``)."""

    params: list[Tensor]
    owners: list[int | None]
    names: list[str]  # the task groups' parameter names (the others have none)


def prepare_call(
    losses: object, shared_params: object, aggregator: object, *, task_params: object,
    task_weights: object, features: object, retain_graph: object, parallel: object,
    factor_linear: object, sync: Any = None,
) -> BackwardCall:
    """Every argument checked (one clear error each), before any work: a stateful aggregator is
    not advanced by a failing call."""
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
    values = _loss_values(L if sync is None else sync.losses(L))  # global: the ranks' mean
    feats = _features_list(features) if features is not None else []
    if feats:
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
    return BackwardCall(
        aggregator=aggregator, task_weights=task_weights, h=h, loss_list=loss_list, L=L,
        losses=losses, values=values, shared=shared, groups=groups, features=feats,
        retain_graph=retain_graph, parallel=parallel, factor_linear=factor_linear,  # type: ignore[arg-type]
        sync=sync,
    )


def heads_of(call: BackwardCall) -> Heads:
    """The task groups' parameters, then the parameters outside shared and task groups that the
    losses reach (found by walking the graph, as ``.backward()`` does)."""
    given = {id(p) for _, p in call.shared} | {id(p) for g in call.groups for _, p in g}
    others = [p for p in _reachable_leaves(call.loss_list) if id(p) not in given]
    group_params = [(name, p) for g in call.groups for name, p in g]
    return Heads(
        params=[p for _, p in group_params] + others,
        owners=[i for i, g in enumerate(call.groups) for _ in g] + [None] * len(others),
        names=[name for name, _ in group_params],
    )


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
