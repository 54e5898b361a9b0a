"""``mtl-opt ablate`` end to end at tiny size, and the ablation's statistics against its runs."""

import json

import pandas as pd
import pytest

from mtl_opt.cli import main
from mtl_opt.experiments.ablate_study import INTERACTION, VARIANTS
from mtl_opt.experiments.paired_stats import paired_difference


def test_cli_writes_tables_figure_and_config(tmp_path, capsys):
    out = tmp_path / "abl"
    code = main(["ablate", "--problem", "quadratic_noisy", "--steps", "30", "--seeds", "3x",
                 "--optimizer", "sgd", "--lr", "0.01", "--out", str(out)])
    assert code == 0
    for name in ["ablation.csv", "interaction.csv", "ablation.md", "ablation.html", "runs.csv", "config.json"]:
        assert (out / name).is_file(), name
    summary = pd.read_csv(out / "ablation.csv")
    runs = pd.read_csv(out / "runs.csv")
    assert list(summary["variant"]) == list(VARIANTS)  # the interaction has its own table
    inter_table = pd.read_csv(out / "interaction.csv")
    assert list(inter_table["effect"]) == [INTERACTION]
    assert "n_seeds" in inter_table.columns and "mean" not in inter_table.columns
    md = (out / "ablation.md").read_text()
    assert md.index("| variant |") < md.index("Interaction I =") < md.index("| effect |")
    assert len(runs) == len(VARIANTS) * 3
    assert "energy injection alone" in (out / "ablation.md").read_text()
    assert json.loads((out / "config.json").read_text())["optimizer"] == "sgd"
    assert "outputs in" in capsys.readouterr().out

    # Every row is recomputed from the per-seed runs.
    metric = json.loads((out / "config.json").read_text())["metric"]
    values = runs.pivot(index="seed", columns="variant", values=metric)
    assert values.nunique().max() > 1  # the noisy problem's seeds differ
    for _, row in summary[summary["variant"] != INTERACTION].iterrows():
        ref = paired_difference(values[row["variant"]], values["linear"])
        assert row["mean"] == pytest.approx(values[row["variant"]].mean())
        assert row["std"] == pytest.approx(values[row["variant"]].std(ddof=1))
        assert row["diff_vs_linear"] == pytest.approx(ref.mean)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((ref.ci_low, ref.ci_high))
    inter = inter_table.iloc[0]
    by_seed = (values["+rectify+inject"] - values["+rectify"] - values["inject only"] + values["linear"])
    assert inter["estimate"] == pytest.approx(by_seed.mean())
    assert inter["std"] == pytest.approx(by_seed.std(ddof=1))


def test_baseline_is_linear_scalarization_and_full_is_came_grad():
    """The variants are the documented flag settings of the registered method."""
    import torch

    import mtl_opt

    G = torch.tensor([[1.0, 0.0, 2.0], [-0.5, 1.0, 0.0]], dtype=torch.float64)
    linear = mtl_opt.get_aggregator("came_grad", **VARIANTS["linear"][0])
    assert torch.allclose(linear(G), G.sum(0))
    full = mtl_opt.get_aggregator("came_grad", **VARIANTS["full"][0])
    assert torch.allclose(full(G), mtl_opt.get_aggregator("came_grad")(G))
    inject_only = mtl_opt.get_aggregator("came_grad", kappa=1.5, **VARIANTS["inject only"][0])
    assert torch.allclose(inject_only(G), 1.5 * G.sum(0), rtol=1e-6)


def test_sgd_sees_energy_injection_and_adam_does_not(tmp_path):
    """Energy injection on the linear direction is a rescale by κ: Adam removes it, SGD does not."""
    from mtl_opt.experiments import ablate

    kwargs = dict(steps=20, seeds=2, lr=0.01, variants=["linear", "inject only"], verbose=False)
    adam = ablate("quadratic", "came_grad:kappa=3", optimizer="adam", **kwargs).set_index("variant")
    sgd = ablate("quadratic", "came_grad:kappa=3", optimizer="sgd", **kwargs).set_index("variant")
    assert abs(adam.loc["inject only", "diff_vs_linear"]) < 1e-4 * adam.loc["linear", "mean"]
    assert abs(sgd.loc["inject only", "diff_vs_linear"]) > 1e-2 * sgd.loc["linear", "mean"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"seeds": 1}, ValueError, "at least 2 seeds"),
        ({"method": "cagrad"}, ValueError, "no stage switches"),
        ({"method": "came_grad:inject=False"}, ValueError, "sets the stage switches itself"),
        ({"variants": ["linear", "both"]}, ValueError, "unknown variant"),
        ({"metric": "accuracy"}, KeyError, "not reported"),
    ],
)
def test_bad_options_fail_with_a_message(kwargs, error, message):
    from mtl_opt.experiments import ablate

    options = {"seeds": 2, "steps": 2, "verbose": False, **kwargs}
    method = options.pop("method", "came_grad")
    with pytest.raises(error, match=message):
        ablate("toy", method, **options)


def test_cli_reports_bad_input_on_one_line(capsys):
    assert main(["ablate", "--problem", "nope", "--steps", "2"]) == 2
    assert "unknown problem" in capsys.readouterr().err


def test_ablation_on_the_deterministic_toy_has_replicates(tmp_path):
    """On a problem without gradient noise each seed runs from its own starts, shared by every
    variant: the seeds spread, the intervals are real, and the comparison is paired."""
    import torch

    from mtl_opt.experiments import ablate
    from mtl_opt.experiments.runner import SEEDED_STARTS_OFFSET, run_method
    from mtl_opt.problems import get_problem

    kwargs = dict(steps=60, seeds=4, lr=1e-2, verbose=False)
    summary = ablate("toy", "came_grad:kappa=3", out=tmp_path / "abl", **kwargs)
    runs = summary.attrs["runs"]
    values = runs.pivot(index="seed", columns="variant", values="front_distance")
    assert values.nunique().min() == 4  # every variant differs across the 4 seeds
    rows = summary.set_index("variant")
    inter = summary.attrs["interaction"].set_index("effect").loc[INTERACTION]
    assert inter["std"] > 0 and inter["ci_low"] < inter["estimate"] < inter["ci_high"]
    assert 0 < inter["p_value"] <= 1 and inter["note"] == ""
    for name in ["+rectify", "full"]:
        row = rows.loc[name]
        assert row["diff_std"] > 0 and row["ci_low"] < row["diff_vs_linear"] < row["ci_high"]
        assert 0 < row["p_value"] <= 1 and row["note"] == ""
        ref = paired_difference(values["+rectify"], values["linear"]) if name == "+rectify" else None
        if ref is not None:
            assert (row["ci_low"], row["ci_high"]) == pytest.approx((ref.ci_low, ref.ci_high))
    # paired: under Adam energy injection on the linear direction is a rescale, so within a seed
    # "inject only" matches "linear" although the seeds themselves lie far apart
    gap = (values["inject only"] - values["linear"]).abs().max()
    assert gap < 1e-3 * values["linear"].std()
    # seed 2's value is its own 5 starts run on their own
    toy = get_problem("toy")
    starts = toy.initial_points(5, seed=SEEDED_STARTS_OFFSET + 2)
    alone = run_method(toy, "came_grad:kappa=3,rectify=False,inject=False,fuse=False", starts=starts,
                       steps=60, lr=1e-2, record_every=6)
    assert values.loc[2, "linear"] == pytest.approx(float(alone.front_distance.mean()), rel=1e-12)
    config = json.loads((tmp_path / "abl" / "config.json").read_text())
    assert config["starts"].startswith("per seed r: problem.initial_points(5, seed=1000 + r)")
    # reproducible
    again = ablate("toy", "came_grad:kappa=3", **kwargs).attrs["runs"]
    assert torch.equal(torch.tensor(again["front_distance"].to_numpy()),
                       torch.tensor(runs["front_distance"].to_numpy()))
