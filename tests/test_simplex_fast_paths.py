"""The scalar K = 2 paths of mtl_opt.simplex equal the vectorised closed forms they shortcut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_opt import simplex


def _gramians() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(300):
        A = rng.normal(size=(2, rng.integers(1, 5))) * rng.lognormal(sigma=2.0, size=(2, 1))
        out.append(A @ A.T)
    g = np.array([1.0, -2.0, 0.5])
    for rows in (
        [g, g],                 # identical
        [g, -g],                # opposite
        [g, 3 * g],             # collinear, unequal norms
        [g, np.zeros(3)],       # one zero row
        [np.zeros(3), np.zeros(3)],  # all zero
        [g, np.array([2.0, 1.0, 0.0])],  # orthogonal
        [g, -g + 1e-9],         # nearly opposite
        [g * 1e-150, g * 1e150],  # extreme scales
    ):
        G = np.stack(rows)
        out.append(G @ G.T)
    return out


def _vectorised_min_norm(M: np.ndarray) -> np.ndarray:
    return simplex.min_norm_weights(np.stack([M, M]))[0].numpy()  # B = 2 bypasses the fast path


def _vectorised_ca(M: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    w = simplex.conflict_averse_weights(np.stack([M, M]), c)[0].numpy()
    coef = simplex.conflict_averse_coefficients(np.stack([M, M]), c)[0].numpy()
    return w, coef


@pytest.mark.parametrize("as_tensor", [True, False])
@pytest.mark.parametrize("batched", [False, True])
def test_min_norm_fast_path_equals_vectorised(as_tensor, batched):
    for M in _gramians():
        X = M[None] if batched else M
        got = simplex.min_norm_weights(torch.from_numpy(X) if as_tensor else X)
        assert got.dtype == torch.float64 and tuple(got.shape) == ((1, 2) if batched else (2,))
        np.testing.assert_array_equal(got.reshape(2).numpy(), _vectorised_min_norm(M))


@pytest.mark.parametrize("c", [0.0, 0.1, 0.4, 0.5, 2.0, 50.0])
def test_conflict_averse_fast_path_equals_vectorised(c):
    for M in _gramians():
        w_ref, coef_ref = _vectorised_ca(M, c)
        for X in (M, M[None]):
            w = simplex.conflict_averse_weights(torch.from_numpy(X), c)
            coef = simplex.conflict_averse_coefficients(torch.from_numpy(X), c)
            assert w.shape == coef.shape == ((2,) if X.ndim == 2 else (1, 2))
            np.testing.assert_array_equal(w.reshape(2).numpy(), w_ref)
            np.testing.assert_allclose(coef.reshape(2).numpy(), coef_ref, rtol=1e-14, atol=0)  # r² to rounding


def test_fast_path_leaves_bad_input_to_the_general_checks():
    bad = np.array([[1.0, np.nan], [np.nan, 1.0]])
    with pytest.raises(ValueError, match="not finite"):
        simplex.min_norm_weights(bad)
    with pytest.raises(ValueError, match="not finite"):
        simplex.conflict_averse_weights(torch.from_numpy(bad), 0.4)
    with pytest.raises(ValueError, match=">= 0"):
        simplex.conflict_averse_weights(np.eye(2), -1.0)
    # Symmetrised like the general path: an asymmetric input uses (M + Mᵀ)/2.
    M = np.array([[2.0, 0.3], [-0.1, 1.0]])
    np.testing.assert_array_equal(simplex.min_norm_weights(M).numpy(), _vectorised_min_norm(0.5 * (M + M.T)))
