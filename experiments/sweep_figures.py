"""Plotly figures of a sweep: heat maps over two hyperparameters, parallel coordinates, curves.

* :func:`heatmap_figure` — the metric over an ``x × y`` grid (CAME-Grad: κ × ν), averaged over the
  trials that fall in each cell, at the facet value of the best trial (ρ of the best trial);
* :func:`faceted_heatmap_figure` — the same, one panel per facet value (per ρ);
* :func:`parallel_figure` — every trial as one line across its hyperparameters and the metric;
* :func:`curves_figure` — the metric against the step, one line per trial.

Continuous hyperparameters (more than :data:`MAX_LEVELS` distinct values, e.g. ``uniform``
draws) are binned into :data:`N_BINS` equal-width bins labelled by their ranges. Errored trials
are left out of every figure (they are listed in ``trials.csv``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "curves_figure",
    "faceted_heatmap_figure",
    "heatmap_axes",
    "heatmap_figure",
    "parallel_figure",
]

MAX_LEVELS = 8
N_BINS = 5


def heatmap_axes(searched: Sequence[str]) -> tuple[str, str, str | None] | None:
    """``(x, y, facet)``: κ, ν, ρ when all were searched, else the first searched names in order."""
    preferred = [n for n in ("kappa", "nu", "rho") if n in searched]
    rest = [n for n in searched if n not in preferred]
    names = preferred + rest
    if len(names) < 2:
        return None
    return names[0], names[1], (names[2] if len(names) > 2 else None)


def _levels(series: Any) -> Any:
    """Categorical levels of a hyperparameter column: values as is, or bins when continuous."""
    import pandas as pd

    numeric = pd.api.types.is_numeric_dtype(series)
    if numeric and series.nunique() > MAX_LEVELS:
        return pd.cut(series, bins=N_BINS).astype(str)
    if numeric:
        return series
    return series.astype(str)


def _ok(trials: Any, metric: str) -> Any:
    return trials[(trials["status"] != "ERROR") & trials[metric].notna()].copy()


def _pivot(df: Any, x: str, y: str, metric: str) -> Any:
    return df.pivot_table(index=y, columns=x, values=metric, aggfunc="mean", observed=True).sort_index()


def _heatmap_trace(table: Any, metric: str, show_scale: bool, zmin: float, zmax: float) -> Any:
    import plotly.graph_objects as go

    return go.Heatmap(
        z=table.values, x=[str(c) for c in table.columns], y=[str(i) for i in table.index],
        colorscale="Viridis", zmin=zmin, zmax=zmax, showscale=show_scale,
        colorbar={"title": metric}, hovertemplate="x=%{x}<br>y=%{y}<br>" + metric + "=%{z:.4g}<extra></extra>",
        texttemplate="%{z:.3g}",
    )


def heatmap_figure(trials: Any, searched: Sequence[str], metric: str, mode: str) -> Any | None:
    """The metric over the first two searched axes, at the best trial's facet level."""
    import plotly.graph_objects as go

    axes = heatmap_axes(searched)
    df = _ok(trials, metric)
    if axes is None or df.empty:
        return None
    x, y, facet = axes
    df[x], df[y] = _levels(df[x]), _levels(df[y])
    title = f"{metric} (mean over trials per cell) over {x} × {y}"
    if facet is not None:
        df[facet] = _levels(df[facet])
        best = df.loc[df[metric].idxmin() if mode == "min" else df[metric].idxmax()]
        df = df[df[facet] == best[facet]]
        title += f", at the best trial's {facet} = {best[facet]}"
    table = _pivot(df, x, y, metric)
    fig = go.Figure(_heatmap_trace(table, metric, True, float(df[metric].min()), float(df[metric].max())))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y)
    return fig


def faceted_heatmap_figure(trials: Any, searched: Sequence[str], metric: str) -> Any | None:
    """One heat map panel per level of the third searched axis (``None`` without a third axis)."""
    from plotly.subplots import make_subplots

    axes = heatmap_axes(searched)
    df = _ok(trials, metric)
    if axes is None or axes[2] is None or df.empty:
        return None
    x, y, facet = axes
    df[x], df[y], df[facet] = _levels(df[x]), _levels(df[y]), _levels(df[facet])
    levels = sorted(df[facet].unique(), key=lambda v: (str(type(v)), v))
    fig = make_subplots(rows=1, cols=len(levels), subplot_titles=[f"{facet} = {v}" for v in levels],
                        shared_yaxes=True)
    zmin, zmax = float(df[metric].min()), float(df[metric].max())
    for i, level in enumerate(levels, start=1):
        table = _pivot(df[df[facet] == level], x, y, metric)
        fig.add_trace(_heatmap_trace(table, metric, i == len(levels), zmin, zmax), row=1, col=i)
        fig.update_xaxes(title_text=x, type="category", row=1, col=i)
    fig.update_yaxes(title_text=y, type="category", row=1, col=1)
    fig.update_layout(title=f"{metric} over {x} × {y}, one panel per {facet}")
    return fig


def parallel_figure(trials: Any, searched: Sequence[str], metric: str) -> Any | None:
    """Parallel coordinates: each trial's hyperparameters and final metric."""
    import pandas as pd
    import plotly.graph_objects as go

    df = _ok(trials, metric)
    if df.empty:
        return None
    dims = []
    for name in [*searched, metric]:
        col = df[name]
        if pd.api.types.is_numeric_dtype(col):
            dims.append({"label": name, "values": col.astype(float).tolist()})
        else:
            cats = sorted(col.astype(str).unique())
            codes = col.astype(str).map({c: i for i, c in enumerate(cats)})
            dims.append({"label": name, "values": codes.tolist(),
                         "tickvals": list(range(len(cats))), "ticktext": cats})
    fig = go.Figure(go.Parcoords(
        line={"color": df[metric].astype(float).tolist(), "colorscale": "Viridis", "showscale": True,
              "colorbar": {"title": metric}},
        dimensions=dims,
    ))
    fig.update_layout(title=f"All trials: hyperparameters and final {metric}")
    return fig


def curves_figure(curves: Any, trials: Any, searched: Sequence[str], metric: str) -> Any | None:
    """The metric against the step, one line per (non-errored) trial."""
    import plotly.graph_objects as go

    if curves.empty or metric not in curves.columns:
        return None
    ok_ids = set(trials.loc[trials["status"] != "ERROR", "trial_id"])
    fig = go.Figure()
    for trial_id, group in curves[curves["trial_id"].isin(ok_ids)].groupby("trial_id", sort=True):
        label = ", ".join(f"{n}={_fmt(group[n].iloc[0])}" for n in searched) or str(trial_id)
        fig.add_trace(go.Scatter(x=group["step"], y=group[metric], mode="lines+markers",
                                 name=label, hovertemplate=f"{trial_id}<br>step=%{{x}}<br>{metric}=%{{y:.4g}}"))
    fig.update_layout(title=f"{metric} against the step, one line per trial",
                      xaxis_title="step", yaxis_title=metric)
    return fig


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
