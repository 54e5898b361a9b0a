"""Built-in aggregation methods, one module each. Importing this package registers them."""

from mtl_opt.methods.linear_scalarization import LinearScalarization
from mtl_opt.methods.nash_mtl import NashMTL, NashSolverError

__all__ = ["LinearScalarization", "NashMTL", "NashSolverError"]
