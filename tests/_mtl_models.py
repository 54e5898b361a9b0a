"""Tiny two-head networks and test aggregators shared by test_backward and test_optimizer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtl_opt import GradientAggregator, GramianAggregator


class TwoHeadNet(nn.Module):
    """A shared trunk with a normalisation layer and two task heads."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, d_in: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(d_in, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 6))
        self.head_a = nn.Linear(6, 1)
        self.head_b = nn.Linear(6, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.to(dtype)

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def losses_from(self, z: Tensor, y: Tensor) -> list[Tensor]:
        loss_a = (self.head_a(z).squeeze(-1) - y[:, 0]).pow(2).mean()
        loss_b = (self.head_b(z) - y[:, 1:3]).pow(2).mean() + 0.1 * self.head_b(z).tanh().mean()
        return [loss_a, loss_b]

    def losses(self, x: Tensor, y: Tensor) -> list[Tensor]:
        return self.losses_from(self.features(x), y)


def batch(seed: int = 1, n: int = 7, d_in: int = 5, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(n, 3, generator=g, dtype=torch.float64).to(dtype)
    return x, y


class _ClampWithItem(torch.autograd.Function):
    """Gradient clipping by the batch's largest value: its backward reads a number (.item()),
    which vmap cannot batch, so the batched Jacobian fails on any graph that contains it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        biggest = grad.abs().max().item()
        return grad if biggest <= 1e6 else grad * (1e6 / biggest)


class SparseEmbeddingNet(nn.Module):
    """Bag-of-tokens model whose shared trunk is a sparse nn.Embedding: autograd's batched
    (vmap) backward has no rule for sparse gradients, so this model breaks the batched path."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, custom: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(11, 6, sparse=not custom)
        self.norm = nn.LayerNorm(6)
        self.custom = custom
        self.head_a = nn.Linear(6, 1)
        self.head_b = nn.Linear(6, 2)
        self.to(dtype)

    def features(self, tokens: Tensor) -> Tensor:
        z = self.norm(self.embed(tokens).mean(dim=1))
        return _ClampWithItem.apply(z) if self.custom else z

    def losses(self, tokens: Tensor, y: Tensor) -> list[Tensor]:
        z = self.features(tokens)
        return [
            (self.head_a(z).squeeze(-1) - y[:, 0]).pow(2).mean(),
            (self.head_b(z) - y[:, 1:3]).pow(2).mean(),
        ]

    def shared(self) -> list[Tensor]:
        return [*self.embed.parameters(), *self.norm.parameters()]


def token_batch(seed: int = 1, n: int = 6, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (n, 4), generator=g), torch.randn(n, 3, generator=g).to(dtype)


# --------------------------------------------------------------------------------------------
# Aggregators used as test doubles for the interface (real, small methods, not mocks)
# --------------------------------------------------------------------------------------------
class FixedWeights(GramianAggregator):
    """``d = βᵀ G`` with constant β (a Gramian weighting that ignores the Gramian)."""

    def __init__(self, beta: list[float]) -> None:
        self.beta = beta

    def _weights(self, M: Tensor, *, losses, task_weights) -> Tensor:
        return torch.tensor(self.beta, dtype=torch.float64)


class UnitNormSum(GramianAggregator):
    """``β_i = 1/‖g_i‖``: the sum of normalised task gradients (uses the Gramian's diagonal)."""

    def _weights(self, M: Tensor, *, losses, task_weights) -> Tensor:
        return 1.0 / torch.sqrt(torch.diagonal(M))


class SignAgreement(GradientAggregator):
    """Not a Gramian weighting: the summed gradient, kept only where all tasks agree in sign."""

    def _aggregate(self, G: Tensor, *, losses, task_weights):
        from mtl_opt import AggregationResult

        agree = (G > 0).all(dim=0) | (G < 0).all(dim=0)
        return AggregationResult(direction=G.sum(dim=0) * agree.to(G.dtype))


class RunningNormWeights(GramianAggregator):
    """Stateful: ``β_i = 1/ema_i`` with ``ema`` a running mean of the task gradient norms."""

    accepts_task_weights = True

    def __init__(self, decay: float = 0.5) -> None:
        self.decay = decay
        self.reset()

    def reset(self) -> None:
        self._ema: Tensor | None = None
        self._steps = 0

    def _weights(self, M: Tensor, *, losses, task_weights) -> Tensor:
        norms = torch.sqrt(torch.diagonal(M))
        self._ema = norms if self._ema is None else self.decay * self._ema + (1 - self.decay) * norms
        self._steps += 1
        beta = 1.0 / self._ema
        return beta if task_weights is None else beta * task_weights

    def state_dict(self):
        return {"ema": None if self._ema is None else self._ema.clone(), "steps": self._steps}

    def load_state_dict(self, state):
        self._ema = None if state["ema"] is None else state["ema"].clone()
        self._steps = int(state["steps"])


class RecordingWeights(GramianAggregator):
    """Linear weights that records the context it was called with."""

    uses_losses = True
    accepts_task_weights = True

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def _weights(self, M: Tensor, *, losses, task_weights) -> Tensor:
        self.calls.append({"losses": losses, "task_weights": task_weights})
        return torch.ones(M.shape[0], dtype=torch.float64) if task_weights is None else task_weights.clone()


def explicit_jacobian(losses: list[Tensor], params: list[Tensor]) -> Tensor:
    """Reference Jacobian: one autograd.grad call per task, rows concatenated."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g)).reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
        )
    return torch.stack(rows)


def flat_grad(params) -> Tensor:
    return torch.cat([p.grad.to_dense().reshape(-1) if p.grad.is_sparse else p.grad.reshape(-1) for p in params])
