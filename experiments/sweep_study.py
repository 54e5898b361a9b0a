"""``mtl-opt sweep``: a Ray Tune search over a method's hyperparameters on any problem.

Each trial trains one configuration (over ``seeds``, averaged) through a
:class:`~mtl_opt.experiments.workloads.Workload` and reports its metrics with ``tune.report`` every
``record_every`` steps, so an early-stopping scheduler (ASHA) can stop poor trials on the way.
After the search the output folder holds:

* ``config.json`` — every setting of the sweep (how the tables were produced);
* ``trials.csv`` / ``trials.md`` — one row per trial: status, attempts, error, hyperparameters,
  final metrics (see :mod:`mtl_opt.experiments.sweep_table`);
* ``curves.csv`` — every reported step of every trial (last attempt only);
* ``best.json`` — the best completed trial's configuration and metric;
* ``heatmap.html`` — the metric over κ × ν at the best trial's ρ (or the first searched axes);
* ``heatmap_facets.html`` — the same, one panel per ρ;
* ``parallel.html`` — parallel coordinates of all trials; ``curves.html`` — metric against step;
* ``runs/`` — artifacts the workload writes (the RRG runs' folders);
* ``ray/`` — Ray Tune's experiment folder (``--resume`` continues from it).

Ray runs embedded on this machine unless ``address``/``RAY_ADDRESS`` names a cluster; actors are
reused across trials (a fresh worker per trial would re-import torch every time). Ray is imported
only when a sweep runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mtl_opt.experiments.html_pages import write_figure
from mtl_opt.experiments.search_space import Dimension, as_space, space_size
from mtl_opt.experiments.shared_args import (
    add_out_argument,
    add_seeds_argument,
    add_workload_argument,
    out_target,
    parse_seeds,
    study_target,
)
from mtl_opt.experiments.workloads import (
    TrainingSettings,
    Workload,
    get_workload,
    normalise_metrics,
)

__all__ = ["check_trial_methods", "configure", "parse_spec", "run", "sweep"]

COMMAND = "sweep"
COMMAND_HELP = "Ray Tune search over a method's hyperparameters on any problem"

EXPERIMENT_NAME = "sweep"


# ------------------------------------------------------------------------------------------------
# The trial (runs inside a Ray worker)
# ------------------------------------------------------------------------------------------------
def sweep_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: train one configuration and report as it goes.

    ``config`` holds the searched hyperparameters, plus ``_workload`` (the Workload object),
    ``_settings`` (a :class:`TrainingSettings` as a dict) and ``_metric`` (the optimised metric).
    """
    from ray import tune

    import torch

    workload: Workload = config["_workload"]
    settings = dict(config["_settings"])
    metric: str = config["_metric"]
    searched = {k: v for k, v in config.items() if not k.startswith("_")}
    if "lr" in searched:
        settings["lr"] = float(searched.pop("lr"))
    settings["seeds"] = tuple(settings["seeds"])
    cpus = config.get("_cpus_per_trial", 1)
    torch.set_num_threads(max(1, int(cpus)))
    training = TrainingSettings(**settings)
    hyper = {**training.method_options, **searched}
    last: dict[str, Any] = {}

    def callback(step: int, metrics: Mapping[str, Any]) -> None:
        row = normalise_metrics(int(step), metrics, required=(metric,))
        if metric not in row and workload.final_only(metric):
            row[metric] = float("nan")  # known only once training has ended
        if metric not in row:
            raise KeyError(
                f"the sweep's metric {metric!r} is not reported by {workload.name!r}; "
                f"it reports {sorted(row)}"
            )
        row["step"] = int(step)
        row["completed"] = False
        last.clear()
        last.update(row)
        tune.report(row)

    workload.run(training, hyper, callback)
    if not last:
        raise RuntimeError(f"{workload.name!r} finished without reporting any metric")
    tune.report({**last, "completed": True})


# ------------------------------------------------------------------------------------------------
# Small parsers shared with the CLI
# ------------------------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"quadratic:dim=10,noise=0.1"`` -> ``("quadratic", {"dim": 10, "noise": 0.1})`` (problem specs)."""
    from mtl_opt._spec import parse_spec as parse_name_and_options

    return parse_name_and_options(spec, "problem spec")


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------
def _progress_callback(metric: str, total: int, steps: int, echo: bool) -> Any:
    from ray import tune

    class Progress(tune.Callback):
        """Counts failures per trial and prints one line per finished, retried or failed trial."""

        def __init__(self) -> None:
            self.failures: dict[str, int] = {}
            self.done = 0
            self.status: dict[str, str] = {}  # Tune's status of each trial at the last step
            self.finished: set[str] = set()

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            self.status = {t.trial_id: t.status for t in trials}

        def unfinished(self) -> set[str]:
            """Trials Tune had not finished when the sweep ended (it was interrupted)."""
            return {tid for tid, st in self.status.items()
                    if st not in ("TERMINATED", "ERROR") and tid not in self.finished}

        def _say(self, text: str) -> None:
            if echo:
                print(text, flush=True)

        @staticmethod
        def _label(trial: Any) -> str:
            cfg = {k: v for k, v in trial.config.items() if not str(k).startswith("_")}
            return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg.items())

        @staticmethod
        def _error(trial: Any) -> str:
            from mtl_opt.experiments.sweep_table import error_text

            err = None
            try:  # the local copy is written before callbacks run; storage is synced later
                import cloudpickle

                local = trial.pickled_error_file
                if local and os.path.isfile(local):
                    with open(local, "rb") as f:
                        err = cloudpickle.load(f)
                if err is None:
                    err = trial.get_pickled_error()
            except Exception:  # noqa: BLE001 - best effort; the table has the error too
                err = None
            return error_text(err) or "see the trial's error.txt"

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            n = self.failures[trial.trial_id] = self.failures.get(trial.trial_id, 0) + 1
            self._say(f"  trial {trial.trial_id} ({self._label(trial)}) failed (attempt {n}), "
                      f"retrying: {self._error(trial)}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            n = self.failures[trial.trial_id] = self.failures.get(trial.trial_id, 0) + 1
            self.finished.add(trial.trial_id)
            self.done += 1
            self._say(f"[{self.done}/{total}] trial {trial.trial_id} ({self._label(trial)}) FAILED "
                      f"after {n} attempt(s): {self._error(trial)}")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.finished.add(trial.trial_id)
            self.done += 1
            res = trial.last_result or {}
            value = res.get(metric)
            shown = f"{value:.5g}" if isinstance(value, float) else str(value)
            done = res.get("completed") or int(res.get("step", 0)) >= steps
            how = "" if done else f" (stopped early at step {res.get('step')})"
            self._say(f"[{self.done}/{total}] trial {trial.trial_id} ({self._label(trial)}): "
                      f"{metric}={shown}{how}")

    return Progress()


def _validate_space(space: Mapping[str, Dimension], workload: Workload, settings: TrainingSettings) -> None:
    if not space:
        raise ValueError("the search space is empty: give at least one --space NAME=KIND:ARGS")
    allowed = workload.tunable_names(settings.method)
    unknown = [n for n in space if n not in allowed]
    if unknown:
        raise ValueError(
            f"--space names {unknown} that {settings.method!r} on {workload.name!r} does not take; "
            f"searchable: {', '.join(allowed)}"
        )
    fixed_and_searched = sorted(set(space) & set(settings.method_options))
    if fixed_and_searched:
        raise ValueError(f"{fixed_and_searched} are both fixed in the method spec and searched")


#: Above this many combinations (grid cells × the random dimensions' ends), each dimension's
#: values are checked on their own instead of crossed with every other dimension's.
_MAX_CHECKED_COMBINATIONS = 20000


def _candidates(dim: Dimension) -> list[Any]:
    """The values a trial can take from ``dim`` that bound what it can take: every grid or
    choice value, and the two ends of a (log-)uniform range (with its middle)."""
    from mtl_opt.experiments.search_space import Choice, Grid, LogUniform, Uniform

    if isinstance(dim, (Grid, Choice)):
        return list(dim.values)
    if isinstance(dim, Uniform):
        return [dim.low, dim.high, 0.5 * (dim.low + dim.high)]
    if isinstance(dim, LogUniform):
        return [dim.low, dim.high, (dim.low * dim.high) ** 0.5]
    raise TypeError(f"unknown search dimension {dim!r}")


def check_trial_methods(settings: TrainingSettings, dims: Mapping[str, Dimension],
                        workload: Workload | None = None) -> int:
    """Build the method of every trial the sweep can run, before Ray starts; return how many
    configurations were built.

    The fixed hyperparameters (``--method NAME:k=v``) are built first; then every grid cell
    crossed with every choice value and both ends (and the middle) of every uniform or
    log-uniform range, so a value the method refuses (``nu=grid:2``; ``kappa=uniform:0,1``,
    whose lower end κ = 0 is outside κ > 0) stops the sweep here with the method's own message,
    naming the hyperparameter and the value. A searched ``lr`` must be a finite number > 0.
    Names that are neither method keywords nor ``lr`` (a custom workload's own) are left to
    the workload.
    """
    import itertools

    from mtl_opt.registry import _constructor_parameters, aggregator_class, get_aggregator

    params = set(_constructor_parameters(aggregator_class(settings.method)))
    fixed = dict(settings.method_options)
    try:
        get_aggregator(settings.method, **fixed)
    except (TypeError, ValueError) as exc:
        shown = ",".join(f"{k}={v!r}" for k, v in fixed.items())
        raise ValueError(f"--method {settings.method}{':' + shown if shown else ''}: {exc}") from None
    for name, dim in dims.items():
        if name == "lr":
            for v in _candidates(dim):
                if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                        or v <= 0):
                    raise ValueError(f"--space lr={dim.describe()}: lr must be a finite number > 0, "
                                     f"got {v!r}")
    method_dims = {k: d for k, d in dims.items() if k in params}
    names = list(method_dims)
    values = [_candidates(method_dims[k]) for k in names]
    total = math.prod(len(v) for v in values) if values else 0
    if total > _MAX_CHECKED_COMBINATIONS:
        # each dimension's values with the others at their first value
        combos = []
        for i in range(len(names)):
            for v in values[i]:
                combos.append(tuple(v if j == i else values[j][0] for j in range(len(names))))
    else:
        combos = list(itertools.product(*values)) if values else []
    for combo in combos:
        hyper = dict(zip(names, combo))
        try:
            get_aggregator(settings.method, **fixed, **hyper)
        except (TypeError, ValueError) as exc:
            bad = _blame(settings.method, fixed, hyper)
            where = ", ".join(f"{k}={hyper[k]!r} (from --space {k}={method_dims[k].describe()})"
                              for k in bad)
            raise ValueError(f"the sweep would run {settings.method} with {where}, which it "
                             f"refuses: {exc}") from None
    return len(combos) + 1


def _blame(method: str, fixed: Mapping[str, Any], hyper: Mapping[str, Any]) -> list[str]:
    """The searched names whose value alone (with the fixed ones) the method refuses; all of
    them when it is only their combination."""
    from mtl_opt.registry import get_aggregator

    alone = []
    for k, v in hyper.items():
        try:
            get_aggregator(method, **fixed, **{k: v})
        except (TypeError, ValueError):
            alone.append(k)
    return alone or list(hyper)


def _scheduler(name: str, settings: TrainingSettings, grace_period: int | None) -> Any:
    if name == "fifo":
        return None
    if name != "asha":
        raise ValueError(f"scheduler must be 'fifo' or 'asha', got {name!r}")
    from ray.tune.schedulers import ASHAScheduler

    grace = grace_period if grace_period is not None else max(settings.record_every, settings.steps // 4)
    if not 0 < grace <= settings.steps:
        raise ValueError(f"grace period must lie in [1, steps={settings.steps}], got {grace}")
    return ASHAScheduler(time_attr="step", max_t=settings.steps, grace_period=grace, reduction_factor=3)


def _write_outputs(out: Path, trials: Any, curves: Any, searched: list[str], metric: str,
                   mode: str, best: dict[str, Any] | None, echo: bool, how: str) -> None:
    from mtl_opt.experiments import sweep_figures as figs
    from mtl_opt.experiments.markdown_table import to_markdown

    out.mkdir(parents=True, exist_ok=True)
    trials.to_csv(out / "trials.csv", index=False)
    curves.to_csv(out / "curves.csv", index=False)
    (out / "trials.md").write_text(f"Sweep: {how}. Settings in config.json.\n\n"
                                   + to_markdown(trials) + "\n")
    best_json = None
    if best is not None:
        best_json = {
            "metric": metric, "mode": mode, "value": best[metric], "trial_id": best["trial_id"],
            "status": best["status"], "config": {k: _plain(best[k]) for k in searched},
        }
    (out / "best.json").write_text(json.dumps(best_json, indent=2) + "\n")
    figures = {
        "heatmap.html": figs.heatmap_figure(trials, searched, metric, mode),
        "heatmap_facets.html": figs.faceted_heatmap_figure(trials, searched, metric),
        "parallel.html": figs.parallel_figure(trials, searched, metric),
        "curves.html": figs.curves_figure(curves, trials, searched, metric),
    }
    n_ok = int(((trials["status"] != "ERROR") & trials[metric].notna()).sum())
    needs = {"heatmap.html": "two searched hyperparameters", "heatmap_facets.html": "three searched hyperparameters (the third, e.g. rho, picks the facet)",
             "parallel.html": "", "curves.html": ""}
    for name, fig in figures.items():
        if fig is None:
            if echo:
                why = "no trial reported the metric" if n_ok == 0 else f"it needs {needs[name]}"
                print(f"  ({name} not drawn: {why})")
            continue
        write_figure(fig, out / name)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return v


def sweep(
    problem: str | Workload = "toy",
    method: str = "came_grad",
    space: Mapping[str, Any] | Iterable[str] | None = None,
    *,
    samples: int = 1,
    seeds: int | Sequence[int] = (0,),
    metric: str | None = None,
    mode: str = "min",
    scheduler: str = "fifo",
    grace_period: int | None = None,
    steps: int | None = None,
    record_every: int | None = None,
    optimizer: str = "adam",
    lr: float | None = None,
    device: str | None = None,
    problem_options: Mapping[str, Any] | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    max_failures: int = 2,
    out: str | os.PathLike | None = None,
    unique_out: bool = False,
    resume: str | os.PathLike | None = None,
    probe_timeout: float = 5.0,
    reuse_actors: bool = True,
    verbose: bool = True,
) -> Any:
    """Run a Ray Tune sweep and return the trials table (a pandas DataFrame).

    Args:
        problem: a problem name (``"toy"``, ``"zdt1"``, a registered workload such as ``"rrg"``),
            optionally with options ``"zdt1:n_var=10"``, or a :class:`Workload` object.
        method: a registered method, optionally with fixed hyperparameters
            (``"came_grad:task_weights=[1,4]"``); the searched ones come from ``space``.
        space: ``{"kappa": [1, 2], "rho": "uniform:0,0.9"}`` or ``["kappa=grid:1,2", ...]``.
        samples: repeats of the grid, each with fresh draws of the random dimensions.
        seeds: seeds per configuration (a count or a list); the metric is the mean over the seeds
            (and, for synthetic problems, over the problem's protocol starts).
        metric, mode: what to optimise (default: ``front_distance`` where the problem knows its
            front, else ``loss_mean``) and whether lower (``"min"``) or higher is better.
        scheduler: ``"fifo"`` (run every trial to the end) or ``"asha"`` (stop poor trials at
            rungs ``grace_period · 3^k`` steps).
        steps, record_every, optimizer, lr, device: training settings of each trial.
        address: an existing Ray cluster (else ``RAY_ADDRESS``, else embedded local Ray).
        num_cpus: size of the embedded Ray (default: every core).
        cpus_per_trial, gpus_per_trial: resources of one trial (fractional GPUs share a device).
        max_failures: retries of a trial that raises; a trial that still fails is reported with
            status ``ERROR`` and its error message.
        out: output folder, new or empty, claimed once every option is checked and before Ray
            starts (see :mod:`mtl_opt._output_folder`); ``unique_out=True`` moves a taken
            default name on to ``out-2``, ``out-3``, ... (default: none; Ray works in a temporary folder, removed at the end,
            and only the table is returned).
        resume: the output folder of an interrupted sweep: continue it with its saved settings.
        reuse_actors: keep Ray workers between trials (default); ``False`` starts a fresh worker,
            which re-imports torch, per trial.
    """
    from mtl_opt.experiments.ray_session import check_trial_resources, prepare_cluster_auth, ray_session

    prepare_cluster_auth(address)  # Ray reads RAY_AUTH_MODE when it is imported
    from ray import tune

    from mtl_opt.experiments.sweep_table import best_trial, build_tables, records_from_results

    echo = verbose
    if resume is not None:
        out_dir = Path(resume).expanduser().resolve()
        saved = _load_saved(out_dir)
        # the saved config must rebuild every trial's method, as a fresh sweep's options do
        # The workload object itself travels in the trials' saved configurations.
        settings = TrainingSettings(**{**saved["settings"], "seeds": tuple(saved["settings"]["seeds"])})
        searched = list(saved["searched"])
        metric, mode = saved["metric"], saved["mode"]
        cpus_per_trial, gpus_per_trial = saved["cpus_per_trial"], saved["gpus_per_trial"]
        check_trial_methods(settings, as_space(saved["space"]))
    else:
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {max_failures}")
        if isinstance(problem, Workload):
            workload = get_workload(problem)
            if problem_options:
                raise ValueError("problem_options go to the Workload's constructor")
        else:
            name, spec_options = parse_spec(problem)
            workload = get_workload(name, **{**spec_options, **dict(problem_options or {})})
        from mtl_opt.registry import parse_method_spec

        method_name, method_options = parse_method_spec(method)
        steps, lr = workload.resolve_budget(steps, lr)
        if record_every is None:
            record_every = max(1, min(100, steps // 10))
        settings = TrainingSettings(
            method=method_name, method_options=method_options, seeds=parse_seeds(seeds),
            optimizer=optimizer, lr=lr, steps=steps, record_every=record_every,
            device=device or ("cuda" if gpus_per_trial > 0 else "cpu"),
        )
        if settings.device.startswith("cuda") and not gpus_per_trial > 0:
            raise ValueError("--device cuda needs --gpus-per-trial > 0: Ray assigns GPUs to trials "
                             "(fractions share one GPU, e.g. 0.25)")
        dims = as_space(space)
        _validate_space(dims, workload, settings)
        check_trial_methods(settings, dims, workload)
        searched = list(dims)
        metric = metric or workload.default_metric()
        if scheduler == "asha" and workload.final_only(metric):
            raise ValueError(f"{metric!r} is known only after training, so ASHA cannot stop trials "
                             "on it; use --scheduler fifo or a training metric")
        tune_scheduler = _scheduler(scheduler, settings, grace_period)
        if out is not None and (Path(out).expanduser() / "ray" / EXPERIMENT_NAME).exists():
            raise FileExistsError(f"{Path(out).expanduser().resolve()} already holds a sweep; "
                                  f"use --resume {out} or another --out")
        out_dir = None
        from mtl_opt.experiments.environment import environment_stamp

        saved = {
            "problem": workload.name, "problem_options": getattr(workload, "options", {}),
            "workload": workload.describe(),
            "workload_kind": "named" if not isinstance(problem, Workload) else "object",
            "method": settings.method, "settings": {**settings.__dict__, "seeds": list(settings.seeds)},
            "space": {k: d.describe() for k, d in dims.items()}, "searched": searched,
            "samples": samples, "trials": space_size(dims, samples), "metric": metric, "mode": mode,
            "scheduler": scheduler, "grace_period": grace_period, "max_failures": max_failures,
            "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial,
            "address": address or os.environ.get("RAY_ADDRESS") or "local",
            "environment": environment_stamp(),
        }

    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ValueError(f"num_cpus must be an integer >= 1, got {num_cpus!r}")
    # Every option is checked: now the output folder is claimed (before Ray starts).
    from mtl_opt._output_folder import claim_output_folder, reclaim_output_folder

    folder = None
    if resume is not None:
        folder = reclaim_output_folder(out_dir, command="mtl-opt sweep --resume")
    elif out is not None:
        folder = claim_output_folder(out, command="mtl-opt sweep", unique=unique_out)
        out_dir = folder.path.resolve()
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="mtl-opt-sweep-"))
    total = int(saved["trials"])
    storage = out_dir / "ray"
    if echo:
        where = address or os.environ.get("RAY_ADDRESS") or "an embedded local Ray"
        print(f"sweep: {settings.method} on {saved['problem']}, {total} trial(s) of {settings.steps} "
              f"steps x {len(settings.seeds)} seed(s), {metric} ({mode}), on {where}"
              + (f"; outputs in {out_dir}" if folder is not None else ""), flush=True)

    try:
        started = time.perf_counter()
        with ray_session(address, num_cpus=num_cpus, probe_timeout=probe_timeout) as session:
            check_trial_resources(session.resources, cpus_per_trial, gpus_per_trial)
            if resume is None:  # written once Ray is up and can host the trials
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "config.json").write_text(json.dumps(saved, indent=2, default=str) + "\n")
            trainable = tune.with_resources(sweep_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
            progress = _progress_callback(metric, total, settings.steps, echo)
            run_config = tune.RunConfig(
                name=EXPERIMENT_NAME, storage_path=str(storage), verbose=0, callbacks=[progress],
                failure_config=tune.FailureConfig(max_failures=int(saved["max_failures"])),
            )
            quiet = _QuietTuneLogs()
            with quiet:
                if resume is not None:
                    experiment = storage / EXPERIMENT_NAME
                    if not tune.Tuner.can_restore(str(experiment)):
                        raise FileNotFoundError(f"no sweep to resume in {out_dir} (no {experiment})")
                    tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True)
                else:
                    if workload.run_root is None:
                        workload.run_root = str(out_dir / "runs")  # where runs write artifacts
                    param_space: dict[str, Any] = {k: d.to_tune() for k, d in dims.items()}
                    param_space.update({
                        "_workload": workload, "_metric": metric, "_cpus_per_trial": cpus_per_trial,
                        "_settings": {**settings.__dict__, "seeds": list(settings.seeds)},
                    })
                    tuner = tune.Tuner(
                        trainable,
                        param_space=param_space,
                        tune_config=tune.TuneConfig(
                            metric=metric, mode=mode, num_samples=samples, reuse_actors=reuse_actors,
                            scheduler=tune_scheduler,
                        ),
                        run_config=run_config,
                    )
                with _StopOnTerminate() as stop:
                    results = tuner.fit()
        elapsed = time.perf_counter() - started
        # Tune ends early only when stopped (Ctrl+C, or SIGTERM passed on as one): trials left
        # unfinished mean the sweep was interrupted
        unfinished = progress.unfinished()
        interrupted = (stop.received or "SIGINT") if unfinished or stop.received else None

        records = records_from_results(results, progress.failures, unfinished=unfinished)
        trials, curves = build_tables(records, searched=searched, metric=metric, mode=mode,
                                      steps=settings.steps)
        best = best_trial(trials, metric=metric, mode=mode)
        if out is not None or resume is not None:
            how = (f"{settings.method} on {saved['problem']}, searching "
                   f"{', '.join(f'{k}={v}' for k, v in saved['space'].items())} "
                   f"({saved['samples']} sample(s)), {settings.steps} steps, {settings.optimizer} "
                   f"lr={settings.lr:g}, seeds {list(settings.seeds)}, {metric} ({mode}), "
                   f"scheduler {saved['scheduler']}")
            _write_outputs(out_dir, trials, curves, searched, metric, mode, best, echo, how)
        else:  # no output folder asked for: the table is the result, Ray's scratch files go
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
        if echo:
            counts = trials["status"].value_counts().to_dict()
            print(f"sweep: {len(trials)} trial(s) in {elapsed:.1f} s: "
                  + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())), flush=True)
            for _, row in trials[trials["status"] == "ERROR"].iterrows():
                print(f"  FAILED {row['trial_id']} after {row['attempts']} attempt(s): {row['error']}",
                      file=sys.stderr, flush=True)
            if (trials["status"] == "INTERRUPTED").any():
                hint = (f"continue it with `mtl-opt sweep --resume {out_dir}`"
                        if out is not None or resume is not None
                        else "it ran without an output folder, so it cannot be resumed")
                print(f"sweep interrupted: {hint}", file=sys.stderr, flush=True)
            if best is not None:
                cfg = ", ".join(f"{k}={_plain(best[k])}" for k in searched)
                print(f"best: {cfg} -> {metric}={best[metric]:.6g} ({best['trial_id']})")
            if out is not None or resume is not None:
                print(f"outputs in {out_dir}")
        kept = out is not None or resume is not None
        trials.attrs.update({"metric": metric, "mode": mode, "out": str(out_dir) if kept else None,
                             "curves": curves, "best": best, "interrupted": interrupted})
        return trials
    except BaseException:
        if folder is not None:
            folder.abandon()  # removes the folder only if the run wrote nothing into it
        raise
    finally:
        if folder is not None:
            folder.release()


class _QuietTuneLogs:
    """Silence Tune's driver-side tracebacks while fitting; the progress callback and the trials
    table report each failure (message and attempts) instead, and ``error.txt`` keeps the trace."""

    _names = ("ray.tune", "ray.train", "ray.air")

    def __enter__(self) -> None:
        self._saved = {n: logging.getLogger(n).level for n in self._names}
        for n in self._names:
            logging.getLogger(n).setLevel(logging.CRITICAL)

    def __exit__(self, *exc: Any) -> None:
        for n, level in self._saved.items():
            logging.getLogger(n).setLevel(level)


class _StopOnTerminate:
    """While Tune fits: SIGTERM stops the sweep the way Ctrl+C does (Tune saves the experiment
    state, the trials so far are written, Ray is shut down) by handing the signal to Tune's
    SIGINT handler; a second SIGTERM stops at once. ``received`` names the signal that came."""

    received: str | None = None

    def __enter__(self) -> "_StopOnTerminate":
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_terminate) or signal.SIG_DFL
        return self

    def _on_terminate(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt("SIGTERM")
        self.received = "SIGTERM"
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)  # Tune's: ask the run to stop after this step
        else:
            raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _load_saved(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no sweep to resume in {out_dir}: {path.name} is missing")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mtl-opt sweep`` (no heavy imports here)."""
    parser.add_argument("--problem", default="toy",
                        help="problem name, optionally with options: toy, zdt1:n_var=10, quadratic:imbalance=100, rrg:n_train=256, ... (default: toy)")
    add_workload_argument(parser)
    parser.add_argument("--method", default="came_grad",
                        help="method, optionally with fixed hyperparameters, e.g. "
                        "'came_grad:task_weights=[1,4]' (default: came_grad)")
    parser.add_argument("--space", action="append", default=[], metavar="NAME=KIND:ARGS",
                        help="a searched hyperparameter (repeatable): grid:1,2,3 | choice:a,b | "
                        "uniform:LOW,HIGH | loguniform:LOW,HIGH; e.g. --space kappa=grid:1,1.5,2,3 "
                        "--space nu=grid:0,0.2,0.5,1 --space rho=uniform:0,0.9")
    parser.add_argument("--samples", type=int, default=1,
                        help="repeats of the grid, each with fresh random draws (default: 1)")
    add_seeds_argument(parser, more="Seeds per configuration; the metric is their mean")
    parser.add_argument("--metric", default=None,
                        help="metric to optimise (default: front_distance where the front is known, "
                        "else loss_mean)")
    parser.add_argument("--mode", choices=["min", "max"], default="min")
    parser.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo",
                        help="asha stops poor trials early (default: fifo)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per trial (default: the problem's budget in mtl-opt compare's suite, e.g. toy 3000; else 1000)")
    parser.add_argument("--record-every", type=int, default=None,
                        help="steps between reports (default: steps/10, at most 100)")
    parser.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="adam",
                        help="torch optimizer of each trial (adamw: rrg only)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: the problem's in mtl-opt compare's suite, e.g. toy 1e-2; else 1e-3)")
    parser.add_argument("--device", default=None,
                        help="torch device of each trial (default: cuda when --gpus-per-trial > 0, else cpu)")
    parser.add_argument("--address", default=None,
                        help="existing Ray cluster HOST:PORT (default: RAY_ADDRESS, else embedded local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs of the embedded Ray (default: every core; not with --address)")
    parser.add_argument("--cpus-per-trial", type=float, default=1)
    parser.add_argument("--gpus-per-trial", type=float, default=0,
                        help="GPUs per trial; fractions share one GPU (0.25: four trials per GPU)")
    parser.add_argument("--max-failures", type=int, default=2,
                        help="retries of a trial that raises before it is reported as failed")
    add_out_argument(parser, prefix="sweep")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue the interrupted sweep whose output folder is DIR")


_SEARCH_OPTIONS = ("problem", "workload", "method", "space", "samples", "seeds", "metric", "mode", "scheduler",
                   "steps", "record_every", "optimizer", "lr", "device", "max_failures",
                   "cpus_per_trial", "gpus_per_trial")


#: Exit status of an interrupted sweep, by signal (the shell's 128 + signal number).
INTERRUPTED_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def run(args: argparse.Namespace) -> int:
    """``mtl-opt sweep``: 0 when it ran to the end, 1 when every trial failed, 2 for bad options,
    130 (Ctrl+C) or 143 (SIGTERM) when interrupted (``--resume`` continues it)."""
    try:
        return _run(args)
    except (ConnectionError, FileExistsError) as exc:
        print(f"mtl-opt sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a second Ctrl+C or SIGTERM: stopped without waiting for Tune
        folder = args.resume or args.out
        hint = (f"continue it with `mtl-opt sweep --resume {folder}`" if folder
                else "continue it with `mtl-opt sweep --resume FOLDER` (see the 'outputs in' line)")
        print(f"sweep interrupted: {hint}", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT["SIGTERM" if "SIGTERM" in str(exc) else "SIGINT"]


def _run(args: argparse.Namespace) -> int:
    if args.resume is not None:
        defaults = argparse.ArgumentParser()
        configure(defaults)
        base = defaults.parse_args([])
        changed = [f"--{k.replace('_', '-')}" for k in _SEARCH_OPTIONS
                   if getattr(args, k) != getattr(base, k)]
        if changed:
            raise ValueError(f"--resume continues a saved sweep with its own settings; drop {', '.join(changed)}")
        table = sweep(resume=args.resume, address=args.address, num_cpus=args.num_cpus)
    else:
        out, unique = out_target(args.out, prefix="sweep")
        table = sweep(
            study_target(args), args.method, args.space, samples=args.samples, seeds=parse_seeds(args.seeds),
            metric=args.metric, mode=args.mode, scheduler=args.scheduler, steps=args.steps,
            record_every=args.record_every, optimizer=args.optimizer, lr=args.lr, device=args.device,
            address=args.address, num_cpus=args.num_cpus, cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            max_failures=args.max_failures, out=out, unique_out=unique,
        )
    if table.attrs.get("interrupted"):
        return INTERRUPTED_EXIT.get(table.attrs["interrupted"], 1)
    if (table["status"] == "ERROR").all():
        print("sweep: every trial failed (see the error column of trials.csv)", file=sys.stderr)
        return 1
    return 0
