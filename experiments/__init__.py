"""Studies: compare, ablate and sweep and benchmark; their tables and plotly figures.

``sweep`` and ``ablate`` are loaded on first use, so ``import mtl_opt.experiments`` does not import
Ray, plotly or pandas.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ablate", "sweep"]

_LAZY = {
    "sweep": ("mtl_opt.experiments.sweep_study", "sweep"),
    "ablate": ("mtl_opt.experiments.ablate_study", "ablate"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'mtl_opt.experiments' has no attribute {name!r}")
