"""CAGrad: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.aggregator import GramianAggregator
from mtl_opt.registry import register_aggregator
from mtl_opt.simplex import conflict_averse_coefficients


@register_aggregator("cagrad")
class CAGrad(GramianAggregator):
    """CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning").

    With ``g0 = (1/K) Σ_i g_i`` the mean gradient and ``φ = c²‖g0‖²``, the weights solve the dual
    of "maximise the worst task improvement within a ball around g0":

        w* = argmin_{w∈Δ} F(w) = g_wᵀ g0 + √φ ‖g_w‖,   g_w = wᵀG
           (Gramian form: F(w) = wᵀM1/K + √φ √(wᵀMw))

    and the direction is ``d = K · (g0 + √φ/‖g_w*‖ · g_w*) / R`` with ``R = 1 + c²``
    (``rescale=1``, the paper's default), ``R = 1 + c`` (``rescale=2``) or ``R = 1``
    (``rescale=0``). The factor ``K`` puts it on the scale of the *sum* of task gradients.

    The original code solves for ``w`` with scipy's SLSQP; here it is exact (see
    :func:`mtl_opt.simplex.conflict_averse_weights`): a closed form at K = 2 (stationarity on the
    edge is a quadratic equation), and beyond it a support found by a bracketed root search whose
    closed-form solution is accepted only if it passes the KKT test
    ``∇F_i ≥ w*ᵀ∇F − tol`` for all ``i`` (``∇F = M1/K + √φ Mw*/‖g_w*‖``), which bounds the
    objective gap by ``tol = 1e-10·(1 + √φ/‖g_max‖)·max_i ‖g_i‖²``; an optimum at ``g_w* = 0`` is
    certified by ``‖proj_{cone(rows)}(−g0)‖ ≤ √φ``.

    Edge cases: when ``‖g_w*‖ = 0`` (to rounding: ``‖g_w*‖² ≤ 1e-14·max_i‖g_i‖²``) or ``φ = 0``
    the second term is dropped and ``d = K g0 / R`` (the unit vector ``g_w/‖g_w‖`` is undefined;
    the original code's ``c/(‖g_w‖ + 1e-8)`` also adds nothing there). ``g0 = 0`` gives
    ``d = 0``; ``K = 1`` gives ``d = (1 + c)/R · g_1``.

    Args:
        c: the conflict-aversion radius ``c ≥ 0`` (0.4 in the paper's multi-task experiments);
            ``c = 0`` is plain gradient descent on the summed loss (divided by ``R = 1``).
        rescale: 0, 1 or 2 as above.
    """

    def __init__(self, c: float = 0.4, rescale: int = 1) -> None:
        self.c = check_range("c", c, low=0.0, owner="CAGrad")
        if rescale not in (0, 1, 2) or isinstance(rescale, bool):
            raise ValueError(f"CAGrad: rescale must be 0, 1 or 2, got {rescale!r}")
        self.rescale = int(rescale)

    def _divisor(self) -> float:
        return {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]

    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        return self._batch_weights(M[None], losses=None, task_weights=None)[0]

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        K = M.shape[1]
        return conflict_averse_coefficients(M, self.c) * (K / self._divisor())
