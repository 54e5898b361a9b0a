"""Built-in aggregation methods, one module each. Importing this package registers them.

Registration order is the order of ``mtl_opt.available_aggregators()`` and of every table.
"""

from mtl_opt.methods.linear_scalarization import LinearScalarization
from mtl_opt.methods.pcgrad import PCGrad
from mtl_opt.methods.mgda import MGDA
from mtl_opt.methods.cagrad import CAGrad
from mtl_opt.methods.nash_mtl import NashMTL, NashSolverError
from mtl_opt.methods.came_grad import CAMEGrad

__all__ = [
    "CAGrad",
    "CAMEGrad",
    "LinearScalarization",
    "MGDA",
    "NashMTL",
    "NashSolverError",
    "PCGrad",
]
