"""DualProj: the projection of the mean gradient onto the dual cone of the rows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mtl_opt.aggregator import GramianAggregator
from mtl_opt.solvers import dual_cone_weights
from mtl_opt.methods._preference import check_preference, preference_for
from mtl_opt.registry import register_aggregator


@register_aggregator("dualproj")
class DualProj(GramianAggregator):
    """DualProj (Quinton & Rey, arXiv 2406.16232; the projection of GEM, Lopez-Paz & Ranzato 2017).

    The preference-weighted combination of the rows (default ``p = 1/K``: the mean gradient) is
    projected onto the dual cone ``C = {x : G x ≥ 0}``:

        d = π_C(Gᵀp) = Gᵀ(p + v*),      v* = argmin_{v≥0} ½(p+v)ᵀM(p+v),

    one K-variable QP solved exactly by :func:`mtl_opt.solvers.dual_cone_weights` (active set,
    KKT certificate, :class:`mtl_opt.solvers.DualConeError` when it cannot certify).

    Properties (tested): non-conflicting (``G d ≥ 0``); zero at Pareto-stationary points;
    permutation invariant; linear under ``G → sG``. Difference from TorchJD 0.18's ``DualProj``:
    the same as for :class:`mtl_opt.methods.UPGrad` (TorchJD adds ``10⁻⁴ I`` to ``M / tr M``).

    Args:
        pref_vector: the weights ``p`` (length K); ``None`` = ``1/K`` each.
    """

    properties = frozenset({  # checked in tests/test_method_properties.py
        "non_conflicting", "permutation_invariant", "linear_under_scaling",
        "stationary_at_pareto_stationary",
    })

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None) -> None:
        self.pref_vector = check_preference(pref_vector, "DualProj")

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        B, K = M.shape[0], M.shape[1]
        p = preference_for(self.pref_vector, K, 1.0 / K, "DualProj")
        U = np.broadcast_to(p, (B, 1, K))
        return torch.from_numpy(dual_cone_weights(M.numpy(), U)[:, 0])

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        # One Gramian: the same solver on lists of floats (no arrays: a few µs instead of tens).
        K = M.shape[0]
        p = [1.0 / K] * K if self.pref_vector is None else preference_for(self.pref_vector, K, 1.0 / K, "DualProj").tolist()
        return torch.tensor(dual_cone_weights(M.tolist(), [p])[0], dtype=torch.float64)
