"""Every registered method's declared ``properties``, checked on one shared bank of Jacobians.

A method declares in its class attribute ``properties`` what its maths gives (see
:data:`mtl_opt.aggregator.PROPERTIES`); this module checks each declaration on the same inputs:
random Jacobians with K = 2..5 and hand-built ones (a conflicting pair, the Pareto-stationary
pair ``u, −3u``, three rows at unequal angles with norms 1, 2, 3 (the triangle), a zero row).
Every method is built fresh for every call (stateful methods start from the same state), with
``seed=0`` where it takes a seed (random methods compare calls with the same seed), and methods
that read the losses get the same losses, permuted with the rows.

- ``non_conflicting``: ``G d ≥ −tol`` row by row (``tol`` relative to ``‖g_i‖ ‖d‖``).
- ``permutation_invariant``: ``agg(P G) = agg(G)``.
- ``linear_under_scaling``: ``agg(s G) = s · agg(G)`` for ``s`` in {1e-3, 7}.
- ``stationary_at_pareto_stationary``: ``d = 0`` (relative to the largest row norm) where a
  convex combination of the rows with every weight positive is 0 (``u, −3u`` and the triangle).

It also checks each declared ``state`` against what a call keeps, and that the README's table
is the one ``mtl-opt methods --format properties`` prints from the declarations.
"""

from __future__ import annotations

import math

import pytest
import torch

import mtl_opt
from mtl_opt.aggregator import PROPERTIES

f64 = torch.float64
TOL = 1e-6


def _random(K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * K + seed)
    scales = torch.logspace(-1, 1, K, dtype=f64)[:, None]
    return scales * torch.randn(K, 7, generator=g, dtype=f64)


def _triangle() -> torch.Tensor:
    # Gaps of 100°, 115° and 145° (each under 180°): 0 is inside the hull, with no symmetry.
    angles = torch.tensor([0.0, 100.0, 215.0], dtype=f64) * (math.pi / 180)
    return torch.stack([angles.cos(), angles.sin(), torch.zeros(3, dtype=f64)], dim=1)


U = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=f64)
# Unequal row norms, so that a method with equal weights does not vanish by symmetry alone.
PARETO_STATIONARY = {
    "opposite_pair": torch.stack([U, -3 * U]),
    "triangle": _triangle() * torch.tensor([[1.0], [2.0], [3.0]], dtype=f64),
}
BANK = {
    **{f"K{K}-s{s}": _random(K, s) for K in range(2, 6) for s in range(2)},
    # The sum of this pair conflicts with its first row.
    "conflicting_pair": torch.tensor([[1.0, 0.2, 0.0], [-2.0, 0.5, 0.3]], dtype=f64),
    "zero_row": torch.stack([U, torch.zeros(4, dtype=f64), 1 - U]),
    **PARETO_STATIONARY,
}


def _fresh(name: str) -> mtl_opt.GradientAggregator:
    cls = mtl_opt.aggregator_class(name)
    agg = mtl_opt.get_aggregator(name)
    return mtl_opt.get_aggregator(name, seed=0) if "seed" in agg.hyperparameters() else cls()


def _losses(K: int) -> torch.Tensor:
    return torch.linspace(0.5, 2.0, K, dtype=f64)


def direction(name: str, G: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
    agg = _fresh(name)
    if agg.uses_losses:
        return agg(G, losses=_losses(G.shape[0]) if losses is None else losses)
    return agg(G)


def _rel(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((a - b).norm()) / max(scale, 1e-300)


def check(name: str, prop: str, G: torch.Tensor) -> None:
    """Raises AssertionError when ``prop`` does not hold for method ``name`` on ``G``."""
    K = G.shape[0]
    d = direction(name, G)
    scale = max(float(d.norm()), float(G.norm(dim=1).max()))
    if prop == "non_conflicting":
        # A direction that is zero to the solve's precision conflicts with nothing.
        norm = max(float(d.norm()), TOL * float(G.norm(dim=1).max()))
        assert bool((G @ d >= -TOL * G.norm(dim=1) * norm).all()), (G @ d).tolist()
    elif prop == "permutation_invariant":
        perm = torch.arange(K - 1, -1, -1)  # reversed rows: moves every row when K ≥ 2
        assert _rel(direction(name, G[perm], _losses(K)[perm]), d, scale) < TOL
    elif prop == "linear_under_scaling":
        for s in (1e-3, 7.0):
            assert _rel(direction(name, s * G), s * d, s * scale) < TOL
    elif prop == "stationary_at_pareto_stationary":
        assert float(d.norm()) < TOL * float(G.norm(dim=1).max()), d.tolist()
    else:  # pragma: no cover - PROPERTIES and this function list the same names
        raise AssertionError(f"no check for property {prop!r}")


def _cases() -> list:
    cases = []
    for name in mtl_opt.available_aggregators():
        for prop in sorted(mtl_opt.aggregator_class(name).properties):
            bank = PARETO_STATIONARY if prop == "stationary_at_pareto_stationary" else BANK
            cases += [pytest.param(name, prop, G, id=f"{name}-{prop}-{gid}")
                      for gid, G in bank.items()]
    return cases


@pytest.mark.parametrize("name,prop,G", _cases())
def test_declared_property_holds(name, prop, G):
    check(name, prop, G)


def test_every_property_has_a_check_and_is_declared_somewhere():
    """Each known property is checked (a name without a check would raise) and claimed by at
    least one method; the bank holds what the stationarity check needs."""
    names = mtl_opt.available_aggregators()
    declared = set().union(*(mtl_opt.aggregator_class(n).properties for n in names))
    assert declared == set(PROPERTIES)
    for prop in PROPERTIES:
        check("upgrad", prop, BANK["triangle"])


def test_checks_catch_a_false_claim():
    """The checks fail where the maths says they must: LS does not vanish at the triangle's
    Pareto-stationary point of unequal rows, the sum conflicts on the conflicting pair, PCGrad
    conflicts on five tasks, random weights change when the rows are permuted, Nash-MTL's norm
    cap is not linear."""
    with pytest.raises(AssertionError):
        check("ls", "stationary_at_pareto_stationary", BANK["triangle"])
    with pytest.raises(AssertionError):
        check("ls", "non_conflicting", BANK["conflicting_pair"])
    with pytest.raises(AssertionError):
        check("pcgrad", "non_conflicting", BANK["K5-s0"])
    with pytest.raises(AssertionError):
        check("rgw", "permutation_invariant", BANK["K4-s0"])
    with pytest.raises(AssertionError):
        check("nash_mtl", "linear_under_scaling", 100 * BANK["K3-s0"])


def test_unknown_property_is_refused():
    with pytest.raises(TypeError, match="unknown entries"):
        type("Bad", (mtl_opt.GramianAggregator,), {"properties": frozenset({"fast"})})


def test_readme_table_is_the_declarations():
    """The README's table of kinds, states and properties is what ``mtl-opt methods --format
    properties`` prints from the declarations (so the two cannot drift)."""
    from pathlib import Path

    from mtl_opt.experiments.methods_cli import properties_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- methods-properties:start -->\n", "<!-- methods-properties:end -->"
    assert start in readme and end in readme
    shown = readme.split(start, 1)[1].split(end, 1)[0].strip().splitlines()
    assert shown == properties_table()


def test_cli_methods_prints_kind_state_and_properties(capsys):
    from mtl_opt.cli import main
    from mtl_opt.experiments.methods_cli import properties_table

    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == set(mtl_opt.available_aggregators())
    assert "Gramian weighting" in lines["upgrad"]
    assert "stationary at Pareto-stationary points" in lines["upgrad"]
    assert "loss weighting" in lines["uw"] and "tracked" in lines["uw"]
    assert "general" in lines["graddrop"] and "random" in lines["graddrop"]
    assert main(["methods", "--format", "properties"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == properties_table()


STATE_GENERATORS = {"generator_state", "rng", "batch_rng"}


@pytest.mark.parametrize("name", mtl_opt.available_aggregators())
def test_declared_state_is_what_a_call_keeps(name):
    """``random``: the method takes a seed and keeps a generator; ``tracked``: after one call its
    ``state_dict`` holds more than a generator; ``none``: an empty ``state_dict``."""
    agg, G = mtl_opt.get_aggregator(name), BANK["K3-s0"]
    agg(G, losses=_losses(3)) if agg.uses_losses else agg(G)
    keys = set(agg.state_dict())
    random = "seed" in agg.hyperparameters()
    assert random == bool(keys & STATE_GENERATORS)
    tracked = bool(keys - STATE_GENERATORS)
    expected = {(False, False): "none", (True, False): "random", (False, True): "tracked",
                (True, True): "tracked, random"}[(random, tracked)]
    assert type(agg).state == expected
