"""Workloads: what one sweep trial or one ablation cell trains.

Sweeps and ablations do not know about any particular problem. They hand a :class:`Workload` a
method name, its hyperparameters and the training settings, and receive ``callback(step, metrics)``
calls as training goes (metrics: a flat mapping of names to numbers, e.g. ``loss_1 .. loss_K``,
``stationarity``, ``front_distance``). Two adapters exist:

* :class:`SyntheticWorkload` — any problem of :func:`mtl_opt.problems.get_problem` ("toy",
  "zdt1", ...), trained by :func:`mtl_opt.experiments.runner.run_method`;
* :class:`~mtl_opt.experiments.rrg_workload.RRGWorkload` — ``--problem rrg``, the radiology
  report generation workload (``train_rrg(config, callback=...)``);
* :class:`FunctionWorkload` — any function ``fn(config, callback=...)`` whose ``config`` is a plain
  dict: a user's own training loop;
* :class:`TrainedWorkload` — ``--workload NAME``: any training workload
  (:mod:`mtl_opt.problems.workload`: Multi-MNIST, RRG, ...) trained by the one trainer
  (:mod:`mtl_opt.experiments.trainer`). This is how a study reaches a training workload; the
  workload itself stays data, model, losses and metrics.

:func:`get_workload` maps a ``--problem`` name to a workload; :func:`register_workload` adds a name
(the extension point the radiology workload plugs into: ``register_workload("rrg", factory)``).
Workload objects travel to Ray workers by pickling, so they hold names and options, not models.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FunctionWorkload",
    "TrainedWorkload",
    "SyntheticWorkload",
    "TrainingSettings",
    "Workload",
    "available_workloads",
    "get_workload",
    "normalise_metrics",
    "register_workload",
]

Callback = Callable[[int, Mapping[str, Any]], None]

#: Training options that a search space may name besides the method's own hyperparameters.
TRAINING_KNOBS = ("lr",)


@dataclass(frozen=True)
class TrainingSettings:
    """The settings of one run that are not searched: shared by every trial of a sweep."""

    method: str = "came_grad"
    method_options: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    optimizer: str = "adam"
    lr: float = 1e-3
    steps: int = 1000
    record_every: int = 100
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.record_every, int) or self.record_every < 1:
            raise ValueError(f"record_every must be a positive integer, got {self.record_every!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {self.optimizer!r}")


def normalise_metrics(step: int, metrics: Mapping[str, Any], *,
                      required: tuple[str, ...] = ()) -> dict[str, float]:
    """Plain floats, plus ``loss_mean`` (mean of ``loss_1..loss_K``).

    A non-finite loss (``loss_*``) or ``required`` metric raises :class:`FloatingPointError` (the
    run diverged); other metrics may be NaN where they are undefined (e.g. a ratio of zero norms).
    """
    row: dict[str, float] = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)):
            raise TypeError(f"metric {key!r} at step {step} is not a number: {value!r}")
        value = float(value)
        key = str(key)
        if not math.isfinite(value) and (key.startswith("loss_") or key in required):
            raise FloatingPointError(f"metric {key!r} is {value} at step {step}: the run diverged")
        row[key] = value
    losses = [v for k, v in row.items() if k.startswith("loss_") and k[5:].isdigit()]
    if losses and "loss_mean" not in row:
        row["loss_mean"] = sum(losses) / len(losses)
    return row


class Workload(ABC):
    """Something a sweep trial can train: a problem, a method and settings in, metrics out."""

    name: str = ""

    @abstractmethod
    def run(self, settings: TrainingSettings, hyperparameters: Mapping[str, Any],
            callback: Callback) -> None:
        """Train once; call ``callback(step, metrics)`` as training goes (metrics averaged over
        ``settings.seeds``). Raise on failure; never return silently without reporting."""

    def tunable_names(self, method: str) -> list[str]:
        """The names a search space may use: the method's hyperparameters and ``lr``."""
        from mtl_opt.registry import aggregator_class

        params = inspect.signature(aggregator_class(method).__init__).parameters
        names = [k for k, p in params.items()
                 if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        return names + list(TRAINING_KNOBS)

    def default_metric(self) -> str:
        return "loss_mean"

    def default_budget(self) -> dict[str, float]:
        """Steps and learning rate used when a study does not set them."""
        return {"steps": 1000, "lr": 1e-3}

    def resolve_budget(self, steps: int | None, lr: float | None) -> tuple[int, float]:
        """``steps`` and ``lr`` as given, or the workload's defaults where ``None``."""
        budget = self.default_budget()
        steps = int(budget["steps"]) if steps is None else steps
        lr = float(budget["lr"]) if lr is None else lr
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return steps, lr

    def final_only(self, metric: str) -> bool:
        """Whether ``metric`` is reported only at the end of a run (not usable by ASHA)."""
        return False

    #: Folder for run artifacts a workload writes (``None``: the workload's default).
    run_root: str | None = None

    def finals_per_seed(self, settings: TrainingSettings,
                        variants: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
        """Final metrics of each variant (name -> hyperparameters) for each seed of ``settings``.

        The default trains every variant and seed on its own with :meth:`run` and keeps the last
        report; workloads that can batch runs override it.
        """
        out: dict[str, dict[int, dict[str, float]]] = {}
        for name, hyper in variants.items():
            out[name] = {}
            for seed in settings.seeds:
                last: dict[str, float] = {}

                def callback(step: int, metrics: Mapping[str, Any], last: dict = last) -> None:
                    last.clear()
                    last.update(normalise_metrics(int(step), metrics))

                one = TrainingSettings(**{**settings.__dict__, "seeds": (seed,)})
                self.run(one, hyper, callback)
                if not last:
                    raise RuntimeError(f"{self.name!r} finished without reporting any metric")
                out[name][int(seed)] = last
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class SyntheticWorkload(Workload):
    """A synthetic Pareto problem (``mtl_opt.problems``) trained by the batched study runner.

    Seeds of one configuration run as one batch (:func:`mtl_opt.experiments.runner.run_method`);
    an ablation's variants and seeds run as one batch too (:meth:`finals_per_seed`).
    """

    def __init__(self, problem: str, **options: Any):
        from mtl_opt.problems import get_problem

        get_problem(problem, **options)  # fail now on an unknown problem or option
        self.problem = problem
        self.options = dict(options)
        self.name = problem

    def _build(self) -> Any:
        from mtl_opt.problems import get_problem

        return get_problem(self.problem, **self.options)

    def default_metric(self) -> str:
        return "front_distance" if self._build().has_known_front else "loss_mean"

    def default_budget(self) -> dict[str, float]:
        """The problem's budget in ``mtl-opt compare``'s default suite (toy: 3000 steps at 1e-2)."""
        from mtl_opt.experiments.compare_cli import FALLBACK, SUITE_DEFAULTS

        return dict(SUITE_DEFAULTS.get(self._build().name, FALLBACK))

    def run(self, settings: TrainingSettings, hyperparameters: Mapping[str, Any],
            callback: Callback) -> None:
        from mtl_opt.experiments.runner import run_method
        from mtl_opt.registry import get_aggregator

        problem = self._build()
        seeds = tuple(settings.seeds)
        run_method(
            problem,
            get_aggregator(settings.method, **dict(hyperparameters)),
            starts=self._starts(problem, seeds),
            seeds=seeds,
            optimizer=settings.optimizer,
            lr=float(settings.lr),
            steps=settings.steps,
            record_every=settings.record_every,
            callback=callback,
            device=settings.device,
        )

    def finals_per_seed(self, settings: TrainingSettings,
                        variants: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
        from mtl_opt.experiments.runner import run_methods
        from mtl_opt.registry import get_aggregator

        aggs = [get_aggregator(settings.method, **dict(h)) for h in variants.values()]
        problem = self._build()
        results = run_methods(problem, aggs, starts=self._starts(problem, tuple(settings.seeds)),
                              seeds=tuple(settings.seeds),
                              optimizer=settings.optimizer, lr=float(settings.lr),
                              steps=settings.steps, record_every=settings.record_every,
                              device=settings.device)
        out: dict[str, dict[int, dict[str, float]]] = {}
        for name, res in zip(variants, results):
            out[name] = {}
            for seed in settings.seeds:
                mask = res.seed == seed  # every start run with this seed
                metrics: dict[str, Any] = {
                    f"loss_{k + 1}": res.losses[mask, k].mean() for k in range(res.losses.shape[1])
                }
                metrics["stationarity"] = res.stationarity[mask].mean()
                if res.front_distance is not None:
                    metrics["front_distance"] = res.front_distance[mask].mean()
                out[name][int(seed)] = normalise_metrics(settings.steps, metrics)
        return out

    @staticmethod
    def _starts(problem: Any, seeds: tuple[int, ...]) -> Any:
        """The protocol starts for one seed; with several seeds on a problem without gradient
        noise, each seed draws its own starts (:func:`~mtl_opt.experiments.runner.seeded_starts`)
        so that the seeds are replicates rather than identical copies."""
        from mtl_opt.experiments.runner import seeded_starts

        if len(seeds) > 1 and float(getattr(problem, "gradient_noise_std", 0.0)) == 0.0:
            return seeded_starts(problem, seeds)
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "synthetic", "options": self.options}


class FunctionWorkload(Workload):
    """Any training function ``fn(config, callback=...)`` with a plain-dict ``config``.

    ``config`` holds the training settings (``method``, ``seeds``, ``optimizer``, ``lr``, ``steps``,
    ``record_every``, ``device``), ``hyperparameters`` (the method's keywords, fixed ones and
    searched ones merged) and ``options`` (this workload's own, fixed options). The function must
    call ``callback(step, metrics)`` as it trains.
    """

    def __init__(self, fn: Callable[..., Any], *, name: str | None = None,
                 options: Mapping[str, Any] | None = None, metric: str = "loss_mean",
                 extra_tunable: tuple[str, ...] = ()):
        if not callable(fn):
            raise TypeError(f"a FunctionWorkload needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        self.options = dict(options or {})
        self.metric = metric
        self.extra_tunable = tuple(extra_tunable)

    def default_metric(self) -> str:
        return self.metric

    def tunable_names(self, method: str) -> list[str]:
        return super().tunable_names(method) + list(self.extra_tunable)

    def run(self, settings: TrainingSettings, hyperparameters: Mapping[str, Any],
            callback: Callback) -> None:
        config = {
            "method": settings.method,
            "hyperparameters": dict(hyperparameters),
            "seeds": list(settings.seeds),
            "optimizer": settings.optimizer,
            "lr": float(settings.lr),
            "steps": settings.steps,
            "record_every": settings.record_every,
            "device": settings.device,
            "options": dict(self.options),
        }
        self.fn(config, callback=callback)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "function", "options": self.options}


class TrainedWorkload(Workload):
    """A training workload (``"multimnist"``, ``"rrg:n_train=256"``) trained by
    :func:`mtl_opt.experiments.trainer.train`, one run per seed.

    Reported as training goes: every logged trainer row (``loss_<task>``, ``beta_<task>``,
    ``cos``, ``conflict_share``, ...) plus ``loss_mean``, the mean of the task losses; at the end
    the last validation's and the test split's metrics (``val_<metric>``, ``test_<metric>``) and
    the run's ``cos_mean``. With several seeds the runs go one after the other and their rows are
    averaged step by step. Each run writes its folder under ``run_root`` (``<out>/runs`` in sweeps
    and ablations; a temporary folder otherwise, removed at the end).
    """

    def __init__(self, spec: str):
        from mtl_opt.problems.workload import training_workload_from_spec

        workload = training_workload_from_spec(spec)  # unknown names and bad options fail now
        self.spec = workload.spec()
        self.name = workload.name
        self.options = dict(workload.options)
        self.run_root = None

    def _workload(self) -> Any:
        from mtl_opt.problems.workload import training_workload_from_spec

        return training_workload_from_spec(self.spec)

    def default_metric(self) -> str:
        return "loss_mean"

    def default_budget(self) -> dict[str, float]:
        """The workload's own training defaults (epochs turned into steps on seed 0's data)."""
        workload = self._workload()
        d = workload.defaults
        steps = d.steps if d.steps is not None else d.epochs * math.ceil(len(workload.data(0).train) / d.batch_size)
        return {"steps": int(steps), "lr": float(d.lr)}

    def final_only(self, metric: str) -> bool:
        return metric.startswith(("test_", "val_")) or metric == "cos_mean"

    def _train_one(self, settings: TrainingSettings, hyper: Mapping[str, Any], seed: int, root: str,
                   on_row: Callback | None) -> tuple[list[tuple[int, dict[str, float]]], dict[str, float]]:
        import hashlib
        import json
        import os

        from mtl_opt._spec import format_spec
        from mtl_opt.experiments.trainer import TrainConfig, train

        key = json.dumps({"hyper": dict(hyper), "lr": settings.lr, "optimizer": settings.optimizer,
                          "steps": settings.steps}, sort_keys=True, default=str)
        tag = hashlib.sha1(key.encode()).hexdigest()[:10]
        cfg = TrainConfig(workload=self.spec, method=format_spec(settings.method, dict(hyper)),
                          seed=int(seed), steps=settings.steps, lr=float(settings.lr),
                          optimizer=settings.optimizer, log_every=settings.record_every,
                          device=settings.device, out=os.path.join(root, f"{settings.method}-{tag}-seed{seed}"))
        rows: list[tuple[int, dict[str, float]]] = []

        def collect(step: int, row: Mapping[str, Any]) -> None:
            values = {k: float(v) for k, v in row.items() if k not in ("step", "epoch", "time_s")}
            losses = [v for k, v in values.items() if k.startswith("loss_")]
            values["loss_mean"] = sum(losses) / len(losses)
            rows.append((int(step), values))
            if on_row is not None:
                on_row(int(step), values)

        result = train(cfg, callback=collect)
        final = {f"test_{k}": float(v) for k, v in result["test"].items()}
        final.update({f"val_{k}": float(v) for k, v in result["val"].items()})
        final["cos_mean"] = float(result["cos_mean"])
        return rows, final

    def run(self, settings: TrainingSettings, hyperparameters: Mapping[str, Any],
            callback: Callback) -> None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mtl-opt-runs-") as scratch:
            root = self.run_root or scratch
            seeds = list(settings.seeds)
            if len(seeds) == 1:
                rows, final = self._train_one(settings, hyperparameters, seeds[0], root, callback)
                callback(rows[-1][0], {**rows[-1][1], **final})
                return
            runs = [self._train_one(settings, hyperparameters, s, root, None) for s in seeds]
        steps = [step for step, _ in runs[0][0]]
        if any([step for step, _ in rows] != steps for rows, _ in runs[1:]):
            raise RuntimeError("the seeds' runs logged different steps; cannot average them")
        for i, step in enumerate(steps):
            callback(step, {k: sum(r[0][i][1][k] for r in runs) / len(runs) for k in runs[0][0][i][1]})
        final = {k: sum(r[1][k] for r in runs) / len(runs) for k in runs[0][1]}
        callback(steps[-1], {**{k: sum(r[0][-1][1][k] for r in runs) / len(runs)
                                for k in runs[0][0][-1][1]}, **final})

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "training", "spec": self.spec, "options": self.options}


_WORKLOADS: dict[str, Callable[..., Workload]] = {}


def register_workload(name: str, factory: Callable[..., Workload]) -> None:
    """Make ``--problem NAME`` build ``factory(**options)`` instead of a synthetic problem."""
    if not name or name != name.lower():
        raise ValueError(f"workload names are lower-case, got {name!r}")
    _WORKLOADS[name] = factory


def _rrg(**options: Any) -> Workload:
    from mtl_opt.experiments.rrg_workload import RRGWorkload

    return RRGWorkload(**options)


register_workload("rrg", _rrg)


def available_workloads() -> list[str]:
    """Names registered with :func:`register_workload` (synthetic problems come on top)."""
    return list(_WORKLOADS)


def get_workload(problem: str | Workload, **options: Any) -> Workload:
    """A workload object for ``--problem``: a registered workload name, else a synthetic problem."""
    if isinstance(problem, Workload):
        if options:
            raise ValueError("problem options are given to the Workload's constructor, not here")
        return problem
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"--problem must name a problem, got {problem!r}")
    key = problem.strip().lower()
    if key in _WORKLOADS:
        return _WORKLOADS[key](**options)
    return SyntheticWorkload(key, **options)
