"""Precision settings and the error type shared by the K × K solvers.

Every solver works in float64 on the CPU with tolerances relative to ``max_i M_ii``. A Gramian
formed from a less precise or wider Jacobian is only known to a relative ``rtol`` (see
:func:`mtl_opt._validation.gramian_rtol`); the aggregators run their solves inside
:func:`gramian_precision` so that a combination of rows that is zero to that precision is
treated as zero instead of being divided by.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

__all__ = ["ZERO_NORM_RTOL", "SolverError", "gramian_precision", "zero_norm_rtol"]


class SolverError(RuntimeError):
    """A K × K solver could not certify its answer (it never returns an uncertified one).

    The message names the problem, the violated certificate and the (normalised) Gramian.
    Each problem has its own subclass (:class:`~mtl_opt.solvers.MinNormSolverError`,
    :class:`~mtl_opt.solvers.ConflictAverseSolverError`,
    :class:`~mtl_opt.solvers.DualConeError`, :class:`~mtl_opt.solvers.NashSolverError`,
    :class:`~mtl_opt.solvers.FairGradSolverError`).
    """


#: A combination ``x = Gᵀw`` with ``‖x‖² ≤ ZERO_NORM_RTOL · max_i M_ii`` counts as the zero vector
#: (below this the Gramian's float64 rounding dominates ``wᵀMw``). This is the floor: a Gramian
#: formed from a less precise or wider Jacobian raises the threshold for its solve (see
#: :func:`zero_norm_rtol`).
ZERO_NORM_RTOL = 1e-14

_ZERO_NORM_RTOL: ContextVar[float] = ContextVar("zero_norm_rtol", default=ZERO_NORM_RTOL)

#: KKT tolerance relative to ``max_i M_ii`` (objective gap ≤ 2 · this · scale).
KKT_RTOL = 1e-10
#: float64 unit roundoff.
EPS = float(np.finfo(np.float64).eps)


def zero_norm_rtol() -> float:
    """The zero-norm threshold of the solve in progress (relative to ``max_i M_ii``).

    ``ZERO_NORM_RTOL`` unless the solve runs inside :func:`gramian_precision`: the aggregators
    pass the relative precision of the Gramian and of the direction they will form from it
    (:func:`mtl_opt._validation.gramian_rtol`), so that a combination that is zero to that
    precision is treated as zero instead of being divided by (a float32 Gramian's rounding
    noise would otherwise pass for a direction and get weights ~1e6).
    """
    return _ZERO_NORM_RTOL.get()


@contextmanager
def gramian_precision(rtol: float | None) -> Iterator[None]:
    """Run the solves inside with the zero-norm threshold ``max(ZERO_NORM_RTOL, rtol)``."""
    if rtol is None or not rtol > ZERO_NORM_RTOL:
        yield
        return
    token = _ZERO_NORM_RTOL.set(float(rtol))
    try:
        yield
    finally:
        _ZERO_NORM_RTOL.reset(token)
