"""UPGrad: the mean of every row's projection onto the dual cone of the rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtl_opt.aggregator import GramianAggregator
from mtl_opt.solvers import dual_cone_weights
from mtl_opt.methods._preference import check_preference, preference_for
from mtl_opt.registry import register_aggregator


@register_aggregator("upgrad")
class UPGrad(GramianAggregator):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232).

    Each row is projected onto the dual cone ``C = {x : G x ≥ 0}`` of all rows and the projections
    are combined with the preference vector ``p`` (default ``1/K``: their mean):

        d = Σ_i p_i π_C(g_i),      π_C(Gᵀu) = Gᵀ(u + v*),   v* = argmin_{v≥0} ½(u+v)ᵀM(u+v),

    so ``β = Σ_i (p_i e_i + v*_i)`` with one K-variable QP per task, solved exactly by
    :func:`mtl_opt.solvers.dual_cone_weights` (active set with a KKT certificate; it raises
    :class:`mtl_opt.solvers.DualConeError` rather than return an uncertified answer).

    Properties (tested): the direction conflicts with no task (``G d ≥ 0``, as a sum of points of
    the cone, when ``p ≥ 0``); it is zero at Pareto-stationary points (0 in the convex hull of the
    rows); permutation invariant; linear under ``G → sG`` (``β`` is scale-free).

    Difference from TorchJD 0.18 (``torchjd.aggregation.UPGrad``, the authors' library): it
    solves the same QP with quadprog on ``M / tr(M) + 10⁻⁴ I`` (``reg_eps = 10⁻⁴``, added so
    quadprog sees a positive definite matrix). Here the ridge is 10⁻¹² relative to each
    ``M_ii`` (see :mod:`mtl_opt.solvers.dual_cone`), so the two differ by the effect of TorchJD's
    ridge (a relative 10⁻⁴ and more when rows nearly oppose: cosine 0.96 between the two
    directions on the benchmark's two-task Jacobian); on TorchJD's ridged Gramian they agree to
    quadprog's precision (see the tests).

    Args:
        pref_vector: the weights ``p`` of the projected rows (length K); ``None`` = ``1/K`` each.
    """

    properties = frozenset({  # checked in tests/test_method_properties.py
        "non_conflicting", "permutation_invariant", "linear_under_scaling",
        "stationary_at_pareto_stationary",
    })

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None) -> None:
        self.pref_vector = check_preference(pref_vector, "UPGrad")

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        B, K = M.shape[0], M.shape[1]
        p = preference_for(self.pref_vector, K, 1.0 / K, "UPGrad")
        U = np.broadcast_to(np.diag(p), (B, K, K))
        return torch.from_numpy(dual_cone_weights(M.numpy(), U).sum(axis=1))

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        # One Gramian: the same solver on lists of floats (no arrays: a few µs instead of tens).
        K = M.shape[0]
        p = [1.0 / K] * K if self.pref_vector is None else preference_for(self.pref_vector, K, 1.0 / K, "UPGrad").tolist()
        W = dual_cone_weights(M.tolist(), [[p[i] if j == i else 0.0 for j in range(K)] for i in range(K)])
        return torch.tensor([sum(col) for col in zip(*W)], dtype=torch.float64)
