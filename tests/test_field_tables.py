"""Δm%, mean rank and mean ± 95 % CI over seeds on hand-computed cases."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtl_opt.experiments.field_tables import delta_m, field_display, field_summary, mean_ranks
from mtl_opt.problems.workload import TaskMetric

ACC = (TaskMetric("acc_a", "a", True), TaskMetric("acc_b", "b", True))


def test_delta_m_of_two_accuracies():
    base = {"acc_a": 0.8, "acc_b": 0.5}
    # +10 % on a, -10 % on b: the gains cancel
    assert delta_m({"acc_a": 0.88, "acc_b": 0.45}, base, ACC) == pytest.approx(0.0, abs=1e-12)
    # (-(0.9-0.8)/0.8 - (0.6-0.5)/0.5) / 2 * 100 = (-12.5 - 20) / 2
    assert delta_m({"acc_a": 0.9, "acc_b": 0.6}, base, ACC) == pytest.approx(-16.25)
    assert delta_m(base, base, ACC) == 0.0


def test_delta_m_signs_each_metric_by_its_direction():
    metrics = (TaskMetric("err", "a", False), TaskMetric("acc", "b", True))
    # err 2.0 -> 2.5: +25 (worse); acc 0.5 -> 0.6: -20 (better); mean +2.5
    assert delta_m({"err": 2.5, "acc": 0.6}, {"err": 2.0, "acc": 0.5}, metrics) == pytest.approx(2.5)


@pytest.mark.parametrize("method, base, message", [
    ({"acc_a": 1.0}, {"acc_a": 1.0, "acc_b": 1.0}, "the method has no value for metric 'acc_b'"),
    ({"acc_a": 1.0, "acc_b": 1.0}, {"acc_a": 0.0, "acc_b": 1.0}, "baseline's 'acc_a' is 0"),
    ({"acc_a": float("nan"), "acc_b": 1.0}, {"acc_a": 1.0, "acc_b": 1.0}, "the method's 'acc_a' is nan"),
])
def test_delta_m_refuses_what_it_cannot_compute(method, base, message):
    with pytest.raises(ValueError, match=message):
        delta_m(method, base, ACC)


def test_mean_rank_averages_ranks_over_metrics_and_shares_ties():
    metrics = (TaskMetric("acc", "a", True), TaskMetric("loss", "b", False))
    means = {"x": {"acc": 0.9, "loss": 3.0}, "y": {"acc": 0.8, "loss": 1.0}, "z": {"acc": 0.8, "loss": 2.0}}
    # acc: x 1, y and z tie for 2-3 -> 2.5 each; loss: y 1, z 2, x 3
    assert mean_ranks(means, metrics) == {"x": 2.0, "y": 1.75, "z": 2.25}


def test_the_summary_holds_delta_m_per_seed_with_a_t_interval_and_ranks():
    pd = pytest.importorskip("pandas")
    baselines = pd.DataFrame([{"seed": 0, "acc_a": 0.8, "acc_b": 0.5},
                              {"seed": 1, "acc_a": 0.5, "acc_b": 0.5}])
    runs = pd.DataFrame([
        # seed 0: (-(0.88-0.8)/0.8 - (0.55-0.5)/0.5)/2*100 = (-10 - 10)/2 = -10
        {"method": "m1", "seed": 0, "acc_a": 0.88, "acc_b": 0.55, "cos_mean": 0.1, "conflict_share": 0.2},
        # seed 1: (-(0.6-0.5)/0.5 - (0.6-0.5)/0.5)/2*100 = -20
        {"method": "m1", "seed": 1, "acc_a": 0.6, "acc_b": 0.6, "cos_mean": 0.3, "conflict_share": 0.4},
        {"method": "m2", "seed": 0, "acc_a": 0.8, "acc_b": 0.5, "cos_mean": 0.0, "conflict_share": 0.5},
        {"method": "m2", "seed": 1, "acc_a": 0.5, "acc_b": 0.5, "cos_mean": 0.0, "conflict_share": 0.5},
    ])
    s = field_summary(runs, baselines, ACC).set_index("method")
    assert list(s.index) == ["single_task", "m1", "m2"]
    assert s.loc["m1", "delta_m"] == pytest.approx(-15.0)
    # t_{0.975, 1} = 12.7062; s = 7.0711 (values -10, -20); half-width = t s / sqrt(2)
    assert s.loc["m1", "delta_m_ci"] == pytest.approx(12.7062047 * 7.0710678 / 2 ** 0.5, rel=1e-6)
    assert s.loc["m2", "delta_m"] == 0.0 and s.loc["m2", "delta_m_ci"] == 0.0
    assert s.loc["m1", "conflict_share"] == pytest.approx(0.3)
    assert s.loc["m1", "mean_rank"] == 1.0 and s.loc["m2", "mean_rank"] == 2.0
    assert s.loc["single_task", "acc_a"] == pytest.approx(0.65)
    shown = field_display(s.reset_index(), ACC)
    assert list(shown.columns)[:5] == ["method", "n_seeds", "acc_a ↑", "acc_b ↑", "Δm% ↓"]
    assert shown["Δm% ↓"][1] == "-15 ± 64"


def test_a_run_without_a_baseline_for_its_seed_is_refused():
    pd = pytest.importorskip("pandas")
    baselines = pd.DataFrame([{"seed": 0, "acc_a": 0.8, "acc_b": 0.5}])
    runs = pd.DataFrame([{"method": "m", "seed": 3, "acc_a": 0.8, "acc_b": 0.5, "cos_mean": 0.0,
                          "conflict_share": 0.0}])
    with pytest.raises(ValueError, match=r"no single-task baseline for seeds \[3\]"):
        field_summary(runs, baselines, ACC)


def test_the_tables_module_imports_neither_plotly_nor_ray():
    code = ("import sys, mtl_opt.experiments.field_tables, mtl_opt.experiments.trainer; "
            "print([m for m in ('plotly', 'ray') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
