"""Built-in aggregation methods, one module each. Importing this package registers them.

Registration order is the order of ``mtl_opt.available_aggregators()`` and of every table.
"""

from mtl_opt.methods.linear_scalarization import LinearScalarization
from mtl_opt.methods.pcgrad import PCGrad
from mtl_opt.methods.mgda import MGDA
from mtl_opt.methods.cagrad import CAGrad
from mtl_opt.methods.nash_mtl import NashMTL, NashSolverError
from mtl_opt.methods.came_grad import CAMEGrad
from mtl_opt.methods.upgrad import UPGrad
from mtl_opt.methods.dualproj import DualProj
from mtl_opt.methods.imtl_g import IMTLG
from mtl_opt.methods.aligned_mtl import AlignedMTL
from mtl_opt.methods.config import ConFIG
from mtl_opt.methods.fairgrad import FairGrad, FairGradSolverError
from mtl_opt.methods.gradvac import GradVac
from mtl_opt.methods.graddrop import GradDrop
from mtl_opt.methods.rgw import RGW
from mtl_opt.methods.db_mtl import DBMTL
from mtl_opt.methods.moco import MoCo
from mtl_opt.methods.gradnorm import GradNorm
from mtl_opt.methods.pcd import PCD
from mtl_opt.methods.uw import UncertaintyWeighting
from mtl_opt.methods.dwa import DWA
from mtl_opt.methods.rlw import RLW
from mtl_opt.methods.gls import GeometricLossStrategy
from mtl_opt.methods.famo import FAMO
from mtl_opt.methods.stch import STCH
from mtl_opt.methods.imtl_l import IMTLL
from mtl_opt.methods.si import ScaleInvariant

__all__ = [
    "AlignedMTL",
    "CAGrad",
    "CAMEGrad",
    "ConFIG",
    "DBMTL",
    "DWA",
    "DualProj",
    "FAMO",
    "FairGrad",
    "FairGradSolverError",
    "GeometricLossStrategy",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "IMTLG",
    "IMTLL",
    "LinearScalarization",
    "MGDA",
    "MoCo",
    "NashMTL",
    "NashSolverError",
    "PCD",
    "PCGrad",
    "RGW",
    "RLW",
    "STCH",
    "ScaleInvariant",
    "UPGrad",
    "UncertaintyWeighting",
]
