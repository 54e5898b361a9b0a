"""The field's tables for training workloads: per-task metrics, Δm%, mean rank, conflict.

**Δm%** (Maninis, Radosavovic & Kokkinos, CVPR 2019; as Nash-MTL, Navon et al. 2022, and FAMO,
Liu et al. 2023, report it): the mean relative change of a method's metrics against the
single-task baselines, signed so that lower is better,

    Δm% = (1/T) Σ_t (−1)^{h_t} (M_{m,t} − M_{b,t}) / M_{b,t} × 100,

over the workload's T metrics, ``h_t = 1`` when metric t is higher-is-better, ``M_{b,t}`` the
metric of the model trained on metric t's task alone (:class:`~mtl_opt.problems.workload.TaskMetric`
says which task and which direction). Here Δm% is computed per seed, against the baseline of the
same seed, and then averaged over seeds.

**Mean rank** (MR): for each metric the methods are ranked by their mean over seeds (1 = best in
the metric's direction; equal means share the average of their ranks), and a method's MR is the
mean of its ranks over the T metrics. The single-task baseline is not ranked.

**Mean ± 95 % CI over seeds**: ``x̄ ± t_{0.975, n−1} s / √n`` (Student's t,
:func:`mtl_opt.experiments.paired_stats.mean_ci`); one seed gives no interval.

The conflict columns describe the runs (:mod:`mtl_opt.experiments.conflict`): ``cos_mean``, the
mean cosine between the task gradients on the shared parameters, and ``conflict_share``, the
share of measured steps whose task gradients had a negative inner product.

Plotly is imported only by :func:`field_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtl_opt.problems.workload import TaskMetric

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["BASELINE", "delta_m", "field_display", "field_figure", "field_summary", "mean_ranks"]

#: The method label of the single-task baselines in the tables.
BASELINE = "single_task"


def delta_m(method: Mapping[str, float], baseline: Mapping[str, float], metrics: Sequence[TaskMetric]) -> float:
    """Δm% of one method's metric values against the single-task baselines' (module docstring).

    A metric missing from either side, a non-finite value or a zero baseline raises one
    ``ValueError`` naming the metric."""
    if not metrics:
        raise ValueError("Δm% needs at least one metric")
    total = 0.0
    for m in metrics:
        for side, values in (("method", method), ("baseline", baseline)):
            if m.name not in values:
                raise ValueError(f"Δm%: the {side} has no value for metric {m.name!r}")
            if not math.isfinite(float(values[m.name])):
                raise ValueError(f"Δm%: the {side}'s {m.name!r} is {values[m.name]}")
        b = float(baseline[m.name])
        if b == 0.0:
            raise ValueError(f"Δm%: the single-task baseline's {m.name!r} is 0, so the relative "
                             "change is undefined")
        sign = -1.0 if m.higher_is_better else 1.0
        total += sign * (float(method[m.name]) - b) / b
    return 100.0 * total / len(metrics)


def _average_ranks(values: Sequence[float], higher_is_better: bool) -> list[float]:
    """Ranks 1..n of ``values`` (1 = best), ties sharing the average of their ranks."""
    order = sorted(range(len(values)), key=lambda i: -values[i] if higher_is_better else values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def mean_ranks(means: Mapping[str, Mapping[str, float]], metrics: Sequence[TaskMetric]) -> dict[str, float]:
    """Each method's mean rank over ``metrics`` (module docstring); ``means[method][metric]``."""
    methods = list(means)
    if not methods:
        return {}
    for name in methods:
        for m in metrics:
            v = means[name].get(m.name)
            if v is None or not math.isfinite(float(v)):
                raise ValueError(f"mean rank: method {name!r} has no finite value for metric {m.name!r}")
    per_metric = [_average_ranks([float(means[n][m.name]) for n in methods], m.higher_is_better)
                  for m in metrics]
    return {n: sum(r[i] for r in per_metric) / len(metrics) for i, n in enumerate(methods)}


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    from mtl_opt.experiments.paired_stats import mean_ci

    xs = [float(v) for v in values if math.isfinite(float(v))]
    if not xs:
        return float("nan"), float("nan")
    if len(xs) == 1:
        return xs[0], float("nan")
    return mean_ci(xs)


def field_summary(runs: "pd.DataFrame", baselines: "pd.DataFrame", metrics: Sequence[TaskMetric]) -> "pd.DataFrame":
    """One row per method: every metric, Δm%, the conflict statistics (mean and CI half-width
    ``<col>_ci`` over seeds), the mean rank, and the single-task baseline's row first.

    ``runs``: one row per (``method``, ``seed``) with a column per metric and ``cos_mean``,
    ``conflict_share``, ``train_time_s``. ``baselines``: one row per ``seed`` with a column per
    metric, each metric from the model trained on its own task. Every run's seed must have a
    baseline."""
    import pandas as pd

    base = {int(r["seed"]): {m.name: float(r[m.name]) for m in metrics} for _, r in baselines.iterrows()}
    runs = runs.copy()
    missing = sorted({int(s) for s in runs["seed"]} - set(base))
    if missing:
        raise ValueError(f"no single-task baseline for seeds {missing}")
    runs["delta_m"] = [delta_m({m.name: r[m.name] for m in metrics}, base[int(r["seed"])], metrics)
                       for _, r in runs.iterrows()]
    rows: list[dict[str, Any]] = []
    base_row: dict[str, Any] = {"method": BASELINE, "n_seeds": len(base)}
    for m in metrics:
        base_row[m.name], base_row[f"{m.name}_ci"] = _mean_ci([b[m.name] for b in base.values()])
    base_row["delta_m"], base_row["delta_m_ci"] = 0.0, float("nan")
    rows.append(base_row)
    value_cols = [m.name for m in metrics] + ["delta_m", "cos_mean", "conflict_share"]
    for method, group in runs.groupby("method", sort=False):
        row: dict[str, Any] = {"method": method, "n_seeds": len(group)}
        for col in value_cols:
            row[col], row[f"{col}_ci"] = _mean_ci(list(group[col]))
        if "train_time_s" in group:
            row["train_time_s"] = float(group["train_time_s"].mean())
        rows.append(row)
    ranks = mean_ranks({r["method"]: {m.name: r[m.name] for m in metrics} for r in rows[1:]}, metrics)
    for r in rows:
        r["mean_rank"] = ranks.get(r["method"], float("nan"))
    return pd.DataFrame(rows)


#: Each column's direction in the displayed table.
_ARROWS = {"delta_m": "↓", "mean_rank": "↓"}


def field_display(summary: "pd.DataFrame", metrics: Sequence[TaskMetric], digits: int = 4) -> "pd.DataFrame":
    """The summary as text for a reader: headers carry their direction (↑/↓), values read
    ``mean ± half-width`` of the 95 % interval where there is one."""
    import pandas as pd

    arrows = {**_ARROWS, **{m.name: "↑" if m.higher_is_better else "↓" for m in metrics}}

    def fmt(v: Any) -> str:
        return f"{v:.{digits}g}" if isinstance(v, float) and math.isfinite(v) else ("" if isinstance(v, float) else str(v))

    cols = ["method", "n_seeds", *(m.name for m in metrics), "delta_m", "mean_rank",
            "cos_mean", "conflict_share"]
    shown: dict[str, list[str]] = {}
    for col in cols:
        if col not in summary:
            continue
        head = {"delta_m": "Δm%"}.get(col, col) + (f" {arrows[col]}" if col in arrows else "")
        if f"{col}_ci" in summary:
            shown[head] = [fmt(v) + (f" ± {h:.2g}" if isinstance(h, float) and math.isfinite(h) else "")
                           for v, h in zip(summary[col], summary[f"{col}_ci"])]
        else:
            shown[head] = [fmt(v) if not isinstance(v, str) else v for v in summary[col]]
    return pd.DataFrame(shown)


def field_figure(summary: "pd.DataFrame", metrics: Sequence[TaskMetric], path: str | Path) -> Path:
    """A plotly page: Δm% per method with its 95 % interval, each metric per method, and the
    conflict share; written to ``path`` (offline HTML)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from mtl_opt.experiments.html_pages import write_figure

    def err(col: str) -> dict[str, Any]:
        ci = summary.get(f"{col}_ci")
        if ci is None:
            return {}
        return {"error_y": {"type": "data", "array": [0.0 if not math.isfinite(v) else v for v in ci]}}

    methods = list(summary["method"])
    fig = make_subplots(rows=1, cols=3, subplot_titles=["Δm% (lower is better)", "metrics",
                                                        "share of conflicting steps"])
    fig.add_trace(go.Bar(x=methods, y=list(summary["delta_m"]), name="Δm%", **err("delta_m")), 1, 1)
    for m in metrics:
        fig.add_trace(go.Bar(x=methods, y=list(summary[m.name]), name=m.name, **err(m.name)), 1, 2)
    if "conflict_share" in summary:
        fig.add_trace(go.Bar(x=methods, y=list(summary["conflict_share"]), name="conflict share",
                             **err("conflict_share")), 1, 3)
    fig.update_layout(barmode="group", height=480, title="mean over seeds ± 95 % CI")
    return write_figure(fig, path)
