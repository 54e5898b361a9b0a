"""Built-in aggregation methods, one module each. Importing this package registers them."""

from mtl_opt.methods.linear_scalarization import LinearScalarization
from mtl_opt.methods.pcgrad import PCGrad
from mtl_opt.methods.mgda import MGDA
from mtl_opt.methods.cagrad import CAGrad
from mtl_opt.methods.came_grad import CAMEGrad
from mtl_opt.methods.nash_mtl import NashMTL, NashSolverError

__all__ = ["CAGrad", "CAMEGrad", "LinearScalarization", "MGDA", "NashMTL", "NashSolverError", "PCGrad"]
