"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtl_opt._validation import check_choice
from mtl_opt.aggregator import GramianAggregator
from mtl_opt.methods._state import SeededGenerator
from mtl_opt.registry import register_aggregator

_ORDERS = ("random", "fixed")
#: The seeds torch.Generator.manual_seed accepts: 64-bit integers, signed or unsigned.


@register_aggregator("pcgrad")
class PCGrad(SeededGenerator, GramianAggregator):
    """PCGrad (Yu et al. 2020): project each gradient off the ones it conflicts with, then sum.

    "Gradient Surgery for Multi-Task Learning" (NeurIPS 2020), Algorithm 1.

    Each task gradient ``g_i`` is projected off every *other* task's original gradient ``g_j``
    it conflicts with, visiting the other tasks in turn::

        g_i^PC ← g_i;  for j in order_i (j ≠ i):
            if g_i^PC · g_j < 0:  g_i^PC ← g_i^PC − (g_i^PC · g_j) / ‖g_j‖² · g_j
        d = Σ_i g_i^PC

    ``order_i`` is a fresh uniformly random permutation of the other tasks for each ``i`` and each
    call (drawn from this instance's seeded :class:`torch.Generator`), or index order when
    ``order="fixed"``. A zero row ``g_j`` (``‖g_j‖² = 0``) is never projected on (its dot products
    are zero, and the division is guarded).

    Everything happens in Gramian coordinates: the projected row ``g_i^PC = c_iᵀ G`` is tracked
    as a coefficient vector ``c_i`` (starting at ``e_i``), every dot product is
    ``g_i^PC · g_j = c_iᵀ M[:, j]``, and ``β = Σ_i c_i``. Directions are on the scale of the *sum*
    of the task gradients (non-conflicting rows give exactly ``Σ_i g_i``).

    Batched calls (:meth:`aggregate_batch`) draw one set of orders per call, shared by every batch
    entry; at ``K = 2`` the order does not matter and the closed form
    ``β_1 = 1 − [M12 < 0] M12/M11``, ``β_2 = 1 − [M12 < 0] M12/M22`` is used.

    Args:
        seed: seed of the generator behind the random orders, an int in ``[-2**63, 2**64)``
            (the range of :meth:`torch.Generator.manual_seed`; others raise ``ValueError``
            rather than being reduced to a seed that stands for another); ``None`` draws one
            from torch's global generator at construction (so ``torch.manual_seed`` makes runs
            reproducible). :meth:`reset` re-seeds with it.
        order: ``"random"`` (the paper) or ``"fixed"`` (index order; deterministic).
    """

    state = "random"
    properties = frozenset({"linear_under_scaling"})  # checked in tests/test_method_properties.py

    def __init__(self, seed: int | None = None, order: str = "random") -> None:
        self.order = check_choice("order", order, _ORDERS, owner="PCGrad")
        self._start_generator(seed)  # state: the generator (SeededGenerator)

    # ---------------------------------------------------------------------------- weights
    def _orders(self, K: int) -> list[list[int]]:
        """For each task ``i``, the order in which the other tasks are visited."""
        orders = []
        for i in range(K):
            others = [j for j in range(K) if j != i]
            if self.order == "random" and K > 2:
                perm = torch.randperm(K - 1, generator=self._generator).tolist()
                others = [others[p] for p in perm]
            orders.append(others)
        return orders

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        if M.shape[0] == 2:  # the K = 2 closed form on Python floats (no order to draw)
            (m11, m12), (_, m22) = M.tolist()
            beta1 = 1.0 - (m12 / m11 if m12 < 0 and m11 > 0 else 0.0)
            beta2 = 1.0 - (m12 / m22 if m12 < 0 and m22 > 0 else 0.0)
            return torch.from_numpy(np.array([beta1, beta2]))
        return self._batch_weights(M[None], losses=None, task_weights=None)[0]

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        Mn = M.numpy()
        B, K = Mn.shape[0], Mn.shape[1]
        orders = self._orders(K)
        diag = np.diagonal(Mn, axis1=1, axis2=2)
        if K == 2:
            m12 = Mn[:, 0, 1]
            conflict = m12 < 0
            with np.errstate(divide="ignore", invalid="ignore"):
                beta1 = 1.0 - np.where(conflict & (diag[:, 0] > 0), m12 / diag[:, 0], 0.0)
                beta2 = 1.0 - np.where(conflict & (diag[:, 1] > 0), m12 / diag[:, 1], 0.0)
            return torch.from_numpy(np.stack([beta1, beta2], axis=1))
        C = np.broadcast_to(np.eye(K), (B, K, K)).copy()  # C[b, i] = coefficients of g_i^PC
        safe = np.where(diag > 0, diag, 1.0)
        # Task i's projections touch only row C[:, i] and read only that row, so the K tasks are
        # independent: round r projects every task onto the r-th task of its own order at once
        # (K − 1 vectorised rounds instead of K(K − 1) Python steps).
        rows = np.arange(K)
        for r in range(K - 1):
            J = np.array([orders[i][r] for i in range(K)])
            dot = (C * Mn[:, :, J].transpose(0, 2, 1)).sum(axis=2)  # g_i^PC · g_{J_i}
            C[:, rows, J] -= np.where((dot < 0) & (diag[:, J] > 0), dot / safe[:, J], 0.0)
        return torch.from_numpy(C.sum(axis=1))
