"""Sweep figures from a hand-made trials table: cells hold the mean of their trials."""

import numpy as np
import pandas as pd

from mtl_opt.experiments.sweep_figures import (
    curves_figure,
    faceted_heatmap_figure,
    heatmap_axes,
    heatmap_figure,
    parallel_figure,
)


def _trials():
    rows, i = [], 0
    for rho in (0.2, 0.5):
        for kappa in (1.0, 2.0):
            for nu in (0.0, 0.5):
                value = kappa + 10 * nu + (0.0 if rho == 0.5 else 100.0)
                rows.append({"trial_id": f"t{i}", "status": "COMPLETED", "kappa": kappa, "nu": nu,
                             "rho": rho, "front_distance": value})
                i += 1
    rows.append({"trial_id": "bad", "status": "ERROR", "kappa": 1.0, "nu": 0.0, "rho": 0.5,
                 "front_distance": -1e9})  # errored trials are never drawn
    return pd.DataFrame(rows)


def test_axes_prefer_kappa_nu_rho():
    assert heatmap_axes(["rho", "nu", "kappa", "lr"]) == ("kappa", "nu", "rho")
    assert heatmap_axes(["lr", "c"]) == ("lr", "c", None)
    assert heatmap_axes(["lr"]) is None


def test_heatmap_at_the_best_rho_holds_the_cell_values():
    fig = heatmap_figure(_trials(), ["kappa", "nu", "rho"], "front_distance", "min")
    z = np.array(fig.data[0].z, dtype=float)
    # best trial: rho = 0.5 (no +100); rows are nu, columns kappa
    assert np.allclose(z, [[1.0, 2.0], [6.0, 7.0]])
    assert "rho = 0.5" in fig.layout.title.text


def test_faceted_heatmap_has_one_panel_per_rho():
    fig = faceted_heatmap_figure(_trials(), ["kappa", "nu", "rho"], "front_distance")
    assert len(fig.data) == 2
    assert np.allclose(np.array(fig.data[0].z, dtype=float), [[101.0, 102.0], [106.0, 107.0]])
    assert faceted_heatmap_figure(_trials(), ["kappa", "nu"], "front_distance") is None


def test_continuous_axes_are_binned():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"trial_id": [f"t{i}" for i in range(40)], "status": "COMPLETED",
                       "kappa": rng.uniform(1, 3, 40), "nu": rng.uniform(0, 1, 40)})
    df["front_distance"] = df["kappa"] + df["nu"]
    fig = heatmap_figure(df, ["kappa", "nu"], "front_distance", "min")
    z = np.array(fig.data[0].z, dtype=float)
    assert z.shape[0] <= 5 and z.shape[1] <= 5
    assert np.nanmin(z) >= df["front_distance"].min() and np.nanmax(z) <= df["front_distance"].max()


def test_parallel_and_curves_skip_errored_trials():
    trials = _trials()
    par = parallel_figure(trials, ["kappa", "nu", "rho"], "front_distance")
    assert len(par.data[0].dimensions[0].values) == 8
    curves = pd.DataFrame({"trial_id": ["t0", "t0", "bad", "bad"], "step": [0, 10, 0, 10],
                           "kappa": 1.0, "nu": 0.0, "rho": 0.2, "front_distance": [3, 2, 9, 9]})
    fig = curves_figure(curves, trials, ["kappa", "nu", "rho"], "front_distance")
    assert len(fig.data) == 1 and list(fig.data[0].y) == [3, 2]
