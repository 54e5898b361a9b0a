"""The sweep's results tables, built from what each trial reported.

Ray Tune's own summaries do not fit a study: ``ResultGrid.get_dataframe()`` has no status column,
``get_best_result()`` may return a trial that errored, and a retried trial's metric history holds
every attempt one after the other, so steps repeat. Here each trial becomes a
:class:`TrialRecord` (its configuration, every reported row in order, its error and how often it
failed), and :func:`build_tables` turns records into two pandas tables:

* ``trials`` — one row per trial: ``trial_id``, ``status`` (``COMPLETED``, ``STOPPED`` by the
  early-stopping scheduler, ``ERROR``, ``INTERRUPTED`` when the sweep ended before it), ``attempts``,
  ``error``, the searched hyperparameters, ``steps_done``, the final value of every metric, and
  ``<metric>_best`` over the run;
* ``curves`` — one row per trial and step of the last attempt (earlier attempts dropped; within an
  attempt a repeated step keeps its last report).

Attempts are told apart by ``training_iteration`` starting again (Tune counts reports per attempt).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrialRecord", "best_trial", "build_tables", "error_text", "last_attempt", "records_from_results"]

# Bookkeeping columns Tune adds to every report; kept out of the tables.
_TUNE_COLUMNS = {
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "training_iteration",
    "trial_id", "date", "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip",
    "time_since_restore", "iterations_since_restore", "experiment_tag", "config",
}


@dataclass
class TrialRecord:
    """Everything known about one trial."""

    trial_id: str
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    failures: int = 0
    interrupted: bool = False  # Tune had not finished it when the sweep ended


def last_attempt(rows: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The rows of the last attempt, one per step (last report wins), and the number of attempts."""
    attempts: list[list[dict[str, Any]]] = []
    previous: float | None = None
    for row in rows:
        it = row.get("training_iteration")
        it = None if it is None or _is_nan(it) else float(it)
        if not attempts or (it is not None and previous is not None and it <= previous):
            attempts.append([])
        attempts[-1].append(dict(row))
        if it is not None:
            previous = it
    if not attempts:
        return [], 0
    by_step: dict[int, dict[str, Any]] = {}
    for row in attempts[-1]:
        if "step" not in row or _is_nan(row["step"]):
            continue
        by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)], len(attempts)


def _is_nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _metric_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items()
            if k not in _TUNE_COLUMNS and k not in ("step", "completed") and not k.startswith("config/")}


def build_tables(
    records: Iterable[TrialRecord],
    *,
    searched: Sequence[str],
    metric: str,
    mode: str,
    steps: int | None = None,
) -> tuple[Any, Any]:
    """``(trials, curves)`` pandas tables from trial records (see the module docstring).

    A trial is ``COMPLETED`` when its last report says so or reached ``steps`` (a scheduler may
    stop a trial at its last step, before the trial's own final report), ``STOPPED`` otherwise.
    """
    import pandas as pd

    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    trial_rows, curve_rows = [], []
    for rec in records:
        rows, n_attempts = last_attempt(rec.rows)
        # Each failure ends one attempt; a trial that did not end in an error had one more.
        attempts = max(n_attempts, rec.failures + (0 if rec.error is not None else 1))
        if rec.error is not None:
            status = "ERROR"
        elif rec.interrupted:
            status = "INTERRUPTED"
        elif rows and (bool(rows[-1].get("completed", False))
                       or (steps is not None and int(rows[-1]["step"]) >= steps)):
            status = "COMPLETED"
        elif rows:
            status = "STOPPED"
        else:
            status = "NOT_RUN"
        row: dict[str, Any] = {
            "trial_id": rec.trial_id,
            "status": status,
            "attempts": attempts,
            "error": rec.error or "",
        }
        for name in searched:
            row[name] = rec.config.get(name)
        row["steps_done"] = int(rows[-1]["step"]) if rows else 0
        if rows:
            row.update(_metric_columns(rows[-1]))
            values = [float(r[metric]) for r in rows if metric in r and not _is_nan(r[metric])]
            if values:
                row[f"{metric}_best"] = min(values) if mode == "min" else max(values)
        trial_rows.append(row)
        for r in rows:
            curve = {"trial_id": rec.trial_id, "step": int(r["step"])}
            curve.update({name: rec.config.get(name) for name in searched})
            curve.update(_metric_columns(r))
            curve_rows.append(curve)
    trials = pd.DataFrame(trial_rows)
    curves = pd.DataFrame(curve_rows)
    if trials.empty:
        trials = pd.DataFrame(columns=["trial_id", "status", "attempts", "error", *searched, "steps_done"])
    if curves.empty:
        curves = pd.DataFrame(columns=["trial_id", "step", *searched])
    if metric not in trials.columns:
        trials[metric] = float("nan")
        trials[f"{metric}_best"] = float("nan")
    trials = trials.sort_values("trial_id", kind="stable").reset_index(drop=True)
    return trials, curves


def best_trial(trials: Any, *, metric: str, mode: str) -> dict[str, Any] | None:
    """The best trial by final ``metric`` among completed trials (stopped ones if none completed);
    errored trials never count. ``None`` when no trial produced the metric."""
    for statuses in (("COMPLETED",), ("STOPPED",)):
        pool = trials[trials["status"].isin(statuses) & trials[metric].notna()]
        if len(pool):
            idx = pool[metric].idxmin() if mode == "min" else pool[metric].idxmax()
            return trials.loc[idx].to_dict()
    return None


def error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    cause = getattr(error, "cause", None)
    exc = cause if isinstance(cause, BaseException) else error
    text = str(exc).strip().splitlines()
    message = text[-1] if text else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def records_from_results(result_grid: Any, failures: Mapping[str, int] | None = None, *,
                         unfinished: Iterable[str] = ()) -> list[TrialRecord]:
    """Trial records from a Ray Tune ``ResultGrid`` (one per trial, in trial order).

    ``failures`` counts failed attempts per trial id; ``unfinished`` names trials that Tune had not
    finished (an interrupted sweep)."""
    failures = dict(failures or {})
    unfinished = set(unfinished)
    records = []
    for result in result_grid:
        df = result.metrics_dataframe
        rows = df.to_dict("records") if df is not None and len(df) else []
        trial_id = None
        if rows:
            trial_id = rows[0].get("trial_id")
        if trial_id is None:
            trial_id = (result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path)
        config = {k: v for k, v in (result.config or {}).items() if not k.startswith("_")}
        records.append(TrialRecord(str(trial_id), config, rows, error_text(result.error),
                                   failures.get(str(trial_id), 0), str(trial_id) in unfinished))
    return records


def _trial_id_from_path(path: str | None) -> str:
    """Tune names trial folders ``<trainable>_<experiment id>_<index>_<params>_<date>``."""
    import os
    import re

    base = os.path.basename(str(path or "unknown"))
    match = re.search(r"([0-9a-f]{5}_\d{5})", base)
    return match.group(1) if match else base
