"""Scalar closed forms of the K = 2 weight problems, for a single (unbatched) call.

At K = 2 every Gramian method reduces to a handful of float operations on the three entries
``M11, M12, M22``. The vectorised NumPy forms in :mod:`mtl_opt.simplex` cost tens of microseconds
on a batch of one (array creation and ufunc dispatch dominate), so the methods' single-call
``_weights`` read the entries once as Python floats and evaluate the same formulas here, in the
same order of operations as the batched path (so both give the same IEEE results; the tests
compare them). The batched path stays the reference; rare branches that need more than a closed
form (the cone projection at the origin of the hull) return ``None`` so that the caller falls back
to it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from mtl_opt.simplex import zero_norm_rtol

__all__ = ["conflict_averse_2", "min_norm_2", "weight_pair", "weight_vector"]

_INF = math.inf


def weight_pair(beta1: float, beta2: float) -> Tensor:
    """``β = (β1, β2)`` as a float64 tensor (see :func:`weight_vector`)."""
    return weight_vector([beta1, beta2])


def weight_vector(beta: list[float]) -> Tensor:
    """``β`` (Python floats) as a float64 tensor (through NumPy: a few times cheaper than
    ``torch.tensor`` on a Python list)."""
    return torch.from_numpy(np.array(beta, dtype=np.float64))


def min_norm_2(m11: float, m12: float, m22: float) -> float:
    """``α1`` of ``argmin_{α∈Δ} αᵀMα`` at K = 2: ``clip((M22 − M12)/(M11 + M22 − 2M12), 0, 1)``.

    A zero denominator (identical rows) gives ``α1 = ½`` (every ``α`` is optimal then), as in
    the batched closed form.
    """
    D = m11 + m22 - 2.0 * m12
    if D > 0:
        return min(max((m22 - m12) / D, 0.0), 1.0)
    return 0.5


def conflict_averse_2(m11: float, m12: float, m22: float, c: float) -> tuple[float, float] | None:
    """Coefficients ``γ = 1/2 + (s/r) w*`` of the conflict-averse problem at K = 2, or ``None``.

    ``w* = argmin_{w∈Δ} wᵀM1/2 + s √(wᵀMw)`` with ``s = c‖g0‖``: the best of the two vertices and
    the edge's stationary point (see ``_conflict_averse_small`` in :mod:`mtl_opt.simplex` for the
    derivation; this is the same computation on floats). ``None`` when the optimum is at the origin
    of the hull with ``s > 0`` (the direction then needs a cone projection: the caller uses the
    batched solver).
    """
    b1 = 0.5 * (m11 + m12)
    b2 = 0.5 * (m12 + m22)
    s = c * math.sqrt(max(0.5 * (b1 + b2), 0.0))
    r1 = math.sqrt(max(m11, 0.0))
    r2 = math.sqrt(max(m22, 0.0))
    F1 = b1 + s * r1
    F2 = b2 + s * r2
    D = m11 + m22 - 2.0 * m12
    dm = m22 - m11
    den = 4.0 * D * s * s - dm * dm
    Fe = _INF
    t = w1e = 0.0
    if D > 1e-15 * max(m11, m22) and den > 0.0:
        t = math.sqrt(max(4.0 * (m11 * m22 - m12 * m12), 0.0) / den)
        w1e = (m22 - m12 + 0.5 * t * dm) / D
        if 0.0 < w1e < 1.0:
            Fe = b2 + w1e * (b1 - b2) + s * s * t
    if F1 <= F2 and F1 <= Fe:
        w1, r = 1.0, r1
    elif F2 <= Fe:
        w1, r = 0.0, r2
    else:
        w1, r = w1e, s * t
    w2 = 1.0 - w1
    if s > 0.0:
        if not r * r > zero_norm_rtol() * max(m11, m22):
            return None
        factor = s / r
    else:
        factor = 0.0
    return 0.5 + factor * w1, 0.5 + factor * w2
