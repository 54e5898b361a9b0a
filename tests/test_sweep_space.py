"""Search-space parsing for ``mtl-opt sweep`` (no Ray needed)."""

import pytest

from mtl_opt.experiments.search_space import (
    Choice,
    Grid,
    LogUniform,
    Uniform,
    as_space,
    parse_dimension,
    parse_space,
    space_size,
)


def test_command_line_items_parse_to_dimensions_in_order():
    space = parse_space(["kappa=grid:1,1.5,2,3", "nu=grid:0,0.2,0.5,1", "rho=uniform:0,0.9",
                         "lr=loguniform:1e-4,1e-1", "opt=choice:adam,sgd"])
    assert list(space) == ["kappa", "nu", "rho", "lr", "opt"]
    assert space["kappa"] == Grid([1, 1.5, 2, 3])
    assert space["nu"].values == (0, 0.2, 0.5, 1)
    assert space["rho"] == Uniform(0.0, 0.9)
    assert space["lr"] == LogUniform(1e-4, 1e-1)
    assert space["opt"] == Choice(["adam", "sgd"])
    assert space_size(space, samples=2) == 4 * 4 * 2


def test_spellings_of_log_uniform_and_literal_values():
    assert parse_dimension("log-uniform:0.01,1") == LogUniform(0.01, 1)
    assert parse_dimension("LogUniform:0.01,1") == LogUniform(0.01, 1)
    assert parse_dimension("choice:True,None,x").values == (True, None, "x")


def test_python_forms_lists_strings_and_objects():
    space = as_space({"kappa": [1, 2], "rho": "uniform:0,0.9", "nu": Choice([0.0, 0.5])})
    assert space == {"kappa": Grid([1, 2]), "rho": Uniform(0, 0.9), "nu": Choice([0.0, 0.5])}
    assert as_space(["kappa=grid:1,2"]) == {"kappa": Grid([1, 2])}
    assert as_space(None) == {}


def test_to_tune_builds_ray_domains():
    from ray import tune
    from ray.tune.search.sample import Float

    assert Grid([1, 2]).to_tune() == tune.grid_search([1, 2])
    u = Uniform(0, 0.9).to_tune()
    assert isinstance(u, Float) and (u.lower, u.upper) == (0.0, 0.9)


@pytest.mark.parametrize(
    "item, message",
    [
        ("kappa", "expected NAME=KIND:ARGS"),
        ("kappa=1,2", "expected KIND:ARGS"),
        ("kappa=grid:", "lists no values"),
        ("kappa=uniform:1", "exactly two bounds"),
        ("kappa=uniform:2,1", "low < high"),
        ("kappa=uniform:a,b", "numeric bounds"),
        ("lr=loguniform:0,1", "0 < low"),
        ("kappa=grid:1,1", "twice"),
        ("kappa=normal:0,1", "expected KIND:ARGS"),
        ("2x=grid:1", "not a hyperparameter name"),
        ("rho=uniform:0,inf", "finite bounds"),
    ],
)
def test_malformed_items_raise_one_clear_error(item, message):
    with pytest.raises(ValueError, match=message):
        parse_space([item])


def test_a_name_given_twice_is_rejected():
    with pytest.raises(ValueError, match="twice"):
        parse_space(["kappa=grid:1", "kappa=grid:2"])


def test_unsupported_python_entry_is_rejected():
    with pytest.raises(TypeError, match="kappa"):
        as_space({"kappa": 3})


def test_list_values_keep_their_commas():
    assert parse_dimension("grid:[1,4],[1,1]").values == ([1, 4], [1, 1])
