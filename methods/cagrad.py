"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.aggregator import GramianAggregator
from mtl_opt.registry import register_aggregator
from mtl_opt.solvers import conflict_averse


@register_aggregator("cagrad")
class CAGrad(GramianAggregator):
    """CAGrad (Liu et al. 2021): the best worst-task improvement within a ball around the mean.

    "Conflict-Averse Gradient Descent for Multi-task Learning" (NeurIPS 2021).

    With ``g0 = (1/K) Σ_i g_i`` the mean gradient and ``φ = c²‖g0‖²``, the weights solve the dual
    of "maximise the worst task improvement within a ball around g0":

        w* = argmin_{w∈Δ} F(w) = g_wᵀ g0 + √φ ‖g_w‖,   g_w = wᵀG
           (Gramian form: F(w) = wᵀM1/K + √φ √(wᵀMw))

    and the direction is ``d = K · (g0 + √φ/‖g_w*‖ · g_w*) / R`` with ``R = 1 + c²``
    (``rescale=1``, the paper's default), ``R = 1 + c`` (``rescale=2``) or ``R = 1``
    (``rescale=0``). The factor ``K`` puts it on the scale of the *sum* of task gradients.

    The original code solves for ``w`` with scipy's SLSQP; here it is exact (see
    :mod:`mtl_opt.solvers.cagrad_dual`). K = 2: closed form (stationarity on the edge is a quadratic
    equation), best of the edge point and the two vertices. K = 3: the same over the triangle's
    seven faces, vectorised over batches. Every answer off the origin (K = 2 edge points included)
    is accepted only on a primal/dual certificate: with ``γ = 1/K + (√φ/r) w*`` and
    ``u = γᵀG`` (feasible, ``‖u − g0‖ = √φ``), the gap ``F(w*) − min_i (Mγ)_i`` between the dual
    value and the primal value (the worst task's directional derivative) must be at most
    ``1e-10·(1 + √φ)`` plus the rounding of the gap itself, relative to ``max_i‖g_i‖²``;
    K ≥ 4 (and any entry failing the test) uses a bracketed root search for the support with a
    closed-form root, and raises if nothing passes. Where the optimum is a near-cancelling mix of
    much larger rows the gap is only known to ~1e-7 of ``max_i‖g_i‖²`` (see
    :mod:`mtl_opt.solvers.cagrad_dual`). An optimum at ``g_w* = 0`` is certified by
    ``‖proj_{cone(rows)}(−g0)‖ ≤ √φ``. The tests also check a zero
    duality gap: ``min_i g_i·d`` equals ``F(w*)`` for the returned ``d``.

    Edge cases: ``φ = 0`` gives ``d = K g0 / R``; so ``g0 = 0`` gives ``d = 0``. When
    ``‖g_w*‖ = 0`` (to the Gramian's precision: ``‖g_w*‖² ≤ rtol·max_i‖g_i‖²`` with
    ``rtol = max(1e-14, eps·√d, eps_dtype)``, see :func:`mtl_opt._validation.gramian_rtol`, so
    that a float32 Gramian's rounding noise is not taken for a direction; the origin of the
    hull is optimal) the unit vector ``g_w/‖g_w‖`` is undefined and every ``d`` of the ball with
    ``g_i·d ≥ 0`` for all ``i`` solves CAGrad's primal problem; the one closest to ``g0`` is used:
    ``d = K · proj_{d: Gd ≥ 0}(g0) / R`` (an NNLS problem), which is ``K g0 / R`` whenever no task
    conflicts with ``g0`` (e.g. a zero row beside agreeing rows) and ``0`` for exactly opposing
    collinear rows. (The original code returns ``≈ K g0 / R`` there, which is not primal-optimal
    when some ``g_i·g0 < 0``.) ``K = 1`` gives ``d = (1 + c)/R · g_1``.

    Args:
        c: the conflict-aversion radius ``c ≥ 0`` (0.4 in the paper's multi-task experiments);
            ``c = 0`` is plain gradient descent on the summed loss (divided by ``R = 1``).
        rescale: 0, 1 or 2 as above.
    """

    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py

    def __init__(self, c: float = 0.4, rescale: int = 1) -> None:
        self.c = check_range("c", c, low=0.0, owner="CAGrad")
        if rescale not in (0, 1, 2) or isinstance(rescale, bool):
            raise ValueError(f"CAGrad: rescale must be 0, 1 or 2, got {rescale!r}")
        self.rescale = int(rescale)

    def _divisor(self) -> float:
        return {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        # One Gramian is a batch of one: the solver's entry point takes its single-call path.
        return self._batch_weights(M[None], losses=None, task_weights=None)[0]

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        K = M.shape[1]
        _, coef = conflict_averse(M.numpy(), self.c, checked=True)
        return torch.from_numpy(coef * (K / self._divisor()))
