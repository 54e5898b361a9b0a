"""Compare tables a reader can trust: tolerant ranks, directions, mean ± CI over seeds."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("pymoo")

from mtl_opt.cli import main
from mtl_opt.experiments.study import DIRECTIONS, run_comparison, summary_display, tolerant_rank


def test_tolerant_rank_ties_within_the_tolerance_and_keeps_the_direction():
    assert tolerant_rank([0.5, 0.5 + 1e-7, 0.4], higher_is_better=True) == [1.5, 1.5, 3.0]
    assert tolerant_rank([0.0, 3.8e-6, 0.08], higher_is_better=False) == [1.5, 1.5, 3.0]
    assert tolerant_rank([1.0, 2.0, 3.0], higher_is_better=False) == [1.0, 2.0, 3.0]
    # a group is measured from its best value: no chaining of many small steps
    assert tolerant_rank([0.0, 8e-6, 16e-6], higher_is_better=False, rtol=0.0) == [1.5, 1.5, 3.0]
    out = tolerant_rank([math.nan, 1.0], higher_is_better=True)
    assert math.isnan(out[0]) and out[1] == 1.0


def test_methods_with_the_same_indicators_share_a_rank(tmp_path):
    """On DTLZ2, LS and Nash-MTL reach the front (distances 0 and ~4e-6, same hypervolume and
    IGD); ranking them apart would reward rounding."""
    import pandas as pd

    assert main(["compare", "--problems", "dtlz2", "--methods", "ls", "nash_mtl", "mgda", "--steps",
                 "400", "--quiet", "--out", str(tmp_path / "c")]) == 0
    s = pd.read_csv(tmp_path / "c" / "summary.csv").set_index("method")
    assert abs(s.loc["ls", "front_distance_mean"] - s.loc["nash_mtl", "front_distance_mean"]) > 0
    assert s.loc["ls", "rank"] == s.loc["nash_mtl", "rank"] < s.loc["mgda", "rank"]


def test_seeds_give_mean_and_interval_and_the_printed_table_states_directions(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compare", "--problems", "zdt1", "--methods", "ls", "mgda", "--steps", "30",
                 "--seeds", "3x", "--start-jitter", "0.05", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hypervolume ↑ (± 95% CI)" in printed and "igd ↓" in printed and "rank ↓" in printed
    assert "↑ higher is better, ↓ lower is better" in printed
    assert " ± " in printed
    import pandas as pd

    summary = pd.read_csv(out / "summary.csv")
    for col in ("hypervolume", "igd", "front_distance_mean"):
        assert summary[f"{col}_ci"].gt(0).all(), col
    md = (out / "summary.md").read_text()
    assert "hypervolume ↑ (± 95% CI)" in md and "mean_rank ↓" in md


def test_one_seed_has_no_interval_columns():
    comp = run_comparison(["zdt1"], ["ls"], steps=10)
    assert not [c for c in comp.summary.columns if c.endswith("_ci")]
    shown = summary_display(comp.summary, ["hypervolume", "conflict_share"])
    assert list(shown.columns) == ["hypervolume ↑", "conflict_share"]
    assert DIRECTIONS["igd"] == "↓"
