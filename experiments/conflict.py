"""Gradient conflict between tasks, read off the Gramian of the task gradients.

With ``g_i = ∇_θ L_i`` the task gradients on the shared parameters and ``M = G Gᵀ`` their
Gramian (``M_ij = ⟨g_i, g_j⟩``), a training step records

* ``cos_mean``: the mean over task pairs ``i < j`` of ``cos(g_i, g_j) = M_ij / √(M_ii M_jj)``
  (two tasks: the one cosine); pairs with a zero gradient are left out;
* ``conflict``: whether some pair has a negative inner product ``M_ij < 0`` (Yu et al.'s
  "conflicting gradients", NeurIPS 2020).

A run's statistics are the mean cosine over its measured steps and the share of them that
conflicted. Gramian methods compute ``M`` at every step anyway, so it costs nothing; for methods
that take no Jacobian (linear scalarization, the loss weightings) :func:`task_gramian` computes
it with K extra backward passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ConflictTally", "step_conflict", "task_gramian"]


def task_gramian(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """``M = G Gᵀ`` (K × K, float64) of the losses' gradients on ``params``, summed block by
    block (the K × d Jacobian is never concatenated). Keeps the graph for the step's backward."""
    params = list(params)
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses]
    K = len(losses)
    M = torch.zeros(K, K, dtype=torch.float64)
    for j, p in enumerate(params):
        rows = [(g[j] if g[j] is not None else torch.zeros_like(p)).reshape(-1).double() for g in grads]
        block = torch.stack(rows)
        M += (block @ block.T).cpu()
    return M


def step_conflict(M: Tensor) -> tuple[float, bool] | None:
    """``(cos_mean, conflict)`` of one step's Gramian (see the module docstring); ``None`` for a
    single task. ``cos_mean`` is NaN when every pair has a zero gradient."""
    m = M.detach().to("cpu", torch.float64)
    K = m.shape[0]
    if K < 2:
        return None
    cosines, conflict = [], False
    for i in range(K):
        for j in range(i + 1, K):
            if float(m[i, j]) < 0:
                conflict = True
            denom = math.sqrt(max(float(m[i, i]), 0.0) * max(float(m[j, j]), 0.0))
            if denom > 0:
                cosines.append(float(m[i, j]) / denom)
    return (sum(cosines) / len(cosines) if cosines else float("nan")), conflict


@dataclass
class ConflictTally:
    """Running sums of the measured steps: ``n`` steps, ``cos_sum`` (over steps with a defined
    cosine, ``n_cos`` of them) and ``n_conflict``."""

    n: int = 0
    n_cos: int = 0
    cos_sum: float = 0.0
    n_conflict: int = 0

    def add(self, figures: tuple[float, bool] | None) -> None:
        if figures is None:
            return
        cos, conflict = figures
        self.n += 1
        self.n_conflict += int(conflict)
        if math.isfinite(cos):
            self.n_cos += 1
            self.cos_sum += cos

    def cos_mean(self) -> float:
        return self.cos_sum / self.n_cos if self.n_cos else float("nan")

    def conflict_share(self) -> float:
        return self.n_conflict / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return {"n": self.n, "n_cos": self.n_cos, "cos_sum": self.cos_sum, "n_conflict": self.n_conflict}

    @classmethod
    def from_dict(cls, d: dict) -> "ConflictTally":
        return cls(int(d["n"]), int(d["n_cos"]), float(d["cos_sum"]), int(d["n_conflict"]))
