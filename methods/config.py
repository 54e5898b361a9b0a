"""ConFIG: the conflict-free direction with equal cosine to every task gradient."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtl_opt.aggregator import GramianAggregator
from mtl_opt.methods._preference import check_preference, preference_for
from mtl_opt.methods._combinations import two_task_weights
from mtl_opt.methods._spectral import pinv_apply, pinv_apply_two
from mtl_opt.registry import register_aggregator


@register_aggregator("config")
class ConFIG(GramianAggregator):
    """ConFIG: the direction with equal cosine to every task gradient (Liu et al., ICLR 2025).

    Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025, Eq. 2 with the authors' defaults (``conflictfree.ConFIG_update`` with
    equal weights and the projection length).

    With unit rows ``U = D^{-1/2} G`` (``D = diag(M)``; zero rows stay zero) and weights ``p``
    (default all ones), the direction is the least-squares (minimum-norm) solution of
    ``U x = p`` — the vector whose cosine with each task gradient is proportional to ``p`` —
    normalised, and rescaled to the sum of the gradients' projections on it:

        x = U⁺p,   x̂ = x/‖x‖,   d = (Σ_i g_iᵀx̂) x̂.

    On the Gramian: ``U⁺p = Gᵀβ₀`` with ``β₀ = D^{-1/2} C⁺ p`` (``C = D^{-1/2} M D^{-1/2}`` the
    cosine matrix, pseudo-inverse over eigenvalues above ``K · ε · λ_max``), hence

        β = β₀ · (1ᵀMβ₀) / (β₀ᵀMβ₀),

    and ``β = 0`` when ``β₀ᵀMβ₀`` vanishes (``p`` orthogonal to the rows' span, e.g. two exactly
    opposing gradients). Properties (tested): with linearly independent rows and ``p > 0`` every
    task's cosine with ``d`` is equal and positive (non-conflicting); permutation invariant;
    linear under ``G → sG``. The authors' code computes ``U⁺p`` by ``torch.linalg.lstsq`` on the
    ``K × d`` unit rows; the Gramian form gives the same vector (see the tests) without a
    ``d``-sized solve. The optional momentum variant (M-ConFIG) is not included.

    Args:
        pref_vector: the weights ``p`` (length K); ``None`` = all ones.
    """

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None) -> None:
        self.pref_vector = check_preference(pref_vector, "ConFIG")

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        K = M.shape[1]
        if K == 2:
            return two_task_weights(config_two, M, *self._two_preference())
        Mn = M.numpy()
        p = preference_for(self.pref_vector, K, 1.0, "ConFIG")
        diag = np.diagonal(Mn, axis1=1, axis2=2)
        active = diag > 0.0
        inv_norm = np.where(active, 1.0 / np.sqrt(np.where(active, diag, 1.0)), 0.0)
        C = Mn * inv_norm[:, :, None] * inv_norm[:, None, :]
        beta0 = inv_norm * pinv_apply(C, np.broadcast_to(p, inv_norm.shape))
        M_beta0 = np.einsum("bij,bj->bi", Mn, beta0)
        sq = np.einsum("bi,bi->b", beta0, M_beta0)
        length = M_beta0.sum(axis=1)
        scale = np.max(diag, axis=1)
        ok = sq > _ZERO_RTOL * np.maximum(scale, _TINY) * np.abs(beta0).sum(axis=1) ** 2
        factor = np.where(ok, length / np.where(ok, sq, 1.0), 0.0)
        return torch.from_numpy(beta0 * factor[:, None])

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        if M.shape[0] == 2:  # the closed form on floats (the batch runs it on arrays)
            return two_task_weights(config_two, M, *self._two_preference())
        return self._batch_weights(M[None], losses=None, task_weights=None)[0]

    def _two_preference(self) -> tuple[float, float]:
        if self.pref_vector is None:
            return 1.0, 1.0
        p1, p2 = preference_for(self.pref_vector, 2, 1.0, "ConFIG").tolist()
        return p1, p2


#: ``β₀ᵀMβ₀`` below this fraction of ``max_i M_ii (Σ|β₀_i|)²`` counts as zero.
_ZERO_RTOL = 1e-24
_TINY = float(np.finfo(np.float64).tiny)


def config_two(m11, m12, m22, p1, p2, xp):  # type: ignore[no-untyped-def]
    """ConFIG's weights at K = 2: the general path's steps (unit rows, ``β₀ = D^{-1/2} C⁺ p``,
    rescaling by ``1ᵀMβ₀ / β₀ᵀMβ₀``) with ``C⁺`` in closed form
    (:func:`mtl_opt.methods._spectral.pinv_apply_two`); on floats or (B,) arrays."""
    on1, on2 = m11 > 0.0, m22 > 0.0
    i1 = xp.where(on1, 1.0 / xp.sqrt(xp.where(on1, m11, 1.0)), 0.0)
    i2 = xp.where(on2, 1.0 / xp.sqrt(xp.where(on2, m22, 1.0)), 0.0)
    y1, y2 = pinv_apply_two(m11 * i1 * i1, m12 * i1 * i2, m22 * i2 * i2, p1, p2, xp)
    b1, b2 = i1 * y1, i2 * y2
    mb1, mb2 = m11 * b1 + m12 * b2, m12 * b1 + m22 * b2
    sq = b1 * mb1 + b2 * mb2
    ok = sq > _ZERO_RTOL * xp.maximum(xp.maximum(m11, m22), _TINY) * (abs(b1) + abs(b2)) ** 2
    factor = xp.where(ok, (mb1 + mb2) / xp.where(ok, sq, 1.0), 0.0)
    return b1 * factor, b2 * factor
