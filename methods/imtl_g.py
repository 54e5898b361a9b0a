"""IMTL-G: the update whose projections onto every unit task gradient are equal."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtl_opt.aggregator import GramianAggregator
from mtl_opt.methods._spectral import pinv_apply
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
        A = M.numpy()
        scale = np.diagonal(A, axis1=1, axis2=2).max(axis=1)
        A = A / np.where(scale > 0.0, scale, 1.0)[:, None, None]
        s = np.sqrt(np.maximum(np.diagonal(A, axis1=1, axis2=2), 0.0))
        v = pinv_apply(A, s)
        total = v.sum(axis=1, keepdims=True)
        ok = np.abs(total) > _ZERO_SUM_RTOL * np.abs(v).sum(axis=1, keepdims=True)
        return torch.from_numpy(np.where(ok, v / np.where(ok, total, 1.0), 0.0))

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        return self._batch_weights(M[None], losses=None, task_weights=None)[0]
