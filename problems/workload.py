"""The training-workload protocol: what a workload owns, and nothing about how it is run.

A training workload (Multi-MNIST, QM9, radiology report generation) is data, a model, K task
losses and per-task metrics. Everything about running one — the loop, checkpoints, seeds, the
command line, tables — lives once in :mod:`mtl_opt.experiments` (the trainer,
:mod:`mtl_opt.experiments.trainer`), which speaks to a workload only through this protocol:

* :class:`TaskMetric` — one reported metric of one task and its direction (higher or lower is
  better), which fixes its sign in Δm% and its order in ranks;
* :class:`TrainingWorkload` — ``name``, ``task_names``, ``metrics``; :meth:`~TrainingWorkload.data`
  (train / val / test splits, deterministic from a seed); :meth:`~TrainingWorkload.build_model`
  (an ``nn.Module`` that names its shared part, see :class:`MultiTaskModel`);
  :meth:`~TrainingWorkload.task_losses` (K scalar losses of a batch, and the shared representation
  when asked); :meth:`~TrainingWorkload.evaluate` (metric name → value over some batches);
* a registry: :func:`register_training_workload`, :func:`get_training_workload`,
  :func:`training_workload_from_spec` (``"multimnist:n_train=2000"``),
  :func:`available_training_workloads`.

Built-in workloads are registered by module path and imported on first use, so importing
``mtl_opt.problems`` loads none of their data code.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "MultiTaskModel",
    "TaskLosses",
    "TaskMetric",
    "TrainingDefaults",
    "TrainingWorkload",
    "WorkloadData",
    "available_training_workloads",
    "check_model",
    "get_training_workload",
    "register_training_workload",
    "to_device",
    "training_workload_from_spec",
    "workload_spec_with",
]


@dataclass(frozen=True)
class TaskMetric:
    """One reported metric of one task.

    ``name`` is the metric's key in :meth:`TrainingWorkload.evaluate`'s result (unique within a
    workload), ``task`` the task it measures (one of ``task_names``), ``higher_is_better`` its
    direction: Δm% counts ``(−1)^{higher_is_better} (M_method − M_base) / M_base`` so that a
    better value always lowers Δm% (Maninis et al., CVPR 2019), and ranks put the best first.
    """

    name: str
    task: str
    higher_is_better: bool

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a metric name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"metric {self.name!r}: the task must be a non-empty string, got {self.task!r}")
        if not isinstance(self.higher_is_better, bool):
            raise TypeError(f"metric {self.name!r}: higher_is_better must be a bool, "
                            f"got {self.higher_is_better!r}")


@dataclass
class WorkloadData:
    """The splits of one workload for one seed.

    ``train``, ``val``, ``test``: map-style datasets (``len`` and ``__getitem__``), equal for equal
    seeds and options. ``collate``: how a list of items becomes a batch (``None``: torch's default
    collation). ``info``: anything the model needs from the data (a vocabulary size, say), read by
    :meth:`TrainingWorkload.build_model`.
    """

    train: Any
    val: Any
    test: Any
    collate: Callable[[list[Any]], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Any:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in ("train", "val", "test")}


@runtime_checkable
class MultiTaskModel(Protocol):
    """What the trainer needs of a workload's model (besides being an ``nn.Module``).

    ``shared_parameters()``: the parameters every task's loss reaches (the encoder): they receive
    the method's aggregated direction. ``task_parameters()``: one list per task, in
    ``task_names`` order: task i's own parameters (its head), which receive ``h_i ∇L_i``.
    """

    def shared_parameters(self) -> list[nn.Parameter]: ...

    def task_parameters(self) -> list[list[nn.Parameter]]: ...


@dataclass
class TaskLosses:
    """:meth:`TrainingWorkload.task_losses`'s answer: the K scalar losses, in ``task_names``
    order, and — when asked with ``features=True`` — the shared representation ``z`` the heads
    read (for aggregation at the representation, MGDA-UB, Sener & Koltun 2018)."""

    losses: list[Tensor]
    features: Tensor | None = None


@dataclass(frozen=True)
class TrainingDefaults:
    """The training settings a workload is tuned for (the trainer's defaults for it).

    Exactly one of ``epochs`` and ``steps`` is set. ``optimizer`` is ``adam``, ``adamw`` or ``sgd``
    (SGD with momentum 0.9).
    """

    epochs: int | None = 10
    steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("TrainingDefaults needs exactly one of epochs and steps")


class TrainingWorkload(ABC):
    """A multi-task training workload: data, model, task losses and metrics.

    Subclasses set ``name``, ``task_names`` and ``metrics`` (every task has at least one metric)
    and may set ``task_weights`` (per-task weights ω the workload's protocol uses; ``None``:
    ones) and ``defaults`` (:class:`TrainingDefaults`). ``options`` holds the keyword options the
    workload was built with (recorded by the trainer, part of every cache key): a workload is
    fully described by its name and options.
    """

    name: str = ""
    task_names: tuple[str, ...] = ()
    metrics: tuple[TaskMetric, ...] = ()
    task_weights: tuple[float, ...] | None = None
    defaults: TrainingDefaults = TrainingDefaults()

    def __init__(self, **options: Any) -> None:
        self.options: dict[str, Any] = dict(options)

    # ---- what a workload provides -------------------------------------------------------------
    @abstractmethod
    def data(self, seed: int) -> WorkloadData:
        """The train / val / test splits for ``seed`` (deterministic: equal seeds, equal data).

        A missing or malformed input file raises one error naming the file."""

    @abstractmethod
    def build_model(self, data: WorkloadData) -> nn.Module:
        """A fresh model (initialised from torch's global generator, which the trainer seeds);
        it must satisfy :class:`MultiTaskModel`."""

    @abstractmethod
    def task_losses(self, model: nn.Module, batch: Any, *, features: bool = False) -> TaskLosses:
        """The K scalar losses of ``batch`` (already on the model's device), in ``task_names``
        order; with ``features=True`` also the shared representation the heads read."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """Every metric of :attr:`metrics` (and, optionally, more: losses, ...) over ``batches``.

        Called under ``torch.no_grad()`` with the model in eval mode and the batches on its
        device; returns plain floats. The trainer builds one workload object per run and calls
        :meth:`data` first, so what ``data`` built (a tokenizer, say) may be kept on ``self``."""

    def write_test_outputs(self, folder: Path) -> list[str]:
        """Write files beside the test metrics (generated samples, say, kept on ``self`` by the
        last :meth:`evaluate`) into the run folder; returns their names. Default: none."""
        return []

    def checkpoint_state(self, data: WorkloadData) -> dict[str, Any]:
        """What a checkpoint must hold besides the model to use it without rebuilding the data
        (a tokenizer's vocabulary, say), as tensors and plain data; saved as
        ``workload_state``. Default: nothing."""
        return {}

    # ---- derived -------------------------------------------------------------------------------
    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def metric(self, name: str) -> TaskMetric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"workload {self.name!r} has no metric {name!r}; it reports "
                       f"{', '.join(m.name for m in self.metrics)}")

    def metrics_of(self, task: str) -> tuple[TaskMetric, ...]:
        """The metrics of one task."""
        return tuple(m for m in self.metrics if m.task == task)

    def resolved_task_weights(self) -> list[float]:
        return [1.0] * self.n_tasks if self.task_weights is None else [float(w) for w in self.task_weights]

    def spec(self) -> str:
        """``name:key=value,...``: the form :func:`training_workload_from_spec` reads back."""
        from mtl_opt._spec import format_spec

        return format_spec(self.name, dict(sorted(self.options.items())))

    def check(self) -> None:
        """Raise one clear error when the declarations are inconsistent (called by the registry)."""
        if not self.name:
            raise TypeError(f"{type(self).__name__} has no name")
        if len(self.task_names) < 1 or len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"workload {self.name!r}: task_names must be distinct and non-empty, "
                             f"got {self.task_names}")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"workload {self.name!r}: metric names repeat: {names}")
        for m in self.metrics:
            if m.task not in self.task_names:
                raise ValueError(f"workload {self.name!r}: metric {m.name!r} names task {m.task!r}, "
                                 f"not one of {self.task_names}")
        without = [t for t in self.task_names if not self.metrics_of(t)]
        if without:
            raise ValueError(f"workload {self.name!r}: tasks {without} have no metric")
        if self.task_weights is not None:
            w = list(self.task_weights)
            if len(w) != self.n_tasks or not all(math.isfinite(x) and x > 0 for x in w):
                raise ValueError(f"workload {self.name!r}: task_weights must be {self.n_tasks} finite "
                                 f"numbers > 0, got {w}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()!r})"


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
Factory = Callable[..., TrainingWorkload]

#: name -> factory, or "module:attribute" of a built-in (imported on first use)
_REGISTRY: dict[str, Factory | str] = {
    "multimnist": "mtl_opt.problems.multimnist.workload:MultiMNIST",
    "rrg": "mtl_opt.problems.rrg.workload:RRGTrainingWorkload",
}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_training_workload(name: str, factory: Factory | str, *, replace: bool = False) -> None:
    """Register ``factory(**options) -> TrainingWorkload`` under ``name`` (or a
    ``"module:attribute"`` string, imported when first asked for). A taken name raises unless
    ``replace=True``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a workload name must be a non-empty string, got {name!r}")
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise TypeError(f"factory must be callable or 'module:attribute', got {factory!r}")
    key = _key(name)
    if key in _REGISTRY and not replace:
        raise ValueError(f"training workload {key!r} is already registered (pass replace=True)")
    _REGISTRY[key] = factory


def available_training_workloads() -> list[str]:
    """Registered training-workload names."""
    return sorted(_REGISTRY)


def _factory(key: str) -> Factory:
    entry = _REGISTRY[key]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        _REGISTRY[key] = entry
    return entry


def get_training_workload(name: str, /, **options: Any) -> TrainingWorkload:
    """Build the workload registered under ``name`` with its keyword ``options``.

    An unknown name or option raises one ``ValueError`` naming it and what is accepted."""
    if not isinstance(name, str):
        raise TypeError(f"a workload name must be a string, got {type(name).__name__}")
    key = _key(name)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown workload {name!r}{hint} (available: {', '.join(sorted(_REGISTRY))})")
    factory = _factory(key)
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for workload {key!r}; it takes "
                             f"{', '.join(accepted) or 'no options'}")
    workload = factory(**options)
    if not isinstance(workload, TrainingWorkload):
        raise TypeError(f"the factory of workload {key!r} returned {type(workload).__name__}, "
                        "not a TrainingWorkload")
    workload.check()
    return workload


def workload_spec_with(spec: str, /, **flags: Any) -> str:
    """``spec`` with the options given as command-line flags merged in (``subset=10000`` from
    ``--subset 10000``; a ``None`` flag was not given). A flag the workload does not take, or one
    the spec already sets to another value, is refused with one ``ValueError`` naming the
    workload, the option and both values."""
    from mtl_opt._spec import format_spec, parse_spec

    flags = {k: v for k, v in flags.items() if v is not None}
    if not flags:
        return spec
    name, options = parse_spec(spec, "workload spec")
    key = _key(name)
    factory = _factory(key) if key in _REGISTRY else None
    for option, value in flags.items():
        flag = "--" + option.replace("_", "-")
        if factory is not None:
            params = inspect.signature(factory).parameters
            takes = [k for k, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
            if option not in takes and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                raise ValueError(f"{flag} {value}: workload {key!r} has no {option!r} option (it takes "
                                 f"{', '.join(takes) or 'no options'})")
        if option in options and options[option] != value:
            raise ValueError(f"{flag} {value} contradicts {option}={options[option]!r} in the workload "
                             f"spec {spec!r}: give {option} once")
        options[option] = value
    return format_spec(name, options)


def training_workload_from_spec(spec: str) -> TrainingWorkload:
    """``"multimnist:n_train=2000,shift=4"`` -> the workload (the command line's form)."""
    from mtl_opt._spec import parse_spec

    name, options = parse_spec(spec, "workload spec")
    return get_training_workload(name, **options)


def check_model(model: nn.Module, workload: TrainingWorkload) -> tuple[list[nn.Parameter], list[list[nn.Parameter]]]:
    """``(shared, per-task)`` parameters of ``model``, checked against ``workload``: one group per
    task, no parameter in two places. Raises one error naming what is wrong."""
    if not isinstance(model, nn.Module) or not isinstance(model, MultiTaskModel):
        raise TypeError(f"workload {workload.name!r}: build_model returned {type(model).__name__}, "
                        "which is not an nn.Module with shared_parameters() and task_parameters()")
    shared = list(model.shared_parameters())
    tasks = [list(g) for g in model.task_parameters()]
    if not shared:
        raise ValueError(f"workload {workload.name!r}: the model has no shared parameters")
    if len(tasks) != workload.n_tasks:
        raise ValueError(f"workload {workload.name!r}: the model has {len(tasks)} task parameter "
                         f"groups for {workload.n_tasks} tasks {workload.task_names}")
    seen: set[int] = set()
    for p in [*shared, *(p for g in tasks for p in g)]:
        if id(p) in seen:
            raise ValueError(f"workload {workload.name!r}: a parameter is both shared and "
                             "task-specific (or in two task groups)")
        seen.add(id(p))
    return shared, tasks


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (through dicts, lists and tuples) on ``device``."""
    nb = device.type == "cuda"
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=nb)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        if isinstance(batch, tuple):
            return type(batch)(*moved) if hasattr(batch, "_fields") else tuple(moved)  # namedtuple
        return moved
    return batch
