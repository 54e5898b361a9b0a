"""mtl_opt: multi-task gradient aggregation behind one interface.

A Jacobian ``G`` (one row per task) goes in, one update direction comes out::

    import mtl_opt
    agg = mtl_opt.get_aggregator("came_grad")      # rho=0.5, kappa=1.5, nu=0.2
    direction = agg(G)                              # (K, d) -> (d,)

Importing this package loads torch, numpy and scipy only; studies (pandas, plotly, Ray) load
their dependencies when they run.
"""

from mtl_opt.aggregator import AggregationResult, GradientAggregator, GramianAggregator
from mtl_opt.backward import (
    BatchedJacobianFallbackWarning,
    MTLBackwardResult,
    loss_weights,
    mtl_backward,
)
from mtl_opt.loss_weighting import LossWeighting
from mtl_opt.many import aggregate_many
from mtl_opt.optimizer import MultiTaskOptimizer
from mtl_opt.registry import (
    aggregator_class,
    available_aggregators,
    describe_aggregators,
    get_aggregator,
    parse_method_spec,
    register_aggregator,
)

# Importing the methods package registers every built-in method.
from mtl_opt import methods  # noqa: E402,F401  (registration side effect)

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
