"""IMTL-G: the update whose projections onto every unit task gradient are equal."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtl_opt.aggregator import GramianAggregator
from mtl_opt.methods._combinations import two_task_weights
from mtl_opt.methods._spectral import pinv_apply, pinv_apply_two
from mtl_opt.registry import register_aggregator

#: ``|1ᵀ M⁺ s|`` below this fraction of ``‖M⁺ s‖₁`` counts as zero (no normalisable weights).
_ZERO_SUM_RTOL = 1e-12


@register_aggregator("imtl_g")
class IMTLG(GramianAggregator):
    """IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021), gradient part.

    Find ``d = Σ_i α_i g_i`` with ``Σ_i α_i = 1`` whose projection on every unit gradient
    ``u_i = g_i/‖g_i‖`` is the same: ``dᵀu_i = dᵀu_1`` for all i. The paper's closed form is
    ``α_{2:K} = g_1 Uᵀ (D Uᵀ)⁻¹`` with rows ``D_i = g_1 − g_i``, ``U_i = u_1 − u_i``. On the
    Gramian the conditions read ``(Mα)_i / √M_ii = c`` for all i, so

        α = M⁻¹ s / (1ᵀ M⁻¹ s),      s = (√M_11, …, √M_KK),

    with the Moore–Penrose inverse ``M⁺`` in place of ``M⁻¹`` when rows are linearly dependent
    (the generalisation of Quinton & Rey, arXiv 2406.16232, also used by TorchJD): eigenvalues
    below ``K · ε · λ_max`` are dropped (the rank rule of ``torch.linalg.pinv``). When
    ``1ᵀM⁺s`` vanishes (relative to ``‖M⁺s‖₁``; e.g. all gradients zero) the weights are zero.

    Properties (tested): permutation invariant; linear under ``G → sG`` (α is scale-free); equal
    projections ``dᵀu_i``. The common projection ``c = 1/(1ᵀM⁻¹s)`` can be negative for strongly
    conflicting rows: IMTL-G is not a non-conflicting method. The loss-scale part of IMTL
    (IMTL-L, learned per-task loss scales) is a loss weighting and not part of this method.
    """

    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        if M.shape[1] == 2:
            return two_task_weights(imtl_g_two, M)
        A = M.numpy()
        scale = np.diagonal(A, axis1=1, axis2=2).max(axis=1)
        A = A / np.where(scale > 0.0, scale, 1.0)[:, None, None]
        s = np.sqrt(np.maximum(np.diagonal(A, axis1=1, axis2=2), 0.0))
        v = pinv_apply(A, s)
        total = v.sum(axis=1, keepdims=True)
        ok = np.abs(total) > _ZERO_SUM_RTOL * np.abs(v).sum(axis=1, keepdims=True)
        return torch.from_numpy(np.where(ok, v / np.where(ok, total, 1.0), 0.0))

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        if M.shape[0] == 2:  # the closed form on floats (the batch runs it on arrays)
            return two_task_weights(imtl_g_two, M)
        return self._batch_weights(M[None], losses=None, task_weights=None)[0]


def imtl_g_two(m11, m12, m22, xp):  # type: ignore[no-untyped-def]
    """IMTL-G's weights at K = 2, ``α = M⁺s / 1ᵀM⁺s`` with the same normalisation, rank rule
    and zero-sum test as the general path, ``M⁺`` in closed form
    (:func:`mtl_opt.methods._spectral.pinv_apply_two`); on floats or (B,) arrays."""
    scale = xp.maximum(m11, m22)
    safe = xp.where(scale > 0.0, scale, 1.0)
    a, b, c = m11 / safe, m12 / safe, m22 / safe
    v1, v2 = pinv_apply_two(a, b, c, xp.sqrt(xp.maximum(a, 0.0)), xp.sqrt(xp.maximum(c, 0.0)), xp)
    total = v1 + v2
    ok = abs(total) > _ZERO_SUM_RTOL * (abs(v1) + abs(v2))
    safe_total = xp.where(ok, total, 1.0)
    return xp.where(ok, v1 / safe_total, 0.0), xp.where(ok, v2 / safe_total, 0.0)
