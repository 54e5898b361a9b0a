"""A sweep builds every trial's method before Ray starts: a value the method refuses stops the
sweep with one line naming the hyperparameter and the value, Ray never starts, nothing is written."""

from __future__ import annotations

import sys

import pytest

from mtl_opt.cli import main
from mtl_opt.experiments.search_space import as_space
from mtl_opt.experiments.workloads import TrainingSettings

pytest.importorskip("ray")


@pytest.mark.parametrize("args, names", [
    (["--space", "nu=grid:2"], "nu=2"),
    (["--space", "nu=grid:0.5", "--space", "kappa=grid:0,1"], "kappa=0"),
    (["--method", "came_grad:nu=2", "--space", "kappa=grid:1"], "--method came_grad:nu=2"),
    (["--space", "kappa=uniform:0,1"], "kappa=0.0"),
    (["--space", "rho=loguniform:1e-3,1", "--space", "nu=choice:0.5,1.5"], "nu=1.5"),
    (["--space", "task_weights=choice:[1,4],'14'"], "task_weights='14'"),
    (["--space", "lr=grid:0.1,-1"], "lr"),
])
def test_a_refused_value_stops_the_sweep_before_ray(tmp_path, capsys, args, names):
    out = tmp_path / "sweep"
    assert main(["sweep", *args, "--steps", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0], err
    assert not out.exists()
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_every_grid_cell_is_built():
    from mtl_opt.experiments.sweep_study import check_trial_methods

    settings = TrainingSettings(method="came_grad", method_options={"rho": 0.3})
    dims = as_space(["kappa=grid:1,2,3", "nu=grid:0,0.5", "rho=uniform:0.1,0.9"])
    with pytest.raises(ValueError, match="fixed in the method spec"):
        from mtl_opt.experiments.sweep_study import _validate_space
        from mtl_opt.experiments.workloads import get_workload

        _validate_space(dims, get_workload("toy"), settings)
    settings = TrainingSettings(method="came_grad")
    assert check_trial_methods(settings, dims) == 3 * 2 * 3 + 1  # grid x both ends and the middle
