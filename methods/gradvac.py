"""GradVac: raise each pair's gradient cosine to an adaptive (EMA) target."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtl_opt._validation import check_range
from mtl_opt.aggregator import GramianAggregator
from mtl_opt.methods._state import NUMPY_SEEDS, checked_seed
from mtl_opt.registry import register_aggregator


@register_aggregator("gradvac")
class GradVac(GramianAggregator):
    """GradVac: pairwise gradient cosines raised to EMA targets (Wang et al., ICLR 2021).

    Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 1.

    For each task ``i`` (a modified copy ``g_i' ← g_i``) and each other task ``j`` in a random
    order: ``φ_ij = cos(g_i', g_j)``; if ``φ_ij < φ̂_ij`` (the target), add

        g_i' ← g_i' + g_j · ‖g_i'‖ (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²)) / (‖g_j‖ √(1−φ̂_ij²))

    which makes the cosine exactly ``φ̂_ij``; then ``φ̂_ij ← (1−β) φ̂_ij + β φ_ij`` (every pair,
    every step, as in the paper; targets start at 0). ``d = Σ_i g_i'``. Every ``g_i'`` is a
    combination of the rows, so the method runs on the Gramian: with ``g_i' = Σ_k c_ik g_k``,
    ``g_i'ᵀg_j = (c_i M)_j`` and ``‖g_i'‖² = c_i M c_iᵀ``, and ``β = Σ_i c_i``.

    Defaults: ``beta = 0.01`` (the paper's β = 1e-2); ``eps = 1e-8`` is added to the two
    denominators as in LibMTL and TorchJD. Differences from those codes: LibMTL (default β = 0.5)
    updates the target only inside the ``φ < φ̂`` branch, and both LibMTL and TorchJD default to
    β = 0.5; TorchJD draws the order from torch's global generator, here a seeded one.
    Granularity: the whole shared parameter vector (LibMTL's ``group_type=0``, its default),
    which is what makes it a Gramian weighting; per-layer targets (``group_type=1, 2``) would
    need one Gramian per parameter group and are not implemented.

    State (``state_dict``): the targets ``φ̂`` (K, K) and the order generator's state, kept
    separately for batched calls (one ``φ̂`` and one generator per batch entry, each generator
    seeded with ``seed``, so entry ``b`` evolves exactly like a single run). ``reset()`` zeroes
    the targets and re-seeds.

    Args:
        beta: EMA rate of the targets, in [0, 1].
        eps: added to the denominators (LibMTL's 1e-8).
        seed: seed of the random task order.
    """

    state = "tracked, random"

    def __init__(self, beta: float = 0.01, eps: float = 1e-8, seed: int = 0) -> None:
        self.beta = check_range("beta", beta, low=0.0, high=1.0, owner="GradVac")
        self.eps = check_range("eps", eps, low=0.0, owner="GradVac")
        if seed is None:
            raise TypeError("GradVac: seed must be an int (it seeds the random task order), got None")
        self.seed = checked_seed("GradVac", seed, NUMPY_SEEDS)
        self.reset()

    # ------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._phi: np.ndarray | None = None
        self._rng = np.random.default_rng(self.seed)
        self._batch_phi: np.ndarray | None = None
        self._batch_rngs: list[np.random.Generator] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "phi_hat": None if self._phi is None else torch.from_numpy(self._phi.copy()),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "batch_phi_hat": None if self._batch_phi is None else torch.from_numpy(self._batch_phi.copy()),
            "batch_rng": None if self._batch_rngs is None
            else [copy.deepcopy(r.bit_generator.state) for r in self._batch_rngs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"phi_hat", "rng", "batch_phi_hat", "batch_rng"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"GradVac state must have keys {sorted(expected)}, got {got}")
        phi = _targets("phi_hat", state["phi_hat"], ndim=2)
        batch_phi = _targets("batch_phi_hat", state["batch_phi_hat"], ndim=3)
        rng = _generator(state["rng"])
        batch = state["batch_rng"]
        if (batch is None) != (batch_phi is None) or (
            batch is not None and (not isinstance(batch, list) or len(batch) != batch_phi.shape[0])
        ):
            raise ValueError("GradVac state: batch_rng must hold one generator state per batch entry")
        self._phi, self._rng, self._batch_phi = phi, rng, batch_phi
        self._batch_rngs = None if batch is None else [_generator(s) for s in batch]

    # ------------------------------------------------------------------------------------
    # Weights
    # ------------------------------------------------------------------------------------
    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        K = M.shape[0]
        if self._phi is None:
            self._phi = np.zeros((K, K))
        elif self._phi.shape != (K, K):
            raise ValueError(
                f"GradVac was last called with {self._phi.shape[0]} tasks and now gets {K}; "
                "call reset() between runs with different numbers of tasks"
            )
        return torch.from_numpy(self._vaccinate(M.numpy(), self._phi, self._rng))

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        B, K = M.shape[0], M.shape[1]
        if self._batch_phi is None:
            self._batch_phi = np.zeros((B, K, K))
            self._batch_rngs = [np.random.default_rng(self.seed) for _ in range(B)]
        elif self._batch_phi.shape != (B, K, K):
            raise ValueError(
                f"GradVac keeps one state per batch entry: it was last called with (B, K) = "
                f"{self._batch_phi.shape[:2]} and now gets {(B, K)}; call reset() first"
            )
        M_np = M.numpy()
        assert self._batch_rngs is not None
        out = [self._vaccinate(M_np[b], self._batch_phi[b], self._batch_rngs[b]) for b in range(B)]
        return torch.from_numpy(np.stack(out))

    def _vaccinate(self, M: np.ndarray, phi_hat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Algorithm 1 on the Gramian; updates ``phi_hat`` in place and returns ``Σ_i c_i``."""
        K = M.shape[0]
        rows = M.tolist()
        norms = [math.sqrt(max(rows[j][j], 0.0)) for j in range(K)]
        beta, eps = self.beta, self.eps
        total = [0.0] * K
        for i in range(K):
            c = [0.0] * K
            c[i] = 1.0
            cM = list(rows[i])          # (c M): inner products of g_i' with every g_k
            sq = rows[i][i]             # ‖g_i'‖²
            others = [j for j in range(K) if j != i]
            for idx in rng.permutation(len(others)).tolist():
                j = others[idx]
                norm_i = math.sqrt(max(sq, 0.0))
                phi = cM[j] / (norm_i * norms[j] + eps)
                target = phi_hat[i, j]
                if phi < target:
                    root_phi = math.sqrt(max(1.0 - phi * phi, 0.0))
                    root_target = math.sqrt(max(1.0 - target * target, 0.0))
                    w = norm_i * (target * root_phi - phi * root_target) / (norms[j] * root_target + eps)
                    c[j] += w
                    sq += 2.0 * w * cM[j] + w * w * rows[j][j]
                    cM = [a + w * b for a, b in zip(cM, rows[j])]
                phi_hat[i, j] = (1.0 - beta) * target + beta * phi
            total = [a + b for a, b in zip(total, c)]
        return np.array(total)


def _targets(name: str, value: object, ndim: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = value.detach().cpu().to(torch.float64).numpy().copy() if isinstance(value, Tensor) \
        else np.array(value, dtype=np.float64)
    if arr.ndim != ndim or arr.shape[-1] != arr.shape[-2] or not np.isfinite(arr).all():
        raise ValueError(f"GradVac state {name!r} must be a finite {ndim}-d array of K × K targets")
    return arr


def _generator(state: object) -> np.random.Generator:
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = copy.deepcopy(state)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"GradVac state: not a generator state ({exc})") from None
    return rng
