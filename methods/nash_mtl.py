"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from mtl_opt._validation import check_choice, check_range
from mtl_opt.aggregator import GramianAggregator
from mtl_opt.methods._combinations import clip_to_norm
from mtl_opt.registry import register_aggregator
from mtl_opt.solvers import NashSolverError, nash_weights
from mtl_opt.solvers.nash import NashSCAProblem, nash_cvxpy

__all__ = ["NashMTL", "NashSolverError"]


@register_aggregator("nash_mtl")
class NashMTL(GramianAggregator):
    """Nash-MTL: the Nash bargaining solution of the tasks, ``d = αᵀG`` with ``(G Gᵀ) α = 1/α``.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya. "Multi-Task Learning as a
    Bargaining Game", ICML 2022. Each task's utility of an update ``d`` is ``u_i = g_iᵀd``; the
    Nash bargaining solution maximises ``Σ_i log u_i`` over the ball ``‖d‖ ≤ ε``. Its solution is
    ``d ∝ Σ_i α_i g_i`` with ``α > 0`` solving, for the Gramian ``M = G Gᵀ``,

        M α = 1/α        (element-wise: α_i (Mα)_i = 1 for every task i).

    Properties (all tested):

    * Scale: ``‖αᵀG‖² = αᵀMα = Σ_i α_i (Mα)_i = K``, so the raw direction has norm ``√K``
      whatever the gradients' scale. ``G → sG`` gives ``α → α/s`` and the same direction; more
      generally each task's gradient can be rescaled on its own (``g_i → s_i g_i``,
      ``α_i → α_i/s_i``) without changing the direction: only the unit gradients matter.
    * ``K = 1``: ``α = 1/‖g‖`` (the unit gradient). ``K = 2``: closed form
      ``α_i = 1/(‖g_i‖ √(1 + cos θ))`` (``1 + cos θ + σ`` with the ridge below): the direction
      is the sum of the two unit gradients divided by ``√(1 + cos θ)``.

    Solvers (``solver=``):

    * ``"exact"`` (default): a closed form at ``K ≤ 2``, otherwise damped Newton on the strictly
      convex ``f(α) = ½αᵀMα − Σ log α_i`` (whose stationarity condition is the equation above)
      with a positivity-keeping step rule and, near the solution, Chebyshev's third-order
      correction; warm-started from the previous weights (usually two iterations); it stops at
      a scale-free residual ``max_i |α_i (Mα)_i − 1| ≤ 1e-10`` and raises
      :class:`NashSolverError` (with the residual and the iteration count) if it does not
      converge. Equal weights are never returned in place of a solution.
    * ``"cvxpy"``: the original implementation's sequential convex approximation (up to
      ``optim_niter`` conic solves per aggregation, warm-started from the previous weights),
      built once as a cvxpy Problem with Parameters and solved by CLARABEL. A solve that does not
      end optimal raises :class:`NashSolverError` (the original silently kept its previous or
      all-ones weights). cvxpy is imported only when this solver first runs. The class attributes
      ``cvxpy_solver`` / ``cvxpy_options`` (overridable per instance) choose the cvxpy solver and
      its options. See ``mtl_opt.solvers.nash.NashSCAProblem`` for the formulation and
      every deliberate difference from the original.

    Degenerate Gramians (documented behaviour, finite in every case):

    * A Nash solution exists exactly when the zero vector is not in the convex hull of the unit
      task gradients. Both solvers solve the slightly regularised ``(M + σ diag(M)) α = 1/α``
      with ``σ = 1e-9`` (plus, only when rounding made the cosine matrix indefinite, its most
      negative eigenvalue; ``σ = 0`` when fewer than two tasks bargain), which always has one
      solution and keeps the per-task scale invariance. On a non-degenerate problem this
      changes ``α`` by a relative ~1e-9.
    * Identical or positively collinear rows: an ordinary solution (e.g. two identical rows give
      ``α_i = 1/(√2 ‖g‖)``, direction ``√2 g/‖g‖``).
    * Exactly opposing rows (``g_2 = −c g_1``, or any Pareto-stationary set of rows): no Nash
      solution exists; the weights are large (``≈ 1/(‖g_i‖√σ)``, e.g. 3e4/‖g_i‖) but finite
      and the opposing rows' contribution to the direction tends to zero (``O(√σ)``), so the
      method does not move along them; other tasks still get their share. (``solver="cvxpy"``
      is at the limit of its conic solver's precision there: it returns the same near-zero
      direction with less accurate weights, or raises :class:`NashSolverError`.)
    * A task with an exactly zero gradient gets ``α_i = 0`` and is left out of the bargaining
      (it contributes nothing to the direction for any weight); all-zero gradients give zero
      weights and a zero direction.

    Args:
        update_weights_every: re-solve the weights every this many calls; in between the
            previous ``α`` is reused with the new Jacobian (``d = α_prevᵀG``), as in the original
            (its ``--update-weights-every``). Each re-solve is warm-started from the previous α.
        optim_niter: the maximum number of SCA iterations (convex solves) of ``solver="cvxpy"``
            (the original's ``--nashmtl-optim-niter``, default 20). The exact solver does not use
            it (it iterates to its tolerance).
        max_norm: clip the direction to this norm (0 disables). The original clips the shared
            parameters' gradient with ``clip_grad_norm_(shared_parameters, max_norm)`` right
            after the weighted backward, i.e. it clips exactly this direction; here the clipping
            happens inside the aggregator and is folded into the returned weights
            (``weights = α · min(1, max_norm/‖αᵀG‖)``, so ``direction = weightsᵀG`` still
            holds). Because ``‖α*ᵀG‖ = √K``, with the default ``max_norm=1`` every freshly
            solved direction of ``K ≥ 2`` tasks has norm exactly 1: the learning rate alone sets
            the step length. If you also clip gradients in your training loop, note that the
            shared part already has norm ≤ ``max_norm`` (a further clip with a larger threshold
            does nothing to it; a global clip over shared and task-specific parameters sees it
            at that norm); use ``max_norm=0`` to get the raw ``α*ᵀG`` and clip yourself.
        solver: ``"exact"`` or ``"cvxpy"``.

    State (``state_dict``): the call counter and the cached ``α`` (of single calls and, kept
    separately, of batched calls: one ``α`` per batch entry). ``reset()`` forgets both. This is
    everything that influences later calls, for both solvers (the cvxpy solver keeps no solver
    state between aggregations): loading it into a fresh instance continues bit for bit.
    """

    state = "tracked"
    properties = frozenset({"permutation_invariant"})  # checked in tests/test_method_properties.py
    SOLVERS: ClassVar[tuple[str, ...]] = ("exact", "cvxpy")
    cvxpy_solver: ClassVar[str] = "CLARABEL"

    def __init__(
        self,
        update_weights_every: int = 1,
        optim_niter: int = 20,
        max_norm: float = 1.0,
        solver: str = "exact",
    ) -> None:
        owner = "NashMTL"
        self.update_weights_every = _positive_int("update_weights_every", update_weights_every, owner)
        self.optim_niter = _positive_int("optim_niter", optim_niter, owner)
        self.max_norm = check_range("max_norm", max_norm, low=0.0, owner=owner)
        self.solver = check_choice("solver", solver, self.SOLVERS, owner=owner)
        self.cvxpy_options: dict[str, Any] = {}
        self._problems: dict[int, NashSCAProblem] = {}
        self.last_info: dict[str, Any] | None = None
        self.reset()

    # ------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._step = 0
        self._alpha: np.ndarray | None = None
        self._batch_step = 0
        self._batch_alpha: np.ndarray | None = None
        self.last_info = None

    @property
    def alpha(self) -> Tensor | None:
        """The Nash weights ``α`` of the last single-call solve (before clipping), or ``None``."""
        return None if self._alpha is None else torch.from_numpy(self._alpha.copy())

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "alpha": None if self._alpha is None else torch.from_numpy(self._alpha.copy()),
            "batch_step": self._batch_step,
            "batch_alpha": None if self._batch_alpha is None else torch.from_numpy(self._batch_alpha.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"step", "alpha", "batch_step", "batch_alpha"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"NashMTL state must have keys {sorted(expected)}, got {got}")
        step = _counter("step", state["step"])
        batch_step = _counter("batch_step", state["batch_step"])
        alpha = _cached_alpha("alpha", state["alpha"], ndim=1)
        batch_alpha = _cached_alpha("batch_alpha", state["batch_alpha"], ndim=2)
        self._step, self._alpha = step, alpha
        self._batch_step, self._batch_alpha = batch_step, batch_alpha

    # ------------------------------------------------------------------------------------
    # Weights
    # ------------------------------------------------------------------------------------
    def _weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        K = M.shape[0]
        if self._alpha is not None and self._alpha.shape[0] != K:
            raise ValueError(
                f"NashMTL was last called with {self._alpha.shape[0]} tasks and now gets {K}; "
                "call reset() between runs with different numbers of tasks"
            )
        resolve = self._alpha is None or self._step % self.update_weights_every == 0
        M_np = M.numpy()
        if resolve:
            if self.solver == "exact":
                alpha, info = nash_weights(M_np, self._alpha)
            else:
                alpha, info = self._cvxpy_one(M_np, self._alpha)
            self._alpha = alpha
            self.last_info = {"solver": self.solver, "resolved": True, **info}
        else:
            alpha = self._alpha
            self.last_info = {"solver": self.solver, "resolved": False}
        self._step += 1
        return torch.from_numpy(self._clip(M_np[None], alpha[None])[0])

    def _batch_weights(self, M: Tensor, *, losses: Tensor | None, task_weights: Tensor | None) -> Tensor:
        M_np = M.numpy()
        B, K = M_np.shape[:2]
        if self._batch_alpha is not None and self._batch_alpha.shape != (B, K):
            raise ValueError(
                f"NashMTL keeps one state per batch entry: it was last called with (B, K) = "
                f"{self._batch_alpha.shape} and now gets {(B, K)}; call reset() first"
            )
        if self._batch_alpha is None or self._batch_step % self.update_weights_every == 0:
            if self.solver == "exact":
                alpha, info = nash_weights(M_np, self._batch_alpha)
            else:
                # cvxpy solves one problem at a time: loop over the batch entries.
                rows, infos = [], []
                for b in range(B):
                    warm = None if self._batch_alpha is None else self._batch_alpha[b]
                    row, row_info = self._cvxpy_one(M_np[b], warm)
                    rows.append(row)
                    infos.append(row_info)
                alpha = np.stack(rows)
                info = {
                    "iterations": max(i["iterations"] for i in infos),
                    "residual": max(i["residual"] for i in infos),
                }
            self._batch_alpha = alpha
            self.last_info = {"solver": self.solver, "resolved": True, **info}
        else:
            alpha = self._batch_alpha
            self.last_info = {"solver": self.solver, "resolved": False}
        self._batch_step += 1
        return torch.from_numpy(self._clip(M_np, alpha))

    def _cvxpy_one(self, M: np.ndarray, warm: np.ndarray | None) -> tuple[np.ndarray, dict[str, Any]]:
        return nash_cvxpy(
            M, warm, self.optim_niter, self._problems,
            solver=self.cvxpy_solver, solver_options=self.cvxpy_options,
        )

    def _clip(self, M: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """``α · min(1, max_norm/‖αᵀG‖)`` with ``‖αᵀG‖² = αᵀMα`` (B, K)."""
        return clip_to_norm(M, alpha, self.max_norm)

def _positive_int(name: str, value: object, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {value!r}")
    return int(value)


def _counter(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"NashMTL state {name!r} must be a non-negative integer, got {value!r}")
    return int(value)


def _cached_alpha(name: str, value: object, ndim: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = value.detach().cpu().to(torch.float64).numpy() if isinstance(value, Tensor) else np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(
            f"NashMTL state {name!r} must be a finite non-negative array with {ndim} dimension(s), "
            f"got {value!r}"
        )
    return arr.copy()
