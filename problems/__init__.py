"""Synthetic Pareto problems with known fronts, and the radiology report generation workload.

``get_problem(name, **options)`` builds a problem by name::

    toy                     the CAGrad / Nash-MTL two-task toy (first loss × 0.1, Nash-MTL's variant)
    zdt1, zdt2, zdt3        two tasks, 30 variables in [0, 1]
    dtlz2                   3 tasks, 10 variables in [0, 1]
    quadratic               2 convex quadratics, 10 variables, analytic Pareto set
    quadratic_imbalanced    ... with the second loss × 100
    quadratic_noisy         ... with noisy gradients (σ = 1)
    quadratic_many          ... with 10 tasks

``parse_problem_spec("quadratic:imbalance=1000")`` reads the command line's form.
"""

from __future__ import annotations

import difflib
from typing import Any

from mtl_opt._spec import parse_spec

from mtl_opt.problems.base import ParetoProblem
from mtl_opt.problems.dtlz import DTLZ2
from mtl_opt.problems.quadratic import Quadratic
from mtl_opt.problems.toy import NASH_TOY_STARTS, Toy
from mtl_opt.problems.workload import register_training_workload
from mtl_opt.problems.zdt import ZDT1, ZDT2, ZDT3

# QM9 (problems/qm9/): imported on first use, like every built-in training workload.
register_training_workload("qm9", "mtl_opt.problems.qm9.workload:QM9")

__all__ = [
    "DTLZ2",
    "NASH_TOY_STARTS",
    "ParetoProblem",
    "Quadratic",
    "Toy",
    "ZDT1",
    "ZDT2",
    "ZDT3",
    "available_problems",
    "get_problem",
    "parse_problem_spec",
    "problem_from_spec",
]

# name -> (class, default options)
_PROBLEMS: dict[str, tuple[type[ParetoProblem], dict[str, Any]]] = {
    "toy": (Toy, {}),
    "zdt1": (ZDT1, {}),
    "zdt2": (ZDT2, {}),
    "zdt3": (ZDT3, {}),
    "dtlz2": (DTLZ2, {}),
    "quadratic": (Quadratic, {}),
    "quadratic_imbalanced": (Quadratic, {"imbalance": 100.0}),
    "quadratic_noisy": (Quadratic, {"noise": 1.0}),
    "quadratic_many": (Quadratic, {"n_tasks": 10}),
}


def available_problems() -> list[str]:
    """Registered problem names."""
    return list(_PROBLEMS)


def get_problem(name: str, /, **options: Any) -> ParetoProblem:
    """Build the problem registered under ``name``; ``options`` override its defaults."""
    if not isinstance(name, str):
        raise TypeError(f"a problem name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in _PROBLEMS:
        close = difflib.get_close_matches(key, list(_PROBLEMS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown problem {name!r}{hint} (available: {', '.join(_PROBLEMS)})")
    cls, defaults = _PROBLEMS[key]
    import inspect

    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for problem {key!r}; it takes {', '.join(params)}")
    problem = cls(**{**defaults, **options})
    problem.name = key
    return problem


def parse_problem_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"quadratic:imbalance=1000,n_tasks=3"`` -> ``("quadratic", {...})`` (checked by building it)."""
    name, options = parse_spec(spec, "problem spec")
    get_problem(name, **options)  # validates
    return name.strip().lower().replace("-", "_"), options


def problem_from_spec(spec: str | ParetoProblem) -> ParetoProblem:
    """A problem object from a spec string (or the object itself)."""
    if isinstance(spec, ParetoProblem):
        return spec
    name, options = parse_problem_spec(spec)
    return get_problem(name, **options)
