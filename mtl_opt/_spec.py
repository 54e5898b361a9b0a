"""The command line's ``NAME:key=value,...`` form, shared by methods, problems and studies."""

from __future__ import annotations

import ast
from typing import Any


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a=[1,4],b=2"`` -> ``["a=[1,4]", "b=2"]``."""
    items, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return items


def parse_value(raw: str) -> Any:
    """A Python literal (number, string, list, ``None``, ``True``), else the bare word."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def parse_spec(spec: object, what: str = "spec") -> tuple[str, dict[str, Any]]:
    """``"came_grad:kappa=2,task_weights=[1,4]"`` -> ``("came_grad", {"kappa": 2, ...})``.

    Only the syntax is checked here; the caller checks the name and the keys.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a {what} must be a non-empty string like 'name:key=value', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    if not name.strip():
        raise ValueError(f"in {what} {spec!r}: the name before ':' is missing")
    options: dict[str, Any] = {}
    for item in (i.strip() for i in split_top_level(rest)):
        if not item:
            continue
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"in {what} {spec!r}: expected key=value, got {item!r}")
        if key.strip() in options:
            raise ValueError(f"in {what} {spec!r}: {key.strip()!r} is given twice")
        options[key.strip()] = parse_value(raw.strip())
    return name.strip(), options


def format_value(value: Any) -> str:
    """A value as :func:`parse_value` reads it back: numbers and lists as Python literals
    (``[1.0,4.0]``), strings quoted (``'l2'``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return repr(value) if isinstance(value, float) else str(value)


def format_spec(name: str, options: dict[str, Any]) -> str:
    """The inverse of :func:`parse_spec`: ``("ls", {"weights": [1, 4]})`` -> ``"ls:weights=[1,4]"``."""
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={format_value(v)}" for k, v in options.items())
