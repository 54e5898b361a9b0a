"""Loss weightings: methods whose update is ``Σ_i w_i ∇L_i`` with ``w`` from the losses alone.

Uncertainty weighting, DWA, random loss weights, the geometric mean of the losses, FAMO, smooth
Tchebycheff, IMTL-L and the scale-invariant log losses never look at the task gradients: each
step they turn the K loss values (and their own state) into weights ``w`` (K,), and the update
is the gradient of ``Σ_i w_i L_i`` with ``w`` held constant. So no Jacobian is needed:
:func:`mtl_opt.mtl_backward` and :class:`mtl_opt.MultiTaskOptimizer` run ONE backward pass of
the weighted sum, exactly ``(w * losses).sum().backward()`` (see :mod:`mtl_opt._one_backward`).

A method says it is a loss weighting by subclassing :class:`LossWeighting` (its class attribute
``kind`` is ``"loss"``, so ``needs_jacobian`` is False); the engine asks for the weights with :meth:`LossWeighting.weights`
and never inspects which methods a subclass overrode.

The protocol::

    w = method.weights(losses)            # (K,) float64; advances the method's state once
    W = method.batch_weights(losses_BK)   # (B, K): B independent runs, one state per run
    method.update(losses_after)           # FAMO only (``wants_losses_after_step``): the losses
                                          # of the same batch after the optimizer step
    method.end_epoch()                    # DWA and STCH: an epoch of the data ended

Every method also works as a plain :class:`~mtl_opt.GradientAggregator` on a Jacobian,
``method(G, losses=losses) = wᵀG`` (one call advances the state like one :meth:`weights` call),
so studies that build the Jacobian anyway (the synthetic-problem runner) can run them too.

State is kept per run with a leading batch axis: a single run is a batch of one. Learnable
weights (UW's log-variances, IMTL-L's log-scales, FAMO's logits) are updated by the method
itself, with its own element-wise Adam (:func:`adam_step`), from the exact gradient of the
method's objective; they are visible as attributes and saved in :meth:`state_dict`. Because
Adam is element-wise, a method's own Adam with the model's learning rate and betas is the same
update as adding those parameters to the model's Adam (without weight decay), which is how the
UW and IMTL papers train them.

Epochs (DWA's loss ratios, STCH's warm-up and nadir estimate): an epoch ends when the trainer
calls :meth:`LossWeighting.end_epoch` (the RRG trainer does at the end of each pass over the
data; the synthetic-problem runner after every step, since each of its steps evaluates the whole
objective), or, when the method's ``epoch_length`` is an integer, automatically after that many
:meth:`weights` calls. With ``epoch_length=None`` and no ``end_epoch`` calls the method stays in
its first epoch.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtl_opt.aggregator import AggregationResult, GradientAggregator, combine_rows, combine_rows_batch

__all__ = ["LossWeighting", "adam_step"]

#: What a method requires of the losses it reads: any finite value, ``L ≥ 0`` or ``L > 0``
#: (the methods that take a logarithm or a ratio of the losses).
LossDomain = str


class LossWeighting(GradientAggregator, protocol=True):
    """Base class of the loss weightings: ``w = weights(losses)``, update ``Σ w_i ∇L_i``.

    Subclasses implement :meth:`_batch_weights_from_losses` (B, K) -> (B, K) on float64 CPU
    losses that were already checked, keeping their state in tensors with a leading batch axis,
    and list those state attributes in ``state_keys``.

    Class attributes:
        loss_domain: ``"finite"``, ``"nonnegative"`` or ``"positive"``: what the losses must
            be (checked with one clear error naming the task and value).
        wants_losses_after_step: the method learns from the losses of the same batch after the
            optimizer step (FAMO): the training loop must call :meth:`update` with them, which
            costs one extra forward pass (no backward pass) per step.
        state_keys: the attributes that make up :meth:`state_dict` (tensors, or ``None`` before
            the first step, or Python ints).
    """

    kind = "loss"
    uses_losses: ClassVar[bool] = True
    requires_losses: ClassVar[bool] = True
    accepts_task_weights: ClassVar[bool] = False
    loss_domain: ClassVar[LossDomain] = "finite"
    wants_losses_after_step: ClassVar[bool] = False
    state_keys: ClassVar[tuple[str, ...]] = ()

    # ----------------------------------------------------------------------------------------
    # The protocol
    # ----------------------------------------------------------------------------------------
    def weights(self, losses: Tensor | Any, /) -> Tensor:  # type: ignore[override]
        """This step's weights ``w`` (K,) float64 CPU for the K loss values; advances the state."""
        L = self._check_losses(_as_batch(losses), "losses")
        return self._checked(self._batch_weights_from_losses(L))[0]

    def batch_weights(self, losses: Tensor, /) -> Tensor:
        """Weights of ``B`` independent runs: losses (B, K) -> (B, K), one state per run (the
        batch size must stay fixed until :meth:`reset`)."""
        if not isinstance(losses, Tensor) or losses.dim() != 2:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"batched losses must have shape (B, K), got {shape}")
        L = self._check_losses(losses, "losses")
        return self._checked(self._batch_weights_from_losses(L))

    def update(self, losses_after: Tensor | Any, /) -> None:
        """Learn from the losses of the same batch after the optimizer step (methods with
        ``wants_losses_after_step``); others raise, since nothing would use them."""
        self._check_update_supported()
        self._batch_update(self._check_losses(_as_batch(losses_after), "losses after the step"))

    def batch_update(self, losses_after: Tensor, /) -> None:
        """:meth:`update` for ``B`` runs: losses after the step (B, K)."""
        self._check_update_supported()
        if not isinstance(losses_after, Tensor) or losses_after.dim() != 2:
            raise ValueError("batched losses after the step must have shape (B, K)")
        self._batch_update(self._check_losses(losses_after, "losses after the step"))

    def end_epoch(self) -> None:
        """An epoch of the training data ended (used by DWA and STCH; a no-op for the others)."""

    def jacobian_free_weights(self, losses: Tensor, task_weights: Tensor | None = None) -> Tensor:
        """The engine's question (:func:`mtl_opt.mtl_backward`): this step's ``w`` from the
        losses alone. Loss weightings have no per-task weights to override."""
        self._check_context(int(losses.numel()), losses, task_weights)
        return self.weights(losses)

    # ----------------------------------------------------------------------------------------
    # As a GradientAggregator on a Jacobian
    # ----------------------------------------------------------------------------------------
    def _aggregate(
        self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None
    ) -> AggregationResult:
        assert losses is not None  # requires_losses
        w = self.weights(losses)
        return AggregationResult(direction=combine_rows(w, G), weights=w, gramian=None)

    def _aggregate_batch(
        self, G: Tensor, *, losses: Tensor | None, task_weights: Tensor | None
    ) -> Tensor:
        assert losses is not None
        w = self._checked(self._batch_weights_from_losses(self._check_losses(losses, "losses")))
        return combine_rows_batch(w, G)

    # ----------------------------------------------------------------------------------------
    # State
    # ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        for key in self.state_keys:
            setattr(self, key, None)
        self._after_reset()

    def _after_reset(self) -> None:
        """Re-seed generators and the like (subclasses)."""

    def state_dict(self) -> dict[str, Any]:
        """Copies of the state attributes (``state_keys``); round-trips bit for bit."""
        return {k: _copy(getattr(self, k)) for k in self.state_keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        name = type(self).__name__
        if not isinstance(state, dict) or set(state) != set(self.state_keys):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{name} state must have the keys {sorted(self.state_keys)}, got {got}")
        for k, v in state.items():
            if v is not None and not isinstance(v, (Tensor, int)) or isinstance(v, bool):
                raise TypeError(f"{name} state {k!r} must be a tensor, an int or None, got {type(v).__name__}")
        shapes = {tuple(v.shape[:2]) for v in state.values() if isinstance(v, Tensor) and v.dim() == 2}
        if len(shapes) > 1:
            raise ValueError(f"{name} state tensors disagree on (runs, tasks): {sorted(shapes)}")
        for k, v in state.items():
            setattr(self, k, _copy(v))

    # ----------------------------------------------------------------------------------------
    # For subclasses
    # ----------------------------------------------------------------------------------------
    def _batch_weights_from_losses(self, L: Tensor) -> Tensor:
        raise NotImplementedError

    def _batch_update(self, L_after: Tensor) -> None:
        raise NotImplementedError

    def _state_shape(self) -> tuple[int, int] | None:
        for k in self.state_keys:
            v = getattr(self, k, None)
            if isinstance(v, Tensor) and v.dim() == 2:
                return (int(v.shape[0]), int(v.shape[1]))
        return None

    def _check_losses(self, losses: Tensor, what: str) -> Tensor:
        """Finite (and, by ``loss_domain``, non-negative or positive) float64 CPU (B, K), with
        K and B matching the state; one clear error otherwise."""
        name = type(self).__name__
        if not isinstance(losses, Tensor):
            raise TypeError(f"{name}: {what} must be a tensor, got {type(losses).__name__}")
        L = losses.detach().to(device="cpu", dtype=torch.float64)
        if L.shape[-1] == 0:
            raise ValueError(f"{name}: {what} are empty (K = 0): there is no task to weigh")
        flat = L.reshape(-1).tolist()
        K = L.shape[-1]
        for i, v in enumerate(flat):
            if not math.isfinite(v):
                raise ValueError(f"{name}: {what} must be finite, got {v} for task {i % K}")
        low_ok = {"finite": lambda v: True, "nonnegative": lambda v: v >= 0, "positive": lambda v: v > 0}
        ok = low_ok[self.loss_domain]
        for i, v in enumerate(flat):
            if not ok(v):
                need = "> 0" if self.loss_domain == "positive" else ">= 0"
                raise ValueError(
                    f"{name} takes the logarithm or a ratio of the losses, so they must be {need}; "
                    f"got {v!r} for task {i % K} (shift the losses by a lower bound of their values)"
                )
        shape = self._state_shape()
        if shape is not None:
            if shape[1] != K:
                raise ValueError(
                    f"{name} holds state for {shape[1]} tasks but got {K} {what}; call reset() "
                    "to start a run with another number of tasks"
                )
            if shape[0] != L.shape[0]:
                raise ValueError(
                    f"{name} holds state for {shape[0]} runs but got a batch of {L.shape[0]}; "
                    "call reset() to change the batch size"
                )
        return L

    def _checked(self, w: Tensor) -> Tensor:
        if not bool(torch.isfinite(w).all()):
            raise RuntimeError(f"{type(self).__name__} produced non-finite weights {w.tolist()}")
        return w

    def _check_update_supported(self) -> None:
        if not self.wants_losses_after_step:
            raise TypeError(
                f"{type(self).__name__} does not learn from the losses after the step; "
                "update(...) is for methods with wants_losses_after_step (famo)"
            )


def adam_step(
    param: Tensor, grad: Tensor, m: Tensor, v: Tensor, t: int, *, lr: float,
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
) -> None:
    """One step of ``torch.optim.Adam`` (L2 ``weight_decay`` added to the gradient, no AMSGrad)
    on ``param`` in place, with the moments ``m``, ``v`` (updated in place) and the step count
    ``t`` (after this step, ≥ 1); the same operations in the same order as
    ``torch.optim.Adam(foreach=False)``::

        g ← g + λ θ;  m ← β₁ m + (1 − β₁) g;  v ← β₂ v + (1 − β₂) g²
        θ ← θ − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
    """
    b1, b2 = betas
    if weight_decay != 0.0:
        grad = grad.add(param, alpha=weight_decay)
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    step_size = lr / (1 - b1**t)
    denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
    param.addcdiv_(m, denom, value=-step_size)


def _as_batch(losses: Tensor | Any) -> Tensor:
    if isinstance(losses, Tensor):
        t = losses.detach()
        if t.dim() != 1:
            raise ValueError(f"the losses must be a vector of K values, got shape {tuple(t.shape)}")
        return t.reshape(1, -1)
    try:
        vals = [float(v.detach()) if isinstance(v, Tensor) else float(v) for v in losses]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the losses must be a tensor or a sequence of numbers: {exc}") from None
    return torch.tensor([vals], dtype=torch.float64)


def _copy(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, Tensor) else v
