"""mtl_opt.solvers: one entry point per K × K problem, for one Gramian and for a batch.

Each entry point takes (K, K) or (B, K, K), answers in the form it was given (tensor or NumPy
array, one entry or a batch), gives a single Gramian the same answer as its entry in a batch (the
single call runs on Python floats, the batch on arrays), and raises a ``SolverError`` subclass,
never an uncertified answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtl_opt.solvers.cagrad_dual as cagrad_dual
import mtl_opt.solvers.min_norm as min_norm
import mtl_opt.solvers.nash as nash
from mtl_opt.solvers import (
    ConflictAverseSolverError,
    DualConeError,
    FairGradSolverError,
    MinNormSolverError,
    NashSolverError,
    SolverError,
    alpha_fair_weights,
    conflict_averse,
    dual_cone_weights,
    min_norm_weights,
    nash_weights,
)


def _gramians(B: int, K: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(B, K, 6)) * np.exp(rng.normal(size=(B, K, 1)))
    M = G @ G.transpose(0, 2, 1)
    return 0.5 * (M + M.transpose(0, 2, 1))


def test_every_solver_error_is_a_solver_error() -> None:
    for error in (MinNormSolverError, ConflictAverseSolverError, DualConeError, NashSolverError,
                  FairGradSolverError):
        assert issubclass(error, SolverError) and issubclass(error, RuntimeError)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 6, 8])
def test_single_gramian_equals_its_entry_in_a_batch(K: int) -> None:
    M = _gramians(5, K, seed=K)
    alpha = min_norm_weights(M)
    w, gamma = conflict_averse(M, 0.4)
    nash_alpha, _ = nash_weights(M)
    U = np.broadcast_to(np.eye(K) / K, (5, K, K))
    W = dual_cone_weights(M, U)
    for b in range(5):
        scale = M[b].diagonal().max()
        single = min_norm_weights(M[b])
        assert abs(single @ M[b] @ single - alpha[b] @ M[b] @ alpha[b]) <= 1e-12 * scale
        w1, gamma1 = conflict_averse(M[b], 0.4)
        np.testing.assert_allclose(gamma1, gamma[b], rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(nash_weights(M[b])[0], nash_alpha[b], rtol=1e-9)
        np.testing.assert_allclose(dual_cone_weights(M[b], U[b]), W[b], rtol=1e-9, atol=1e-12)


def test_entry_points_answer_in_the_form_they_were_given() -> None:
    M = _gramians(3, 3)
    assert isinstance(min_norm_weights(M), np.ndarray) and min_norm_weights(M).shape == (3, 3)
    t = min_norm_weights(torch.from_numpy(M[0]))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.shape == (3,)
    w, gamma = conflict_averse(torch.from_numpy(M), 1.0)
    assert isinstance(w, torch.Tensor) and w.shape == gamma.shape == (3, 3)
    assert dual_cone_weights(M[0], np.eye(3)).shape == (3, 3)


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="min_norm_weights: the Gramian is not finite"):
        min_norm_weights(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="conflict_averse: expected a Gramian"):
        conflict_averse(np.ones(3), 0.4)
    with pytest.raises(ValueError, match="radius factor c"):
        conflict_averse(np.eye(2), -1.0)
    with pytest.raises(ValueError, match="nash_weights: expected a Gramian"):
        nash_weights(np.ones((2, 3)))
    with pytest.raises(ValueError, match="dual_cone_weights: expected"):
        dual_cone_weights(np.eye(3), np.ones((2, 4)))


def test_min_norm_raises_rather_than_return_an_uncertified_point(monkeypatch) -> None:
    monkeypatch.setattr(min_norm, "_min_norm_kkt_ok", lambda A, alpha, tol: False)
    M = _gramians(2, 7)  # a batch at K = 7: the NNLS solver, whose answer must pass the KKT test
    with pytest.raises(MinNormSolverError, match="KKT"):
        min_norm_weights(M)


def test_nash_raises_rather_than_return_an_unconverged_point(monkeypatch) -> None:
    monkeypatch.setattr(nash, "MAX_NEWTON_ITERATIONS", 0)
    with pytest.raises(NashSolverError, match="did not converge"):
        nash_weights(_gramians(2, 4))


def test_alpha_fair_at_alpha_one_solves_the_nash_system() -> None:
    M = _gramians(1, 4)[0]
    w, _ = alpha_fair_weights(M, 1.0)
    alpha, _ = nash_weights(M)
    np.testing.assert_allclose(w, alpha, rtol=1e-8)


def test_two_task_single_call_certifies_its_edge_answer(monkeypatch) -> None:
    """The K = 2 closed form on floats is certified like the batched one: an edge answer that
    fails the primal/dual certificate goes to the batched solver (which re-solves it)."""
    M = np.array([[1.0, -0.5], [-0.5, 1.25]])  # conflicting rows: an edge optimum for c = 0.4
    w1, _, live, edge, _ = cagrad_dual.conflict_averse_2(1.0, -0.5, 1.25, 0.4, cagrad_dual.FLOAT_OPS)
    assert live and edge and 0.0 < w1 < 1.0
    calls = []
    original = cagrad_dual._conflict_averse_batch

    def batched(M, c):
        calls.append(M)
        return original(M, c)

    monkeypatch.setattr(cagrad_dual, "_conflict_averse_batch", batched)
    conflict_averse(M, 0.4)
    assert calls == []  # certified on floats
    monkeypatch.setattr(cagrad_dual, "_ca_certified_radius", lambda *args: None)
    w, gamma = conflict_averse(M, 0.4)
    assert len(calls) == 1  # not certified: handed to the batched solver
    assert w[0] == pytest.approx(w1, rel=1e-9)
