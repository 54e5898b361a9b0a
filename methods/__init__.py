"""Built-in aggregation methods, one module each. Importing this package registers them.

Registration order is the order of ``mtl_opt.available_aggregators()`` and of every table.
"""

from mtl_opt.methods.linear_scalarization import LinearScalarization
from mtl_opt.methods.pcgrad import PCGrad
from mtl_opt.methods.mgda import MGDA
from mtl_opt.methods.cagrad import CAGrad
from mtl_opt.methods.nash_mtl import NashMTL, NashSolverError
from mtl_opt.methods.came_grad import CAMEGrad
from mtl_opt.methods.graddrop import GradDrop
from mtl_opt.methods.rgw import RGW
from mtl_opt.methods.db_mtl import DBMTL
from mtl_opt.methods.moco import MoCo
from mtl_opt.methods.gradnorm import GradNorm
from mtl_opt.methods.pcd import PCD

__all__ = [
    "CAGrad",
    "CAMEGrad",
    "DBMTL",
    "GradDrop",
    "GradNorm",
    "LinearScalarization",
    "MGDA",
    "MoCo",
    "NashMTL",
    "NashSolverError",
    "PCD",
    "PCGrad",
    "RGW",
]
