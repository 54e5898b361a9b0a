"""Figures that read on their own: axis titles, legends for every encoding, visible coinciding
markers, plain tick formats, finished sweep trials only in heat maps, distinct bench colours."""

from __future__ import annotations

import math

import pandas as pd
import pytest

pytest.importorskip("plotly")

from mtl_opt.experiments.bench import COLUMNS, _power_of_ten, bench_figures
from mtl_opt.experiments.figures import convergence_figure, objective_figure, toy_trajectory_figure
from mtl_opt.experiments.study import run_comparison
from mtl_opt.experiments.sweep_figures import (
    curves_figure,
    faceted_heatmap_figure,
    heatmap_figure,
    parallel_figure,
)


@pytest.fixture(scope="module")
def comparison():
    return run_comparison(["toy", "zdt1", "dtlz2"], ["ls", "cagrad", "mgda"], steps=20)


def test_trajectories_have_axis_titles_and_a_legend_for_starts_and_markers(comparison):
    fig = toy_trajectory_figure(comparison, "toy")
    layout = fig.to_dict()["layout"]
    axes = [k for k in layout if k.startswith(("xaxis", "yaxis"))]
    assert axes and all("(unitless)" in layout[k]["title"]["text"] for k in axes)
    names = {t.name for t in fig.data if t.showlegend is not False and t.name}
    assert {f"start {i}" for i in range(5)} <= names
    assert {"start point (●)", "end point (★)", "Pareto set"} <= names


@pytest.mark.parametrize("problem", ["zdt1", "dtlz2"])
def test_end_points_stay_visible_when_methods_coincide(comparison, problem):
    fig = objective_figure(comparison, problem)
    methods = [t for t in fig.data if t.name in ("ls", "cagrad", "mgda")]
    sizes = [t.marker.size for t in methods]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)  # concentric rings
    colours = [t.marker.line.color if problem == "zdt1" else t.marker.color for t in methods]
    assert len(set(colours)) == len(colours)
    if problem == "zdt1":
        assert all(t.marker.color == "rgba(0,0,0,0)" for t in methods)  # open: the ring below shows
    else:
        assert all(t.marker.symbol == "circle-open" for t in methods)
        assert "(unitless)" in fig.layout.scene.zaxis.title.text


def test_convergence_panels_have_y_titles_and_no_si_prefixes(comparison):
    fig = convergence_figure(comparison)
    layout = fig.to_dict()["layout"]
    ys = [layout[k] for k in layout if k.startswith("yaxis")]
    assert len(ys) == 6
    assert all(y["title"]["text"] and y["exponentformat"] == "power" for y in ys)
    assert "width" not in layout
    dashes = {t.line.dash for t in fig.data}
    assert len(dashes) == 3  # coinciding curves stay distinguishable


def _trials_with_stopped():
    rows = []
    for i, (kappa, nu, rho, status, value) in enumerate([
        (1.0, 0.0, 0.2, "COMPLETED", 1.0), (2.0, 0.0, 0.2, "COMPLETED", 2.0),
        (1.0, 0.5, 0.2, "STOPPED", 100.0), (2.0, 0.5, 0.2, "COMPLETED", 3.0),
        (1.0, 0.0, 0.5, "STOPPED", 50.0), (2.0, 0.5, 0.5, "STOPPED", 60.0),
    ]):
        rows.append({"trial_id": f"t{i}", "status": status, "kappa": kappa, "nu": nu, "rho": rho,
                     "front_distance": value})
    return pd.DataFrame(rows)


def test_heat_maps_leave_out_trials_stopped_early_and_show_every_facet():
    trials = _trials_with_stopped()
    fig = heatmap_figure(trials, ["kappa", "nu", "rho"], "front_distance", "min")
    z = [v for row in fig.data[0].z for v in row if v is not None and not math.isnan(v)]
    assert 100.0 not in z and sorted(z) == [1.0, 2.0, 3.0]
    assert "3 trial(s) stopped early" in fig.layout.title.text
    facets = faceted_heatmap_figure(trials, ["kappa", "nu", "rho"], "front_distance")
    titles = [a.text for a in facets.layout.annotations]
    assert titles == ["rho = 0.2", "rho = 0.5 (no finished trial)"]
    assert "3 trial(s) stopped early" in facets.layout.title.text
    par = parallel_figure(trials, ["kappa", "nu", "rho"], "front_distance")
    assert par.data[0].dimensions[0].label == "finished"
    curves = pd.DataFrame({"trial_id": ["t0", "t0", "t2", "t2"], "step": [0, 10, 0, 10],
                           "front_distance": [2.0, 1.0, 3.0, 100.0], "kappa": 1.0, "nu": 0.0, "rho": 0.2})
    cf = curves_figure(curves, trials, ["kappa", "nu", "rho"], "front_distance")
    assert [t.line.dash for t in cf.data] == ["solid", "dash"]


def test_bench_series_have_distinct_colours_and_plain_panel_titles():
    rows = []
    methods = ["ls", "pcgrad", "mgda", "cagrad", "nash_mtl", "came_grad", "aggregate_many", "floor"]
    for d in (1e3, 1e4):
        for K in (2, 4):
            for m in methods:
                for impl in (["floor"] if m == "floor" else ["mtl_opt", "torchjd"]):
                    row = {c: math.nan for c in COLUMNS}
                    row.update(device="cpu", K=K, d=d, method=m, impl=impl, median_ms=1.0 + K,
                               min_ms=1.0, max_ms=2.0, ratio_to_floor=1.5)
                    rows.append(row)
    fig, fig2 = bench_figures(pd.DataFrame(rows, columns=list(COLUMNS)))
    colours = {}
    for t in fig.data:
        if t.name:
            colours.setdefault(t.line.color, set()).add(t.name.split(",")[0])
    assert all(len(names) == 1 for names in colours.values()), colours
    assert len(colours) >= 14
    titles = [a.text for a in fig.layout.annotations if a.text]
    assert "d=10³" in titles and not any("d=d=" in t for t in titles)
    assert _power_of_ten(1e6) == "10⁶" and _power_of_ten(2e4) == "2·10⁴"
    assert list(fig.layout.xaxis.tickvals) == [2, 4]  # no "2.5 tasks"


def test_trajectories_of_every_default_method_fit_one_figure():
    # Nine rows of panels (25 methods): a fixed spacing between rows exceeded plotly's limit of
    # 1 / (rows - 1) and the whole study stopped with "Vertical spacing cannot be greater than".
    from mtl_opt.experiments.compare_cli import default_methods
    from mtl_opt.experiments.figures import vertical_spacing

    methods = default_methods()[0]
    assert len(methods) > 19
    fig = toy_trajectory_figure(run_comparison(["toy"], methods, steps=2), "toy")
    panels = [a for a in fig.layout if a.startswith("yaxis")]
    assert len(panels) >= len(methods)
    for rows in range(2, 40):
        assert 0 < vertical_spacing(rows, height=440 * rows + 60) <= 1 / (rows - 1)
