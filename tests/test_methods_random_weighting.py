"""GradDrop and RGW against float64 references written from their papers' equations, against
TorchJD's implementations on the same draws, and their named properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mtl_opt
from mtl_opt.methods.graddrop import GradDrop
from mtl_opt.methods.rgw import RGW

KS = [2, 3, 4, 5, 6, 7, 8]


def mixed_jacobian(K: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-3, 3, K, dtype=torch.float64)
    G = torch.randn(K, d, generator=g, dtype=torch.float64) * scales[:, None]
    G[:, :3] = 0.0  # columns without any gradient
    G[0, 3] = 0.0  # a zero entry beside non-zero ones
    return G


# ------------------------------------------------------------------------------- GradDrop
def graddrop_reference(G: np.ndarray, U: np.ndarray, leak: list[float]) -> np.ndarray:
    """Algorithm 1 of Chen et al. (2020), lines 10–15, coordinate by coordinate."""
    K, d = G.shape
    out = np.zeros(d)
    for k in range(d):
        col = G[:, k]
        total_abs = sum(abs(x) for x in col)
        P = 0.5 * (1.0 + sum(col) / total_abs) if total_abs > 0 else 0.5
        for i in range(K):
            mask = (1.0 if (P > U[k] and col[i] > 0) or (P < U[k] and col[i] < 0) else 0.0)
            out[k] += (leak[i] + (1.0 - leak[i]) * mask) * col[i]
    return out


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("with_leak", [False, True])
def test_graddrop_matches_the_reference_over_several_calls(K, with_leak):
    leak = [i / (K - 1) for i in range(K)] if with_leak else [0.0] * K
    agg = GradDrop(leak=leak if with_leak else None, seed=11)
    draws = torch.Generator().manual_seed(11)  # the documented stream: one rand(d) per call
    for call in range(3):
        G = mixed_jacobian(K, 40, seed=100 * K + call)
        U = torch.rand(40, generator=draws, dtype=torch.float64).numpy()
        expected = graddrop_reference(G.numpy(), U, leak)
        np.testing.assert_allclose(agg(G).numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [2, 3, 5, 8])
def test_graddrop_equals_torchjd_on_the_same_draws(K):
    from torchjd.aggregation import GradDrop as TorchJDGradDrop

    # TorchJD draws U with torch.rand from the global generator in G's dtype; ours draws it in
    # float64 from a generator seeded alike, so float64 inputs give the same U and the same output.
    leak = torch.linspace(0.0, 1.0, K, dtype=torch.float64)
    for seed in range(3):
        G = mixed_jacobian(K, 64, seed)
        ours = GradDrop(leak=leak.tolist(), seed=seed)(G)
        torch.manual_seed(seed)
        theirs = TorchJDGradDrop(leak=leak)(G)
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
        torch.manual_seed(seed)
        torch.testing.assert_close(GradDrop(seed=seed)(G), TorchJDGradDrop()(G), rtol=1e-13, atol=1e-13)


def test_graddrop_without_sign_conflict_is_the_sum():
    # A coordinate whose gradients share a sign has P = 1 (or 0) and keeps every gradient.
    G = torch.tensor([[1.0, -2.0, 0.0, 3.0], [0.5, -1.0, 0.0, 0.0], [2.0, -0.1, 0.0, 1.0]],
                     dtype=torch.float64)
    torch.testing.assert_close(GradDrop(seed=0)(G), G.sum(0), rtol=0, atol=0)


def test_graddrop_keeps_one_sign_per_coordinate_and_full_leak_is_the_sum():
    G = mixed_jacobian(4, 200, seed=3)
    agg = GradDrop(seed=5)
    out = agg(G)
    pos = torch.where(G > 0, G, 0.0).sum(0)
    neg = torch.where(G < 0, G, 0.0).sum(0)
    kept_pos = torch.isclose(out, pos, rtol=1e-14, atol=0)
    kept_neg = torch.isclose(out, neg, rtol=1e-14, atol=0)
    assert bool((kept_pos | kept_neg).all())
    conflicted = (pos != 0) & (neg != 0)
    assert bool(kept_pos[conflicted].any()) and bool(kept_neg[conflicted].any())
    torch.testing.assert_close(GradDrop(leak=[1.0] * 4, seed=5)(G), G.sum(0), rtol=1e-14, atol=1e-14)


def test_graddrop_keeps_the_positive_sign_with_probability_P():
    # One coordinate, P = ½(1 + 1/3) = 2/3: over many calls the positive side survives ~2/3.
    G = torch.tensor([[2.0], [-1.0]], dtype=torch.float64)
    agg = GradDrop(seed=1)
    share = sum(float(agg(G)[0]) > 0 for _ in range(4000)) / 4000
    assert abs(share - 2 / 3) < 0.03


def test_graddrop_rejects_bad_leaks():
    with pytest.raises(ValueError, match=r"leak\[1\]"):
        GradDrop(leak=[0.0, 1.5])
    with pytest.raises(TypeError, match="leak"):
        GradDrop(leak="0.5")
    with pytest.raises(ValueError, match="2 leak values but the Jacobian has 3 tasks"):
        GradDrop(leak=[0.0, 0.5], seed=0)(torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="seed"):
        GradDrop(seed=1.5)


# ------------------------------------------------------------------------------- RGW
@pytest.mark.parametrize("K", KS)
def test_rgw_matches_softmax_of_normal_draws(K):
    agg = RGW(seed=7)
    draws = torch.Generator().manual_seed(7)
    for call in range(4):
        G = mixed_jacobian(K, 9, seed=call)
        z = torch.randn(K, generator=draws, dtype=torch.float64).tolist()
        expo = [math.exp(v - max(z)) for v in z]
        lam = np.array([e / sum(expo) for e in expo])
        res = agg.aggregate(G)
        np.testing.assert_allclose(res.weights.numpy(), lam, rtol=1e-13, atol=0)
        np.testing.assert_allclose(res.direction.numpy(), lam @ G.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [2, 4, 8])
def test_rgw_equals_torchjd_random_on_the_same_draws(K):
    from torchjd.aggregation import Random

    for seed in range(3):
        G = mixed_jacobian(K, 16, seed)
        ours = RGW(seed=seed)(G)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours, Random()(G), rtol=1e-13, atol=1e-13)


def test_rgw_weights_are_a_random_point_of_the_open_simplex():
    agg = RGW(seed=0)
    M = torch.eye(5, dtype=torch.float64)
    seen = torch.stack([agg.weights(M) for _ in range(50)])
    assert bool((seen > 0).all())
    torch.testing.assert_close(seen.sum(1), torch.ones(50, dtype=torch.float64), rtol=1e-15, atol=1e-15)
    assert len({tuple(row.tolist()) for row in seen}) == 50  # a fresh draw every call
    agg.reset()
    torch.testing.assert_close(agg.weights(M), seen[0], rtol=0, atol=0)


def test_rgw_is_registered_and_seeded():
    assert isinstance(mtl_opt.get_aggregator("rgw", seed=3), RGW)
    with pytest.raises(TypeError, match="seed"):
        RGW(seed="x")
