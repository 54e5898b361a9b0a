"""Aligned-MTL: align the principal components of the task gradients (equal singular values)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtl_opt._validation import check_choice
from mtl_opt.aggregator import GramianAggregator
from mtl_opt.methods._preference import check_preference, preference_for
from mtl_opt.methods._combinations import two_task_weights
from mtl_opt.methods._spectral import eigh_two, eigh_with_rank
from mtl_opt.registry import register_aggregator

_SCALE_MODES = ("min", "median", "rmse")
#: Rank tolerance: the epsilon of the Gramian's dtype (float64 here), as in TorchJD; the authors'
#: code used ``torch.finfo().eps``, the default dtype's, which was their tensors' float32.
_RANK_EPS = float(np.finfo(np.float64).eps)


@register_aggregator("aligned_mtl")
class AlignedMTL(GramianAggregator):
    """Aligned-MTL: gradients aligned to equal singular values (Senushkin et al., CVPR 2023).

    Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023, Algorithm 1.

    With the eigen-decomposition ``M = G Gᵀ = V Λ Vᵀ`` restricted to its numerical rank ``r``
    (eigenvalues above ``λ_max · K · ε``, the authors' rule with the float64 ε of the Gramian
here; they trained in float32 and used its ε, so an eigenvalue between the two rules, e.g.
a task whose gradient is 10⁻⁴ times smaller than another's, counts here and not there), the balance
    transformation

        B = √λ_s · V_r Λ_r^{-1/2} V_rᵀ

    makes the aligned gradients ``Ĝ = Bᵀ G`` orthogonal with equal norms ``√λ_s`` (``ĜĜᵀ`` is
    ``λ_s`` times the projector onto the row space), and ``d = pᵀĜ``, i.e. ``β = B p``.
    ``scale_mode`` chooses ``λ_s`` as in the authors' code (``ProcrustesSolver``): ``"min"`` the
    smallest kept eigenvalue (default), ``"median"`` the median one (``torch.median``'s lower
    median for an even count), ``"rmse"`` the mean eigenvalue. The authors sum the aligned
    gradients (``p = 1``, the default here, as in LibMTL); TorchJD 0.18 averages them
    (``p = 1/K``: a direction K times shorter). All-zero Gramians give ``β = p`` (zero direction).

    Properties (tested): permutation invariant; linear under ``G → sG``.

    Args:
        pref_vector: the weights ``p`` of the aligned gradients; ``None`` = all ones.
        scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.
    """

    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None, scale_mode: str = "min") -> None:
        self.pref_vector = check_preference(pref_vector, "AlignedMTL")
        self.scale_mode = check_choice("scale_mode", scale_mode, _SCALE_MODES, owner="AlignedMTL")

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        Bn, K = M.shape[0], M.shape[1]
        if K == 2:
            return two_task_weights(aligned_mtl_two, M, *self._two_preference(), self.scale_mode)
        Mn = M.numpy()
        p = preference_for(self.pref_vector, K, 1.0, "AlignedMTL")
        lam, V, keep = eigh_with_rank(Mn, _RANK_EPS)
        out = np.empty((Bn, K))
        for b in range(Bn):
            kept = lam[b][keep[b]]  # ascending
            if kept.size == 0:
                out[b] = p
                continue
            if self.scale_mode == "min":
                lam_s = kept[0]
            elif self.scale_mode == "median":
                lam_s = kept[(kept.size - 1) // 2]
            else:
                lam_s = kept.mean()
            Vr = V[b][:, keep[b]]
            out[b] = Vr @ ((np.sqrt(lam_s) / np.sqrt(kept)) * (Vr.T @ p))
        return torch.from_numpy(out)

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        if M.shape[0] == 2:  # the closed form on floats (the batch runs it on arrays)
            return two_task_weights(aligned_mtl_two, M, *self._two_preference(), self.scale_mode)
        return self._batch_weights(M[None], losses=None, task_weights=None)[0]

    def _two_preference(self) -> tuple[float, float]:
        if self.pref_vector is None:
            return 1.0, 1.0
        p1, p2 = preference_for(self.pref_vector, 2, 1.0, "AlignedMTL").tolist()
        return p1, p2


def aligned_mtl_two(m11, m12, m22, p1, p2, scale_mode, xp):  # type: ignore[no-untyped-def]
    """Aligned-MTL's ``β = B p`` at K = 2 with the eigen-decomposition in closed form
    (:func:`mtl_opt.methods._spectral.eigh_two`, on ``M / max_i M_ii``: the ratios ``λ_s/λ``
    and the rank rule are scale-free); on floats or (B,) arrays. With two eigenvalues kept the
    smallest is both the ``"min"`` and the (lower) ``"median"`` one; with one kept it is ``λ_s``."""
    scale = xp.maximum(m11, m22)
    safe = xp.where(scale > 0.0, scale, 1.0)
    l1, l2, vx, vy = eigh_two(m11 / safe, m12 / safe, m22 / safe, xp)
    tol = xp.maximum(l2 * (2 * _RANK_EPS), 0.0)
    k1, k2 = l1 > tol, l2 > tol
    lam_s = xp.where(k1, 0.5 * (l1 + l2) if scale_mode == "rmse" else l1, l2)
    f1 = xp.where(k1, xp.sqrt(xp.maximum(lam_s / xp.where(k1, l1, 1.0), 0.0)), 0.0)
    f2 = xp.where(k2, xp.sqrt(xp.maximum(lam_s / xp.where(k2, l2, 1.0), 0.0)), 0.0)
    c2 = f2 * (vx * p1 + vy * p2)
    c1 = f1 * (vx * p2 - vy * p1)
    b1, b2 = vx * c2 - vy * c1, vy * c2 + vx * c1
    none = xp.not_(k2)  # every eigenvalue zero: β = p (a zero direction)
    return xp.where(none, p1, b1), xp.where(none, p2, b2)
