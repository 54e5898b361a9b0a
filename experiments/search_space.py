"""Search spaces for sweeps: grid, uniform, log-uniform and choice dimensions.

A space maps a hyperparameter name to a dimension. On the command line each dimension is one
``--space NAME=KIND:ARGS`` item::

    --space kappa=grid:1,1.5,2,3      every value, crossed with the other grid dimensions
    --space nu=choice:0,0.2,0.5       one value drawn at random per sample
    --space rho=uniform:0,0.9         drawn uniformly from [0, 0.9]
    --space lr=loguniform:1e-4,1e-1   drawn log-uniformly from [1e-4, 1e-1]

From Python, pass the same strings, the dimension objects below, or a plain list (a grid)::

    {"kappa": [1, 1.5, 2, 3], "rho": Uniform(0.0, 0.9), "nu": "grid:0,0.5,1"}

Ray Tune's semantics apply: the grid dimensions are crossed, and the whole grid is repeated
``samples`` times with fresh draws of the random dimensions. Nothing here imports Ray; a dimension
becomes a Ray Tune domain only in :meth:`Dimension.to_tune`.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mtl_opt._spec import split_top_level

__all__ = [
    "Choice",
    "Dimension",
    "Grid",
    "LogUniform",
    "Uniform",
    "as_space",
    "parse_dimension",
    "parse_space",
    "space_size",
]


class Dimension:
    """One searched hyperparameter's domain."""

    kind: str = ""

    def to_tune(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def is_grid(self) -> bool:
        return False


def _check_values(kind: str, values: Sequence[Any]) -> tuple[Any, ...]:
    values = tuple(values)
    if not values:
        raise ValueError(f"a {kind} dimension needs at least one value")
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"a {kind} dimension got a non-finite value {v!r}")
    if len(set(map(repr, values))) != len(values):
        raise ValueError(f"a {kind} dimension lists a value twice: {list(values)}")
    return values


@dataclass(frozen=True)
class Grid(Dimension):
    """Every value is tried (crossed with the other grid dimensions)."""

    values: tuple[Any, ...]
    kind = "grid"

    def __init__(self, values: Iterable[Any]):
        object.__setattr__(self, "values", _check_values("grid", list(values)))

    @property
    def is_grid(self) -> bool:
        return True

    def to_tune(self) -> Any:
        from ray import tune

        return tune.grid_search(list(self.values))

    def describe(self) -> str:
        return "grid:" + ",".join(map(str, self.values))


@dataclass(frozen=True)
class Choice(Dimension):
    """One of the values, drawn uniformly at random per sample."""

    values: tuple[Any, ...]
    kind = "choice"

    def __init__(self, values: Iterable[Any]):
        object.__setattr__(self, "values", _check_values("choice", list(values)))

    def to_tune(self) -> Any:
        from ray import tune

        return tune.choice(list(self.values))

    def describe(self) -> str:
        return "choice:" + ",".join(map(str, self.values))


def _check_bounds(kind: str, low: Any, high: Any) -> tuple[float, float]:
    try:
        lo, hi = float(low), float(high)
    except (TypeError, ValueError):
        raise ValueError(f"a {kind} dimension needs numeric bounds, got {low!r}, {high!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"a {kind} dimension needs finite bounds, got {lo}, {hi}")
    if not lo < hi:
        raise ValueError(f"a {kind} dimension needs low < high, got low={lo}, high={hi}")
    return lo, hi


@dataclass(frozen=True)
class Uniform(Dimension):
    """A float drawn uniformly from ``[low, high]``."""

    low: float
    high: float
    kind = "uniform"

    def __init__(self, low: float, high: float):
        lo, hi = _check_bounds("uniform", low, high)
        object.__setattr__(self, "low", lo)
        object.__setattr__(self, "high", hi)

    def to_tune(self) -> Any:
        from ray import tune

        return tune.uniform(self.low, self.high)

    def describe(self) -> str:
        return f"uniform:{self.low},{self.high}"


@dataclass(frozen=True)
class LogUniform(Dimension):
    """A float whose logarithm is drawn uniformly from ``[log low, log high]`` (``0 < low``)."""

    low: float
    high: float
    kind = "loguniform"

    def __init__(self, low: float, high: float):
        lo, hi = _check_bounds("loguniform", low, high)
        if lo <= 0:
            raise ValueError(f"a loguniform dimension needs 0 < low, got low={lo}")
        object.__setattr__(self, "low", lo)
        object.__setattr__(self, "high", hi)

    def to_tune(self) -> Any:
        from ray import tune

        return tune.loguniform(self.low, self.high)

    def describe(self) -> str:
        return f"loguniform:{self.low},{self.high}"


_KINDS = {
    "grid": "grid",
    "choice": "choice",
    "uniform": "uniform",
    "loguniform": "loguniform",
    "log-uniform": "loguniform",
    "log_uniform": "loguniform",
}


def _literal(raw: str) -> Any:
    raw = raw.strip()
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def parse_dimension(text: str) -> Dimension:
    """Parse ``"grid:1,2,3"``, ``"choice:a,b"``, ``"uniform:0,0.9"`` or ``"loguniform:1e-4,1e-1"``."""
    if not isinstance(text, str):
        raise TypeError(f"a dimension spec must be a string, got {type(text).__name__}")
    kind, sep, args = text.strip().partition(":")
    key = kind.strip().lower()
    if not sep or key not in _KINDS:
        raise ValueError(
            f"cannot read dimension {text!r}: expected KIND:ARGS with KIND one of "
            "grid, choice, uniform, loguniform (e.g. 'grid:1,2,3' or 'uniform:0,0.9')"
        )
    items = [a for a in (s.strip() for s in split_top_level(args)) if a]
    if not items:
        raise ValueError(f"dimension {text!r} lists no values")
    kind = _KINDS[key]
    values = [_literal(a) for a in items]
    if kind == "grid":
        return Grid(values)
    if kind == "choice":
        return Choice(values)
    if len(values) != 2:
        raise ValueError(f"dimension {text!r}: {kind} takes exactly two bounds LOW,HIGH")
    return Uniform(*values) if kind == "uniform" else LogUniform(*values)


def parse_space(items: Iterable[str]) -> dict[str, Dimension]:
    """Parse repeated ``NAME=KIND:ARGS`` command-line items into a space (names in order)."""
    space: dict[str, Dimension] = {}
    for item in items:
        name, eq, spec = str(item).partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError(
                f"cannot read --space {item!r}: expected NAME=KIND:ARGS, e.g. kappa=grid:1,1.5,2"
            )
        if not name.isidentifier():
            raise ValueError(f"--space {item!r}: {name!r} is not a hyperparameter name")
        if name in space:
            raise ValueError(f"--space names {name!r} twice; give each hyperparameter once")
        space[name] = parse_dimension(spec)
    return space


def as_space(space: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Dimension]:
    """Normalise a user's space: a mapping of name to dimension/string/list, or ``NAME=...`` strings."""
    if space is None:
        return {}
    if isinstance(space, str):
        return parse_space([space])
    if not isinstance(space, Mapping):
        return parse_space(space)
    out: dict[str, Dimension] = {}
    for name, dim in space.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"search space key {name!r} is not a hyperparameter name")
        if isinstance(dim, Dimension):
            out[name] = dim
        elif isinstance(dim, str):
            out[name] = parse_dimension(dim)
        elif isinstance(dim, (list, tuple)):
            out[name] = Grid(dim)
        else:
            raise TypeError(
                f"search space entry {name!r}: expected a Grid/Choice/Uniform/LogUniform, a "
                f"'kind:args' string or a list of grid values, got {type(dim).__name__}"
            )
    return out


def space_size(space: Mapping[str, Dimension], samples: int) -> int:
    """Number of trials Ray Tune will run: grid cells × samples."""
    cells = 1
    for dim in space.values():
        if isinstance(dim, Grid):
            cells *= len(dim.values)
    return cells * samples
