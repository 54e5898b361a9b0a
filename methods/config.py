"""ConFIG: the conflict-free direction with equal cosine to every task gradient."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtl_opt.aggregator import GramianAggregator
from mtl_opt.methods._preference import check_preference, preference_for
from mtl_opt.methods._spectral import pinv_apply
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
        Mn = M.numpy()
        K = Mn.shape[1]
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
        ok = sq > 1e-24 * np.maximum(scale, np.finfo(np.float64).tiny) * np.abs(beta0).sum(axis=1) ** 2
        factor = np.where(ok, length / np.where(ok, sq, 1.0), 0.0)
        return torch.from_numpy(beta0 * factor[:, None])

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        return self._batch_weights(M[None], losses=None, task_weights=None)[0]
