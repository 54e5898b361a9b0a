"""Plotly figures of a sweep: heat maps over two hyperparameters, parallel coordinates, curves.

* :func:`heatmap_figure` — the metric over an ``x × y`` grid (CAME-Grad: κ × ν), averaged over the
  trials that fall in each cell, at the facet value of the best trial (ρ of the best trial);
* :func:`faceted_heatmap_figure` — the same, one panel per facet value (per ρ);
* :func:`parallel_figure` — every trial as one line across its hyperparameters and the metric;
* :func:`curves_figure` — the metric against the step, one line per trial.

Continuous hyperparameters (more than :data:`MAX_LEVELS` distinct values, e.g. ``uniform``
draws) are binned into :data:`N_BINS` equal-width bins labelled by their ranges. Errored trials
are left out of every figure (they are listed in ``trials.csv``). Heat maps average finished
trials only: a trial that ASHA stopped early reports its metric at an earlier step, which is not
comparable; the title counts those left out, the faceted map keeps a panel for every facet level
(empty where no trial finished), the parallel plot has a ``finished`` axis and the curves draw
stopped trials dashed.
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


def _finished(df: Any) -> tuple[Any, int]:
    """The trials that ran to the end (not stopped early), and how many were left out."""
    done = df[df["status"] != "STOPPED"]
    return done, len(df) - len(done)


def _left_out(n_stopped: int) -> str:
    return f" ({n_stopped} trial(s) stopped early by the scheduler left out)" if n_stopped else ""


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
    df, n_stopped = _finished(df)
    if df.empty:
        return None
    title = f"{metric} (mean over finished trials per cell) over {x} × {y}"
    if facet is not None:
        df[facet] = _levels(df[facet])
        best = df.loc[df[metric].idxmin() if mode == "min" else df[metric].idxmax()]
        df = df[df[facet] == best[facet]]
        title += f", at the best trial's {facet} = {best[facet]} (every {facet}: heatmap_facets.html)"
    table = _pivot(df, x, y, metric)
    fig = go.Figure(_heatmap_trace(table, metric, True, float(df[metric].min()), float(df[metric].max())))
    fig.update_layout(title=title + _left_out(n_stopped), xaxis_title=x, yaxis_title=y)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def faceted_heatmap_figure(trials: Any, searched: Sequence[str], metric: str) -> Any | None:
    """One heat map panel per level of the third searched axis (``None`` without a third axis)."""
    from plotly.subplots import make_subplots

    from mtl_opt.experiments.figures import vertical_spacing

    axes = heatmap_axes(searched)
    df = _ok(trials, metric)
    if axes is None or axes[2] is None or df.empty:
        return None
    x, y, facet = axes
    df[x], df[y], df[facet] = _levels(df[x]), _levels(df[y]), _levels(df[facet])
    levels = sorted(df[facet].unique(), key=lambda v: (str(type(v)), v))  # every level, finished or not
    done, n_stopped = _finished(df)
    cols = min(len(levels), 4)
    rows = -(-len(levels) // cols)
    titles = [f"{facet} = {v}" + ("" if (done[facet] == v).any() else " (no finished trial)") for v in levels]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_yaxes=True,
                        horizontal_spacing=0.06,
                        vertical_spacing=vertical_spacing(rows, height=380 * rows + 120))
    zmin = float(done[metric].min()) if not done.empty else 0.0
    zmax = float(done[metric].max()) if not done.empty else 1.0
    for i, level in enumerate(levels):
        r, c = i // cols + 1, i % cols + 1
        part = done[done[facet] == level]
        if not part.empty:
            table = _pivot(part, x, y, metric)
            fig.add_trace(_heatmap_trace(table, metric, i == 0, zmin, zmax), row=r, col=c)
        fig.update_xaxes(title_text=x, type="category", row=r, col=c)
        fig.update_yaxes(type="category", row=r, col=c)
        if c == 1:
            fig.update_yaxes(title_text=y, row=r, col=c)
    fig.update_layout(title=f"{metric} (mean over finished trials) over {x} × {y}, one panel per {facet}"
                      + _left_out(n_stopped), height=380 * rows + 120)
    return fig


def parallel_figure(trials: Any, searched: Sequence[str], metric: str) -> Any | None:
    """Parallel coordinates: each trial's hyperparameters and final metric."""
    import pandas as pd
    import plotly.graph_objects as go

    df = _ok(trials, metric)
    if df.empty:
        return None
    dims = []
    if (df["status"] == "STOPPED").any():
        finished = (df["status"] != "STOPPED").astype(int)
        dims.append({"label": "finished", "values": finished.tolist(), "tickvals": [0, 1],
                     "ticktext": ["stopped early", "yes"]})
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
        stopped = bool((trials.loc[trials["trial_id"] == trial_id, "status"] == "STOPPED").any())
        fig.add_trace(go.Scatter(x=group["step"], y=group[metric], mode="lines+markers",
                                 name=label + (" (stopped early)" if stopped else ""),
                                 line={"dash": "dash" if stopped else "solid"},
                                 hovertemplate=f"{trial_id}<br>step=%{{x}}<br>{metric}=%{{y:.4g}}"))
    fig.update_layout(title=f"{metric} against the step, one line per trial (dashed: stopped early)",
                      xaxis_title="step", yaxis_title=f"{metric} (unitless)")
    fig.update_yaxes(exponentformat="power")
    return fig


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
