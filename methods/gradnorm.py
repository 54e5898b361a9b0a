"""GradNorm: gradient normalisation for adaptive loss balancing (Chen et al., ICML 2018)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_opt._validation import check_choice, check_range
from mtl_opt.aggregator import GramianAggregator
from mtl_opt.solvers._linalg import ARRAY_OPS, FLOAT_OPS
from mtl_opt.methods._state import checked_counter, checked_state, checked_tensor
from mtl_opt.registry import register_aggregator

_KEYS = (
    "step", "weights", "initial_losses", "moments",
    "batch_step", "batch_weights", "batch_initial_losses", "batch_moments",
)
_UPDATES = ("adam", "sgd")
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


@register_aggregator("gradnorm")
class GradNorm(GramianAggregator):
    """GradNorm (Chen, Badrinarayanan, Lee, Rabinovich): learned loss weights.

    "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks",
    ICML 2018, Algorithm 1. The direction is ``d = Σ_i w_i(t) g_i`` with learned weights
    ``w(t)`` (``w(0) = 1``), which are then updated from the gradient norms and loss ratios of
    the same call::

        G_i  = ‖w_i g_i‖ = w_i √M_ii,      Ḡ = mean_i G_i
        L̃_i  = L_i(t) / L_i(0),           r_i = L̃_i / mean_j L̃_j
        L_grad = Σ_i | G_i − Ḡ r_i^α |     (targets Ḡ r_i^α held constant)
        ∂L_grad/∂w_i = sign(G_i − Ḡ r_i^α) √M_ii
        w ← step(w, ∇_w L_grad)            (see ``update``)
        w ← K w / Σ_j w_j                  (renormalised to sum to K)

    ``L_i(0)`` are the losses of the first call. GradNorm applies to the last shared layer in
    the paper, to save computation; here the norms are those of the rows ``g_i`` of whatever
    Jacobian is aggregated (the whole shared parameters by default).

    The paper updates ``w`` "using ∇_w L_grad" with the training's optimiser and gives no
    separate rule or learning rate, so both are this library's choice: ``update="adam"`` (the
    default) takes an Adam step (``torch.optim.Adam``'s rule, betas (0.9, 0.999), eps 1e-8,
    moments in the state), whose size ``≈ lr`` does not depend on the gradients' scale;
    ``update="sgd"`` takes the plain step ``w ← w − lr ∇_w L_grad``, which moves by ``lr √M_ii``
    and so needs ``lr`` matched to the gradient norms. A weight that a step makes non-positive
    raises ``ValueError`` (lower ``lr``): the paper keeps the weights positive and does not say
    how.

    The losses are required and must be positive. Reads only the Gramian's diagonal: a Gramian
    weighting. State (``state_dict``): ``w`` and ``L(0)`` (and the call counter) of single
    calls and, separately, of batched calls (one per batch entry).

    Args:
        alpha: ``α ≥ 0``, the strength of the restoring force (1.5, LibMTL's default; the paper
            uses 0.12–1.5 by data set).
        lr: ``lr > 0``, the step size of the weights (0.025).
        update: ``"adam"`` or ``"sgd"``, the weights' update rule.
    """

    state = "tracked"
    properties = frozenset({"permutation_invariant", "linear_under_scaling"})  # checked in tests/test_method_properties.py
    uses_losses = True
    requires_losses = True

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, update: str = "adam") -> None:
        self.alpha = check_range("alpha", alpha, low=0.0, owner="GradNorm")
        self.lr = check_range("lr", lr, low=0.0, low_inclusive=False, owner="GradNorm")
        self.update = check_choice("update", update, _UPDATES, owner="GradNorm")
        self.reset()

    # ---------------------------------------------------------------------------- state
    def reset(self) -> None:
        self._step = 0
        # Single calls keep their state as nested lists of floats (no tensor per call; converted
        # by state_dict): w and L(0) as [[K floats]], Adam's m and v as [[[K]], [[K]]].
        self._w: Tensor | list | None = None  # (1, K)
        self._l0: Tensor | list | None = None  # (1, K)
        self._moments: Tensor | list | None = None  # (2, 1, K): Adam's m and v
        self._batch_step = 0
        self._batch_w: Tensor | None = None  # (B, K)
        self._batch_l0: Tensor | None = None
        self._batch_moments: Tensor | None = None  # (2, B, K)

    @property
    def task_weights_now(self) -> Tensor | None:
        """The weights ``w`` the next single call will use (``None`` before the first call)."""
        return None if self._w is None else _tensor(self._w)[0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "weights": _tensor(self._w),
            "initial_losses": _tensor(self._l0),
            "moments": _tensor(self._moments),
            "batch_step": self._batch_step,
            "batch_weights": _tensor(self._batch_w),
            "batch_initial_losses": _tensor(self._batch_l0),
            "batch_moments": _tensor(self._batch_moments),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checked_state("GradNorm", state, _KEYS)
        values = {
            "step": checked_counter("GradNorm", "step", state["step"]),
            "batch_step": checked_counter("GradNorm", "batch_step", state["batch_step"]),
        }
        for key in ("weights", "initial_losses", "batch_weights", "batch_initial_losses"):
            t = checked_tensor("GradNorm", key, state[key], ndim=2)
            values[key] = None if t is None else t.to(dtype=torch.float64, device="cpu")
        for key in ("moments", "batch_moments"):
            t = checked_tensor("GradNorm", key, state[key], ndim=3)
            values[key] = None if t is None else t.to(dtype=torch.float64, device="cpu")
        for prefix in ("", "batch_"):
            w, l0, mom = values[prefix + "weights"], values[prefix + "initial_losses"], values[prefix + "moments"]
            if (w is None) != (l0 is None) or (w is not None and w.shape != l0.shape) or (
                mom is not None and (w is None or mom.shape != (2, *w.shape))
            ):
                raise ValueError(
                    f"GradNorm state {prefix}weights, {prefix}initial_losses and {prefix}moments do not match"
                )
        self._step, self._batch_step = values["step"], values["batch_step"]
        self._w, self._l0, self._moments = values["weights"], values["initial_losses"], values["moments"]
        self._batch_w, self._batch_l0 = values["batch_weights"], values["batch_initial_losses"]
        self._batch_moments = values["batch_moments"]

    # ---------------------------------------------------------------------------- weights
    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        assert losses is not None  # requires_losses
        beta, self._w, self._l0, self._moments = self._advance(
            M[None], losses[None], self._w, self._l0, self._moments, self._step + 1
        )
        self._step += 1
        return beta[0]

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        assert losses is not None
        beta, self._batch_w, self._batch_l0, self._batch_moments = self._advance(
            M, losses, self._batch_w, self._batch_l0, self._batch_moments, self._batch_step + 1
        )
        self._batch_step += 1
        return beta

    def _advance(
        self, M: Tensor, losses: Tensor, w: Tensor | list | None, l0: Tensor | list | None,
        moments: Tensor | list | None, t: int,
    ) -> tuple[Tensor, Tensor | list, Tensor | list, Tensor | list | None]:
        """Weights of call ``t`` and the new ``w``, ``L(0)``, Adam moments, for Gramians
        (B, K, K) and losses (B, K). The update (:func:`gradnorm_update`) is written once over
        the K per-task columns: Python floats for one problem (a few µs; NumPy's per-call
        overhead costs tens), (B,) arrays for a batch."""
        B, K = losses.shape
        if w is not None and _shape(w) != tuple(losses.shape):
            raise ValueError(
                f"GradNorm keeps weights of shape {_shape(w)} and now gets {tuple(losses.shape)} "
                "(batch entries, tasks); call reset() between runs"
            )
        if B == 1:  # state as nested lists (see reset)
            Ls = losses.tolist()[0]
            if not all(x > 0.0 for x in Ls):
                _raise_non_positive_losses(losses)
            diag = [row[i] for i, row in enumerate(M.tolist()[0])]
            norms = [FLOAT_OPS.sqrt(FLOAT_OPS.maximum(x, 0.0)) for x in diag]
            wn = [1.0] * K if w is None else _rows(w)[0]
            l0n = list(Ls) if w is None or l0 is None else _rows(l0)[0]
            m_prev, v_prev = ([0.0] * K, [0.0] * K) if moments is None else (r[0] for r in _rows(moments))
            new_w, m, v = gradnorm_update(norms, Ls, wn, l0n, m_prev, v_prev, t, self, FLOAT_OPS)
            if not all(x > 0.0 for x in new_w):
                self._raise_non_positive_weight(np.array([new_w]), np.array([norms]))
            total = sum(new_w)
            new_w = [K * x / total for x in new_w]
            if self.update != "sgd":
                moments = [[m], [v]]
            return torch.tensor([wn], dtype=torch.float64), [new_w], [l0n], moments
        if bool((losses <= 0).any()):
            _raise_non_positive_losses(losses)
        Ln = losses.numpy()
        if w is None or l0 is None:
            wn, l0n = np.ones((B, K)), Ln.copy()
        else:
            wn, l0n = w.numpy(), l0.numpy()
        norms = np.sqrt(np.maximum(np.diagonal(M.numpy(), axis1=1, axis2=2), 0.0))
        zeros = np.zeros((B, K))
        m_prev, v_prev = (zeros, zeros) if moments is None else moments.numpy()
        new_cols, m, v = gradnorm_update(
            list(norms.T), list(Ln.T), list(wn.T), list(l0n.T), list(m_prev.T), list(v_prev.T), t, self, ARRAY_OPS
        )
        new_w = np.stack(new_cols, axis=1)
        if self.update != "sgd":
            moments = torch.from_numpy(np.stack([np.stack(m, axis=1), np.stack(v, axis=1)]))
        if not bool((new_w > 0).all()):
            self._raise_non_positive_weight(new_w, norms)
        new_w = K * new_w / new_w.sum(axis=-1, keepdims=True)
        return torch.from_numpy(wn.copy()), torch.from_numpy(new_w), torch.from_numpy(l0n.copy()), moments

    def _raise_non_positive_weight(self, new_w: np.ndarray, norms: np.ndarray) -> None:
        b, i = (int(x) for x in np.argwhere(~(new_w > 0))[0])
        raise ValueError(
            f"GradNorm: the weight of task {i} became {new_w[b, i]:.3g} <= 0 after a step of "
            f"lr = {self.lr} ({self.update}) with gradient norm {norms[b, i]:.3g}; lower lr"
        )


def _rows(state: Tensor | list) -> list:
    """State kept as a tensor (loaded) or as nested lists (single calls), as nested lists."""
    return state.tolist() if isinstance(state, Tensor) else state


def _shape(state: Tensor | list) -> tuple[int, ...]:
    return tuple(state.shape) if isinstance(state, Tensor) else (len(state), len(state[0]))


def _tensor(state: Tensor | list | None) -> Tensor | None:
    """State as a new float64 tensor (``None`` stays ``None``)."""
    if state is None:
        return None
    return state.clone() if isinstance(state, Tensor) else torch.tensor(state, dtype=torch.float64)


def _raise_non_positive_losses(losses: Tensor) -> None:
    raise ValueError(f"GradNorm uses loss ratios L_i(t)/L_i(0): the losses must be positive, got {losses.tolist()}")


def gradnorm_update(norms, L, w, l0, m_prev, v_prev, t, method, xp):  # type: ignore[no-untyped-def]
    """One update of GradNorm's weights before renormalisation, over the K per-task columns
    (lists of K Python floats with ``xp = FLOAT_OPS``, or of K (B,) arrays with ``xp = ARRAY_OPS``):
    ``√M_ii``, ``L_i(t)``, ``w_i``, ``L_i(0)`` and Adam's moments. Returns the stepped ``w``
    and the new moments (the old ones under ``update="sgd"``); see the class docstring."""
    K = len(norms)
    weighted = [wi * ni for wi, ni in zip(w, norms)]
    ratio = [Li / l0i for Li, l0i in zip(L, l0)]
    mean_ratio = sum(ratio) / K
    mean_weighted = sum(weighted) / K
    grad = [
        xp.sign(gi - mean_weighted * (ri / mean_ratio) ** method.alpha) * ni
        for gi, ri, ni in zip(weighted, ratio, norms)
    ]
    if method.update == "sgd":
        return [wi - method.lr * gi for wi, gi in zip(w, grad)], m_prev, v_prev
    b1, b2 = _ADAM_BETAS
    c1, c2 = 1.0 - b1**t, 1.0 - b2**t
    m = [b1 * mi + (1.0 - b1) * gi for mi, gi in zip(m_prev, grad)]
    v = [b2 * vi + (1.0 - b2) * gi * gi for vi, gi in zip(v_prev, grad)]
    new_w = [wi - method.lr * ((mi / c1) / (xp.sqrt(vi / c2) + _ADAM_EPS)) for wi, mi, vi in zip(w, m, v)]
    return new_w, m, v
