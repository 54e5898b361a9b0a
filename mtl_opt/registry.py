"""Methods by name: ``get_aggregator("came_grad", kappa=2.0)``.

Method modules register their class with :func:`register_aggregator`; the first lookup
imports :mod:`mtl_opt.methods`, which registers every built-in method.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mtl_opt._spec import parse_spec
from mtl_opt.aggregator import GradientAggregator

__all__ = [
    "MethodInfo",
    "aggregator_class",
    "available_aggregators",
    "describe_aggregators",
    "get_aggregator",
    "parse_method_spec",
    "register_aggregator",
]

_REGISTRY: dict[str, type[GradientAggregator]] = {}
A = TypeVar("A", bound=type[GradientAggregator])


def register_aggregator(name: str) -> Callable[[A], A]:
    """Class decorator that makes a method available as ``get_aggregator(name)``."""
    if not name or not name.replace("_", "").isalnum() or name != name.lower():
        raise ValueError(f"method names are lower-case identifiers, got {name!r}")

    def decorate(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, GradientAggregator)):
            raise TypeError(f"{cls!r} is not a GradientAggregator subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"method name {name!r} is already registered to {existing.__name__}")
        _REGISTRY[name] = cls
        cls.method_name = name  # type: ignore[attr-defined]
        return cls

    return decorate


def _load_builtins() -> None:
    import mtl_opt.methods  # noqa: F401  (registers the built-in methods; cached after the first)


def available_aggregators() -> list[str]:
    """The registered method names, in registration order."""
    _load_builtins()
    return list(_REGISTRY)


def aggregator_class(name: str) -> type[GradientAggregator]:
    """The class registered under ``name``; unknown names raise with the closest matches."""
    if not isinstance(name, str):
        raise TypeError(f"a method name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    _load_builtins()
    try:
        return _REGISTRY[key]
    except KeyError:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown method {name!r}{hint} (available: {', '.join(_REGISTRY)})"
        ) from None


def get_aggregator(name: str, /, **hyperparameters: Any) -> GradientAggregator:
    """Build the method registered under ``name`` with the given hyperparameters."""
    cls = aggregator_class(name)
    params = _constructor_parameters(cls)
    unknown = sorted(set(hyperparameters) - set(params))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for method {name!r}; "
            f"it takes {', '.join(params) or 'none'}"
        )
    return cls(**hyperparameters)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    cls: type[GradientAggregator]
    defaults: dict[str, Any]
    summary: str


def describe_aggregators() -> list[MethodInfo]:
    """Every registered method with its hyperparameters' defaults and a one-line summary."""
    _load_builtins()
    infos = []
    for name, cls in _REGISTRY.items():
        params = _constructor_parameters(cls)
        defaults = {
            k: (p.default if p.default is not inspect.Parameter.empty else "<required>")
            for k, p in params.items()
        }
        doc = inspect.getdoc(cls) or ""
        infos.append(MethodInfo(name, cls, defaults, doc.splitlines()[0] if doc else ""))
    return infos


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse ``"came_grad:kappa=2,nu=0.5"`` into ``("came_grad", {"kappa": 2, "nu": 0.5})``.

    Values are Python literals (numbers, strings, ``None``, ``True``, lists such as
    ``task_weights=[1,4]``); bare words are strings. The name and keys are checked against the
    registry so a typo fails before any work starts.
    """
    name, hyper = parse_spec(spec, "method spec")
    cls = aggregator_class(name)
    params = _constructor_parameters(cls)
    for key, value in hyper.items():
        if key not in params:
            raise ValueError(
                f"in method spec {spec!r}: unknown hyperparameter {key!r} for {name}; "
                f"it takes {', '.join(params) or 'none'}"
            )
        if isinstance(value, str) and _takes_vector(params[key]):
            raise ValueError(
                f"in method spec {spec!r}: {key} takes a list of numbers such as {key}=[1,4], "
                f"got the string {value!r}"
            )
    return cls.method_name, hyper  # type: ignore[attr-defined]


def _takes_vector(param: inspect.Parameter) -> bool:
    """Whether a constructor keyword is annotated as a vector (``Sequence[float] | Tensor``)
    and not also as a string (a spec's quoted or bare word would be split into characters)."""
    text = param.annotation if isinstance(param.annotation, str) else str(param.annotation)
    vector = any(w in text for w in ("Sequence", "Tensor", "list[", "tuple["))
    return vector and "str" not in text


def _constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {
        k: p
        for k, p in sig.parameters.items()
        if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
