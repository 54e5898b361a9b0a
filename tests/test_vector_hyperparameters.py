"""A vector hyperparameter (LS weights, CAME-Grad task weights) is a list of numbers: a string is
refused in Python and in specs, and every study's config.json re-runs with vectors in it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import mtl_opt
from mtl_opt.cli import main


@pytest.mark.parametrize("method, key", [("ls", "weights"), ("came_grad", "task_weights")])
@pytest.mark.parametrize("bad", ["10", "1,4", b"10", np.array(["1", "4"]), [1, "4"], [[1, 4]], 3, [True, 1]])
def test_a_vector_hyperparameter_refuses_non_vectors(method, key, bad):
    with pytest.raises(TypeError, match=key):
        mtl_opt.get_aggregator(method, **{key: bad})


@pytest.mark.parametrize("method, key", [("ls", "weights"), ("came_grad", "task_weights")])
def test_a_vector_hyperparameter_takes_lists_tuples_arrays_and_tensors(method, key):
    for good in ([1, 4], (1.0, 4.0), np.array([1.0, 4.0]), torch.tensor([1, 4])):
        agg = mtl_opt.get_aggregator(method, **{key: good})
        assert agg.hyperparameters()[key] == [1.0, 4.0]


@pytest.mark.parametrize("spec", ['ls:weights="10"', "ls:weights=10x", "came_grad:task_weights='14'"])
def test_a_spec_refuses_a_string_where_a_vector_goes(spec):
    with pytest.raises(ValueError, match="takes a list of numbers"):
        mtl_opt.parse_method_spec(spec)


def test_compare_refuses_a_string_of_weights(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--problems", "toy", "--methods", 'ls:weights="10"', "--steps", "2",
                 "--out", str(out), "--quiet"]) == 2
    assert "takes a list of numbers" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("options", [{"weights": [1.0, 4.0]}, {"normalization": "l2"}, {"c": 0.5, "rescale": True}, {}])
def test_format_spec_is_parse_spec_inverse(options):
    from mtl_opt._spec import format_spec, parse_spec

    assert parse_spec(format_spec("m", options)) == ("m", options)


VECTOR_METHODS = ["ls:weights=[1,4]", "came_grad:task_weights=[1,4],kappa=2"]


def test_compare_config_with_vectors_reruns_to_the_same_table(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["compare", "--problems", "toy", "--methods", *VECTOR_METHODS, "--steps", "30",
                 "--out", str(first), "--quiet", "--no-figures"]) == 0
    assert main(["compare", "--config", str(first / "config.json"), "--out", str(second),
                 "--quiet", "--no-figures"]) == 0
    capsys.readouterr()
    a, b = pd.read_csv(first / "final.csv"), pd.read_csv(second / "final.csv")
    assert list(a["method"].unique()) == ["ls:weights=[1,4]", "came_grad:task_weights=[1,4],kappa=2"]
    cols = [c for c in a.columns if c != "time_per_step_us"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_ablate_config_with_vectors_reruns_to_the_same_table(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["ablate", "--method", "came_grad:task_weights=[1,4],kappa=2", "--steps", "30",
                 "--seeds", "2x", "--out", str(first)]) == 0
    config = json.loads((first / "config.json").read_text())
    assert config["method_options"] == {"task_weights": [1.0, 4.0], "kappa": 2}
    assert main(["ablate", "--config", str(first / "config.json"), "--out", str(second)]) == 0
    assert main(["ablate", "--config", str(first / "config.json"), "--steps", "5",
                 "--out", str(tmp_path / "third")]) == 2
    assert "--config fixes the study; drop --steps" in capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_csv(first / "runs.csv"), pd.read_csv(second / "runs.csv"))
    assert json.loads((second / "config.json").read_text())["method_options"] == config["method_options"]
