"""Problem adapters and the sweep command's checks that run before Ray starts."""

import math

import pytest

from mtl_opt.cli import main
from mtl_opt.experiments.shared_args import parse_seeds
from mtl_opt.experiments.sweep_study import parse_spec
from mtl_opt.experiments.workloads import (
    SyntheticWorkload,
    TrainingSettings,
    get_workload,
    normalise_metrics,
)


def test_seeds_and_problem_specs():
    # The same reading as mtl-opt compare: a list, or a count written 3x.
    assert parse_seeds("3x") == (0, 1, 2)
    assert parse_seeds("3") == (3,)
    assert parse_seeds("0,4,7") == (0, 4, 7)
    assert parse_seeds([5]) == (5,) and parse_seeds(2) == (0, 1)
    for bad in ["0x", "a", "1,1", ""]:
        with pytest.raises(ValueError):
            parse_seeds(bad)
    assert parse_spec("quadratic:dim=10,noise=0.5") == ("quadratic", {"dim": 10, "noise": 0.5})
    assert parse_spec("rrg:synthetic={'a': 1},data=synthetic") == ("rrg", {"synthetic": {"a": 1}, "data": "synthetic"})


def test_metrics_are_floats_with_a_mean_loss_and_divergence_raises():
    import torch

    row = normalise_metrics(5, {"loss_1": torch.tensor(1.0), "loss_2": 3, "ratio": float("nan")})
    assert row["loss_mean"] == 2.0 and isinstance(row["loss_1"], float) and math.isnan(row["ratio"])
    with pytest.raises(FloatingPointError, match="'loss_2' is inf at step 5"):
        normalise_metrics(5, {"loss_1": 1.0, "loss_2": float("inf")})
    with pytest.raises(FloatingPointError, match="'ratio'"):
        normalise_metrics(5, {"ratio": float("nan")}, required=("ratio",))


def test_synthetic_workload_reports_the_runner_metrics():
    workload = get_workload("zdt1")
    assert isinstance(workload, SyntheticWorkload) and workload.default_metric() == "front_distance"
    assert {"kappa", "nu", "rho", "lr"} <= set(workload.tunable_names("came_grad"))
    seen = []
    settings = TrainingSettings(method="came_grad", steps=4, record_every=2, seeds=(0, 1))
    workload.run(settings, {"kappa": 2.0}, lambda step, m: seen.append((step, dict(m))))
    assert [s for s, _ in seen] == [0, 2, 4]
    assert {"loss_1", "loss_2", "stationarity", "front_distance"} <= set(seen[-1][1])


def test_unknown_problem_and_options_fail_early():
    with pytest.raises(ValueError, match="unknown problem"):
        get_workload("zdt9")
    with pytest.raises((TypeError, ValueError)):
        get_workload("zdt1", wings=3)


def test_rrg_adapter_trains_averages_seeds_and_reports_evaluation(tmp_path):
    from mtl_opt.experiments.rrg_workload import RRGWorkload

    workload = get_workload("rrg", n_train=8, n_val=4, n_test=4, batch_size=4, eval_max_samples=4)
    assert isinstance(workload, RRGWorkload) and workload.default_metric() == "loss_weighted"
    assert workload.final_only("CE_f1_micro") and not workload.final_only("loss_weighted")
    workload.run_root = str(tmp_path)
    per_seed = {}
    for seed in (0, 1):
        rows = []
        workload.run(TrainingSettings(method="came_grad", steps=2, record_every=1, seeds=(seed,)),
                     {"kappa": 2.0}, lambda s, m, rows=rows: rows.append((s, dict(m))))
        per_seed[seed] = rows
    assert [s for s, _ in per_seed[0]] == [1, 2, 2]  # training rows, then the last with evaluation
    assert "CE_f1_micro" in per_seed[0][-1][1] and "CE_f1_micro" not in per_seed[0][0][1]
    both = []
    workload.run(TrainingSettings(method="came_grad", steps=2, record_every=1, seeds=(0, 1)),
                 {"kappa": 2.0}, lambda s, m: both.append((s, dict(m))))
    for i in range(3):
        for key in ("loss_weighted", "loss_report"):
            mean = (per_seed[0][i][1][key] + per_seed[1][i][1][key]) / 2
            assert both[i][1][key] == pytest.approx(mean, rel=1e-5)
    assert len(list(tmp_path.iterdir())) == 2  # one run folder per seed (the mean reuses them)


def test_rrg_options_set_by_the_study_are_refused():
    with pytest.raises(ValueError, match="set by the study's own options"):
        get_workload("rrg", lr=0.1)
    with pytest.raises(ValueError, match="unknown rrg option"):
        get_workload("rrg", n_trian=3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--space", "kapa=grid:1,2"], "does not take; searchable"),
        (["--space", "kappa=grid"], "expected KIND:ARGS"),
        ([], "the search space is empty"),
        (["--space", "kappa=grid:1", "--problem", "rrg", "--metric", "CE_f1_micro", "--scheduler", "asha"],
         "known only after training"),
        (["--resume", "somewhere", "--space", "kappa=grid:1"], "drop --space"),
        (["--space", "kappa=grid:1", "--device", "cuda"], "needs --gpus-per-trial > 0"),
        (["--space", "kappa=grid:1", "--scheduler", "asha", "--steps", "10", "--record-every", "20"],
         "grace period must lie in [1, steps=10]"),
    ],
)
def test_sweep_cli_rejects_bad_options_on_one_line(argv, message, capsys, tmp_path):
    if "--resume" not in argv:
        argv = [*argv, "--out", str(tmp_path / "sweep")]
    assert main(["sweep", "--steps", "2", *argv]) == 2
    assert not (tmp_path / "sweep").exists()
    assert message in capsys.readouterr().err


def test_sweep_cli_unreachable_address(capsys, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "sweep"
    assert main(["sweep", "--space", "kappa=grid:1", "--address", f"127.0.0.1:{port}",
                 "--out", str(out)]) == 2
    assert "no Ray cluster reachable" in capsys.readouterr().err
    assert not out.exists()  # nothing written for a sweep that could not start


def test_study_modules_and_the_cli_parser_stay_light(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, mtl_opt.experiments as e, mtl_opt.experiments.sweep_study, "
        "mtl_opt.experiments.ablate_study; from mtl_opt.cli import build_parser; build_parser(); "
        "heavy = [m for m in ('ray', 'plotly', 'pandas') if m in sys.modules]; "
        "print(','.join(heavy), callable(e.sweep), callable(e.ablate))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
