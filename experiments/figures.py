"""Plotly figures of a comparison: Toy trajectories, objective spaces, convergence curves.

Each function returns a ``plotly.graph_objects.Figure``; :func:`write_figures` writes them as
HTML sharing one ``plotly.min.js`` written next to them (the folder works offline) with an
``index.html`` linking them and showing the summary table.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtl_opt.experiments.html_pages import write_figure
from mtl_opt.problems import Toy

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from mtl_opt.experiments.study import Comparison

__all__ = ["convergence_figure", "objective_figure", "toy_trajectory_figure", "write_figures"]

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]
_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


def vertical_spacing(rows: int, *, height: float, gap_px: float = 80.0) -> float:
    """The ``vertical_spacing`` of a ``rows``-row subplot grid on a figure ``height`` pixels tall:
    about ``gap_px`` between rows (room for the next panel's title), never more than plotly
    allows (``1 / (rows − 1)``), however many methods or levels there are."""
    if rows <= 1:
        return 0.0
    return min(gap_px / height, 0.9 / (rows - 1))


def toy_trajectory_figure(comparison: "Comparison", problem_name: str) -> "go.Figure":
    """One panel per method: the summed loss's contours, the Pareto set (as in Nash-MTL's
    Figure 1), and every start's trajectory from its start (circle) to its end (star)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    prob = comparison.problems[problem_name]
    runs = [r for r in comparison.runs if r.problem == problem_name]
    n = len(runs)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[r.method for r in runs],
                        horizontal_spacing=0.06,
                        vertical_spacing=vertical_spacing(rows, height=440 * rows + 60))
    grid = torch.linspace(-10, 10, 81, dtype=torch.float64)
    X1, X2 = torch.meshgrid(grid, grid, indexing="xy")
    Z = prob.losses(torch.stack([X1, X2], -1)).sum(-1)
    ps = prob.pareto_set(200)
    seen_starts: set[int] = set()
    for k, r in enumerate(runs):
        row, col = k // cols + 1, k % cols + 1
        fig.add_trace(go.Contour(x=grid.tolist(), y=grid.tolist(), z=Z.tolist(), colorscale="Greys",
                                 showscale=False, ncontours=25, opacity=0.6,
                                 contours={"coloring": "lines"}, hoverinfo="skip"), row=row, col=col)
        fig.add_trace(go.Scatter(x=ps[:, 0].tolist(), y=ps[:, 1].tolist(), mode="lines",
                                 line={"color": "black", "width": 4}, name="Pareto set",
                                 showlegend=k == 0, legendgroup="ps"), row=row, col=col)
        xs = r.history["x"]  # (T, runs, 2)
        for j in range(r.n_runs):
            start = int(r.start_index[j])
            color = _COLORS[start % len(_COLORS)]
            traj = xs[:, j]
            first = k == 0 and start not in seen_starts
            seen_starts.add(start)
            fig.add_trace(go.Scatter(x=traj[:, 0].tolist(), y=traj[:, 1].tolist(), mode="lines",
                                     line={"color": color, "width": 2}, legendgroup=f"start {start}",
                                     name=f"start {start}", showlegend=first,
                                     hovertext=f"start {start}, seed {int(r.seed[j])}", hoverinfo="text"),
                          row=row, col=col)
            fig.add_trace(go.Scatter(x=[traj[0, 0].item()], y=[traj[0, 1].item()], mode="markers",
                                     marker={"color": color, "size": 9, "symbol": "circle"},
                                     legendgroup=f"start {start}", showlegend=False, hoverinfo="skip"),
                          row=row, col=col)
            fig.add_trace(go.Scatter(x=[traj[-1, 0].item()], y=[traj[-1, 1].item()], mode="markers",
                                     marker={"color": color, "size": 13, "symbol": "star",
                                             "line": {"color": "white", "width": 1}},
                                     legendgroup=f"start {start}", showlegend=False), row=row, col=col)
        fig.update_xaxes(range=[-10, 10], title_text="x₁ (unitless)", row=row, col=col)
        fig.update_yaxes(range=[-10, 10], title_text="x₂ (unitless)", scaleanchor=f"x{k + 1 if k else ''}",
                         row=row, col=col)
    # the marker encoding, once, in the legend
    for symbol, label in (("circle", "start point (●)"), ("star", "end point (★)")):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=label,
                                 marker={"color": "#444", "size": 10, "symbol": symbol}), row=1, col=1)
    fig.update_layout(title=f"{problem_name}: trajectories over the summed loss (grey contours), "
                            "Pareto set in black, one colour per start",
                      height=440 * rows + 60, template="plotly_white", legend={"title": {"text": "legend"}})
    return fig


def objective_figure(comparison: "Comparison", problem_name: str) -> "go.Figure":
    """The true front and every method's end points in objective space (2-D for two tasks,
    3-D for three; with more tasks, the first three losses)."""
    import plotly.graph_objects as go

    from mtl_opt.experiments.study import indicator_front

    prob = comparison.problems[problem_name]
    runs = [r for r in comparison.runs if r.problem == problem_name]
    front = indicator_front(prob)
    K = prob.n_tasks
    fig = go.Figure()
    if K == 2:
        if front is not None:
            order = torch.argsort(front[:, 0])
            mode = "markers" if problem_name.startswith("zdt3") else "lines"
            fig.add_trace(go.Scatter(x=front[order, 0].tolist(), y=front[order, 1].tolist(), mode=mode,
                                     marker={"size": 3, "color": "black"}, line={"color": "black"},
                                     name="true front"))
        for k, r in enumerate(runs):
            fig.add_trace(go.Scatter(x=r.losses[:, 0].tolist(), y=r.losses[:, 1].tolist(), mode="markers",
                                     marker=_ring(k, len(runs)), name=r.method,
                                     text=[f"{r.method}: start {s}, seed {d}" for s, d in zip(r.start_index.tolist(), r.seed.tolist())]))
        fig.update_layout(xaxis_title="loss 1 (unitless)", yaxis_title="loss 2 (unitless)")
        fig.update_xaxes(exponentformat="power")
        fig.update_yaxes(exponentformat="power")
    else:
        if front is not None:
            fig.add_trace(go.Scatter3d(x=front[:, 0].tolist(), y=front[:, 1].tolist(), z=front[:, 2].tolist(),
                                       mode="markers", marker={"size": 2, "color": "black", "opacity": 0.3},
                                       name="true front"))
        for k, r in enumerate(runs):
            ring = _ring(k, len(runs))
            fig.add_trace(go.Scatter3d(x=r.losses[:, 0].tolist(), y=r.losses[:, 1].tolist(), z=r.losses[:, 2].tolist(),
                                       mode="markers", name=r.method,
                                       marker={"size": ring["size"] * 0.6, "color": ring["line"]["color"],
                                               "symbol": "circle-open"}))
        axis = {"exponentformat": "power"}
        fig.update_layout(scene={"xaxis": {"title": {"text": "loss 1 (unitless)"}, **axis},
                                 "yaxis": {"title": {"text": "loss 2 (unitless)"}, **axis},
                                 "zaxis": {"title": {"text": "loss 3 (unitless)"}, **axis},
                                 "aspectmode": "cube", "camera": {"eye": {"x": 1.6, "y": 1.6, "z": 1.1}}},
                          margin={"l": 0, "r": 0, "b": 0, "t": 60})
    extra = f" (first 3 of {K} losses)" if K > 3 else ""
    fig.update_layout(title=f"{problem_name}: end points and the true front{extra}; methods that end "
                            "at the same point show as concentric rings", template="plotly_white",
                      height=700 if K > 2 else 600)
    return fig


def _ring(k: int, n: int) -> dict[str, Any]:
    """An open marker for the k-th of n methods: earlier methods get larger rings, so methods that
    end at the same point stay visible as concentric rings of their colours."""
    color = _COLORS[k % len(_COLORS)]
    return {"size": 8 + 4 * (n - 1 - k), "color": "rgba(0,0,0,0)", "symbol": "circle",
            "line": {"color": color, "width": 2.5}}


def convergence_figure(comparison: "Comparison") -> "go.Figure":
    """Per problem: the mean over runs of the distance to the front (or, where the front is
    unknown, of Pareto stationarity) against the step, per method (log scale)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(comparison.problems)
    fig = make_subplots(rows=len(names), cols=2, subplot_titles=[
        t for n in names for t in (f"{n}: distance to the front", f"{n}: Pareto stationarity")])
    for i, name in enumerate(names):
        runs = [r for r in comparison.runs if r.problem == name]
        for k, r in enumerate(runs):
            steps = r.history["step"]
            color = _COLORS[k % len(_COLORS)]
            for col, key in ((1, "front_distance"), (2, "stationarity")):
                h = r.history.get(key)
                if h is None:
                    continue
                y = h.mean(dim=1).clamp(min=1e-16).tolist()
                fig.add_trace(go.Scatter(x=steps, y=y, mode="lines", name=r.method,
                                         line={"color": color, "dash": _DASHES[k % len(_DASHES)], "width": 2},
                                         legendgroup=r.method, showlegend=(i == 0 and col == 1)),
                              row=i + 1, col=col)
            fig.update_yaxes(type="log", exponentformat="power", title_text="distance to front (unitless)",
                             row=i + 1, col=1)
            fig.update_yaxes(type="log", exponentformat="power", title_text="‖min-norm of hull‖ (unitless)",
                             row=i + 1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title="Convergence (means over starts and seeds; log scale)", height=320 * len(names) + 80,
                      template="plotly_white")
    return fig


def write_figures(comparison: "Comparison", out: Path) -> list[tuple[str, str]]:
    """Write every figure and ``index.html`` under ``out``; returns ``(title, file)`` pairs."""
    out = Path(out)
    written: list[tuple[str, str]] = []

    def save(fig: Any, fname: str, title: str) -> None:
        write_figure(fig, out / fname)
        written.append((title, fname))

    for name, prob in comparison.problems.items():
        if isinstance(prob, Toy):
            save(toy_trajectory_figure(comparison, name), f"trajectories_{_slug(name)}.html",
                 f"{name}: trajectories over the loss landscape")
    for name in comparison.problems:
        save(objective_figure(comparison, name), f"objectives_{_slug(name)}.html",
             f"{name}: objective space, true front and end points")
    save(convergence_figure(comparison), "convergence.html", "Convergence curves")
    links = "\n".join(f'<li><a href="{html.escape(f)}">{html.escape(t)}</a></li>' for t, f in written)
    table = comparison.summary.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
    overall = comparison.overall.to_html(index=False, float_format=lambda v: f"{v:.3g}", border=0)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>mtl-opt compare</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}</style></head><body>"
        "<h1>mtl-opt compare</h1><h2>Figures</h2><ul>" + links + "</ul>"
        "<h2>Mean rank per method</h2>" + overall + "<h2>Summary</h2>" + table +
        "<p>Tables: <a href='summary.csv'>summary.csv</a>, <a href='summary.md'>summary.md</a>, "
        "<a href='final.csv'>final.csv</a>; configuration: <a href='config.json'>config.json</a>.</p>"
        "</body></html>"
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    return written


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
