"""The K × K problems of the Gramian methods, each solved exactly behind ONE entry point.

Every Gramian method turns ``M = G Gᵀ`` into row coefficients ``β``; the recurring sub-problems
live here, one module per problem, one public function each:

==========================  ============================================  ==========================
problem                     entry point                                   used by
==========================  ============================================  ==========================
min-norm point of the hull  :func:`min_norm_weights` (``min_norm``)       MGDA, runner metrics
conflict-averse (CAGrad's   :func:`conflict_averse` (``cagrad_dual``)     CAGrad, CAME-Grad
trust-region dual)
dual-cone projection        :func:`dual_cone_weights` (``dual_cone``)     UPGrad, DualProj
Nash bargaining             :func:`nash_weights` (``nash``)               Nash-MTL
α-fair allocation           :func:`alpha_fair_weights` (``alpha_fair``)   FairGrad
==========================  ============================================  ==========================

Each entry point takes one Gramian (K, K) or a batch (B, K, K), works in float64 on the CPU in
normalised units (tolerances relative to ``max_i M_ii``), uses the K = 2 closed form where there
is one (written once, evaluated on Python floats for a single call and on arrays for a batch),
and for a single small Gramian a solver on Python floats (a NumPy call costs more than the
arithmetic at K ≤ 8). Thresholds follow the Gramian's precision (:func:`gramian_precision`,
set by the aggregators from :func:`mtl_opt._validation.gramian_rtol`). An answer is returned
only with its certificate (KKT conditions, a primal/dual gap, a residual); otherwise a
:class:`SolverError` subclass names the problem, the failed test and the Gramian.
"""

from mtl_opt.solvers._precision import ZERO_NORM_RTOL, SolverError, gramian_precision, zero_norm_rtol
from mtl_opt.solvers.alpha_fair import FairGradSolverError, alpha_fair_weights
from mtl_opt.solvers.cagrad_dual import ConflictAverseSolverError, conflict_averse
from mtl_opt.solvers.dual_cone import DualConeError, dual_cone_weights
from mtl_opt.solvers.min_norm import MinNormSolverError, min_norm_weights
from mtl_opt.solvers.nash import NashSolverError, nash_weights

__all__ = [
    "ZERO_NORM_RTOL",
    "ConflictAverseSolverError",
    "DualConeError",
    "FairGradSolverError",
    "MinNormSolverError",
    "NashSolverError",
    "SolverError",
    "alpha_fair_weights",
    "conflict_averse",
    "dual_cone_weights",
    "gramian_precision",
    "min_norm_weights",
    "nash_weights",
    "zero_norm_rtol",
]
