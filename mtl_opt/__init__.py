"""mtl_opt: multi-task gradient aggregation behind one interface.

A Jacobian ``G`` (one row per task) goes in, one update direction comes out::

    import mtl_opt
    agg = mtl_opt.get_aggregator("came_grad")      # rho=0.5, kappa=1.5, nu=0.2
    direction = agg(G)                              # (K, d) -> (d,)

Importing this package loads nothing heavy: each name below is imported from its module on
first use (so ``mtl-opt --help`` starts without torch); the methods register themselves when the
registry is first asked. Studies (pandas, plotly, Ray) load their dependencies when they run.
"""

from importlib import import_module
from typing import Any

# public name -> the module that defines it (imported on first access, PEP 562)
_EXPORTS = {
    "AggregationResult": "mtl_opt.aggregator",
    "GradientAggregator": "mtl_opt.aggregator",
    "GramianAggregator": "mtl_opt.aggregator",
    "BatchedJacobianFallbackWarning": "mtl_opt.backward",
    "MTLBackwardResult": "mtl_opt.backward",
    "loss_weights": "mtl_opt.backward",
    "mtl_backward": "mtl_opt.backward",
    "LossWeighting": "mtl_opt.loss_weighting",
    "aggregate_many": "mtl_opt.many",
    "MultiTaskOptimizer": "mtl_opt.optimizer",
    "aggregator_class": "mtl_opt.registry",
    "available_aggregators": "mtl_opt.registry",
    "describe_aggregators": "mtl_opt.registry",
    "get_aggregator": "mtl_opt.registry",
    "parse_method_spec": "mtl_opt.registry",
    "register_aggregator": "mtl_opt.registry",
}
_SUBPACKAGES = ("methods", "problems", "experiments")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = import_module(f"mtl_opt.{name}")
    else:
        raise AttributeError(f"module 'mtl_opt' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBPACKAGES})


__version__ = "0.1.0"

__all__ = [
    "AggregationResult",
    "BatchedJacobianFallbackWarning",
    "MTLBackwardResult",
    "MultiTaskOptimizer",
    "loss_weights",
    "mtl_backward",
    "GradientAggregator",
    "GramianAggregator",
    "LossWeighting",
    "aggregate_many",
    "aggregator_class",
    "available_aggregators",
    "describe_aggregators",
    "get_aggregator",
    "parse_method_spec",
    "register_aggregator",
    "__version__",
]
