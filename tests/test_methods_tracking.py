"""DB-MTL and MoCo (methods that keep moving averages of the Jacobian) against float64
references written from their papers' equations, over several calls, and their properties."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mtl_opt.methods.db_mtl import DBMTL
from mtl_opt.methods.moco import MoCo

KS = [2, 3, 4, 5, 6, 7, 8]
N_CALLS = 4


def calls(K: int, d: int = 11, seed: int = 0):
    """Jacobians of mixed scales (and one zero row) with positive losses, one per call."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, K, dtype=torch.float64)
    out = []
    for c in range(N_CALLS):
        G = torch.randn(K, d, generator=g, dtype=torch.float64) * scales[:, None]
        if c == 1:
            G[-1] = 0.0
        losses = torch.rand(K, generator=g, dtype=torch.float64) * 3 + 0.1
        out.append((G, losses))
    return out


# ------------------------------------------------------------------------------- DB-MTL
def db_mtl_reference(sequence, beta: float, sigma: float, eps: float) -> list[np.ndarray]:
    """Lin et al. (2023): ĝ_t = β_t ĝ_{t−1} + (1 − β_t) ∇log(L + ε), d = Σ max‖ĝ‖/(‖ĝ_i‖+ε) ĝ_i."""
    buf = None
    outs = []
    for t, (G, L) in enumerate(sequence, start=1):
        G, L = G.numpy(), L.numpy()
        h = np.stack([G[i] / (L[i] + eps) for i in range(G.shape[0])])
        b_t = beta / t**sigma
        buf = (1 - b_t) * h if buf is None else b_t * buf + (1 - b_t) * h
        norms = [float(np.sqrt(np.sum(row * row))) for row in buf]
        top = max(norms)
        outs.append(sum((top / (n + eps)) * row for n, row in zip(norms, buf)))
    return outs


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("beta,sigma", [(0.9, 0.0), (0.5, 0.5), (0.0, 0.0)])
def test_db_mtl_matches_the_reference_over_several_calls(K, beta, sigma):
    seq = calls(K, seed=K)
    agg = DBMTL(beta=beta, beta_sigma=sigma)
    expected = db_mtl_reference(seq, beta, sigma, 1e-8)
    for (G, L), ref in zip(seq, expected):
        np.testing.assert_allclose(agg(G, losses=L).numpy(), ref, rtol=1e-10, atol=1e-12)


def test_db_mtl_batch_keeps_one_moving_average_per_entry():
    seqs = [calls(3, seed=s) for s in range(4)]
    batch = DBMTL()
    singles = [DBMTL() for _ in seqs]
    for c in range(N_CALLS):
        G = torch.stack([s[c][0] for s in seqs])
        L = torch.stack([s[c][1] for s in seqs])
        out = batch.aggregate_batch(G, losses=L)
        for b, agg in enumerate(singles):
            torch.testing.assert_close(out[b], agg(seqs[b][c][0], losses=seqs[b][c][1]), rtol=1e-13, atol=1e-13)


def test_db_mtl_is_invariant_to_each_task_loss_scale():
    # log(c L_i) has the gradient of log L_i: scaling a task's loss (and so its gradient) by c
    # changes nothing but the ε terms.
    seq = calls(4, seed=2)
    c = torch.tensor([1e-3, 1.0, 50.0, 7.0], dtype=torch.float64)
    a, b = DBMTL(eps=1e-300), DBMTL(eps=1e-300)
    for G, L in seq:
        torch.testing.assert_close(a(G, losses=L), b(G * c[:, None], losses=L * c), rtol=1e-12, atol=1e-14)


def test_db_mtl_balances_every_task_to_the_largest_norm():
    G = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, -7.0]], dtype=torch.float64)
    L = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    out = DBMTL(beta=0.0, eps=1e-14)(G, losses=L)  # no memory: h_i = g_i / L_i, norms 3, 0.05, 14
    torch.testing.assert_close(out, torch.tensor([14.0, 14.0, -14.0], dtype=torch.float64), rtol=1e-8, atol=0)


def test_db_mtl_state_round_trip_and_clear_errors():
    seq = calls(3)
    agg = DBMTL()
    for G, L in seq[:2]:
        agg(G, losses=L)
    other = DBMTL()
    other.load_state_dict(copy.deepcopy(agg.state_dict()))
    assert torch.equal(other(*seq[2][:1], losses=seq[2][1]), agg(seq[2][0], losses=seq[2][1]))
    with pytest.raises(ValueError, match="non-negative"):
        agg(seq[0][0], losses=torch.tensor([1.0, -0.5, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="reset"):
        agg(torch.ones(3, 5, dtype=torch.float64), losses=seq[0][1])
    with pytest.raises(ValueError, match="keys"):
        agg.load_state_dict({"step": 1})
    with pytest.raises(ValueError, match="beta"):
        DBMTL(beta=1.0)


# ------------------------------------------------------------------------------- MoCo
def simplex_projection_by_bisection(v: np.ndarray) -> np.ndarray:
    """argmin_{x∈Δ} ‖x − v‖: x = max(v − θ, 0) with Σ max(v − θ, 0) = 1, θ found by bisection."""
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0.0).sum() > 1.0:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - 0.5 * (lo + hi), 0.0)


def moco_reference(sequence, beta, gamma, rho, normalization, beta_sigma=0.0, gamma_sigma=0.0):
    """Fernando et al. (2023), Algorithm 1 with the authors' gradient normalisation."""
    K = sequence[0][0].shape[0]
    Y = np.zeros_like(sequence[0][0].numpy())
    lam = np.full(K, 1.0 / K)
    outs = []
    for k, (G, L) in enumerate(sequence, start=1):
        Y = Y - beta / k**beta_sigma * (Y - G.numpy())
        s = np.ones(K)
        norms = np.array([np.sqrt(np.sum(r * r)) for r in Y])
        if normalization in ("l2", "loss+"):
            s = np.where(norms > 0, norms, 1.0)
        if normalization in ("loss", "loss+"):
            s = s * L.numpy()
        Yh = Y / s[:, None]
        grad = np.array([sum(float(Yh[i] @ Yh[j]) * lam[j] for j in range(K)) for i in range(K)]) + rho * lam
        lam = simplex_projection_by_bisection(lam - gamma / k**gamma_sigma * grad)
        outs.append((lam @ Yh, lam.copy()))
    return outs


MOCO_CONFIGS = [
    dict(beta=0.1, gamma=0.1, rho=0.1, normalization="none"),
    dict(beta=0.5, gamma=2.0, rho=0.0, normalization="l2"),
    dict(beta=0.3, gamma=0.05, rho=0.2, normalization="loss"),
    dict(beta=0.9, gamma=1.0, rho=0.1, normalization="loss+", beta_sigma=0.5, gamma_sigma=0.5),
]


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("cfg", MOCO_CONFIGS, ids=lambda c: c["normalization"])
def test_moco_matches_the_reference_over_several_calls(K, cfg):
    seq = calls(K, seed=10 + K)
    if cfg["normalization"] == "none":
        seq = [(G / G.abs().max(), L) for G, L in seq]  # keep γ·‖Y‖² moderate: a non-trivial λ
    agg = MoCo(**cfg)
    for (G, L), (ref_d, ref_lam) in zip(seq, moco_reference(seq, **cfg)):
        out = agg(G, losses=L) if agg.uses_losses else agg(G)
        np.testing.assert_allclose(out.numpy(), ref_d, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(agg.state_dict()["lam"][0].numpy(), ref_lam, rtol=1e-7, atol=1e-9)


def test_moco_weights_stay_on_the_simplex_and_move():
    seq = calls(5, seed=4)
    agg = MoCo(gamma=5.0, normalization="l2")
    seen = []
    for G, _ in seq:
        agg(G)
        lam = agg.state_dict()["lam"][0]
        assert float(lam.min()) >= 0.0
        assert abs(float(lam.sum()) - 1.0) < 1e-12
        seen.append(lam)
    assert not torch.equal(seen[0], seen[-1])


def test_moco_single_task_follows_the_tracked_gradient():
    agg = MoCo(beta=0.5)
    G1 = torch.tensor([[2.0, -4.0]], dtype=torch.float64)
    G2 = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(agg(G1), 0.5 * G1[0])  # Y_1 = β G_1, λ = 1
    torch.testing.assert_close(agg(G2), 0.5 * (0.5 * G1[0]) + 0.5 * G2[0])


def test_moco_batch_keeps_one_state_per_entry_and_errors_are_clear():
    seqs = [calls(3, seed=s) for s in range(3)]
    batch, singles = MoCo(normalization="loss"), [MoCo(normalization="loss") for _ in seqs]
    for c in range(N_CALLS):
        G = torch.stack([s[c][0] for s in seqs])
        L = torch.stack([s[c][1] for s in seqs])
        out = batch.aggregate_batch(G, losses=L)
        for b, agg in enumerate(singles):
            torch.testing.assert_close(out[b], agg(seqs[b][c][0], losses=seqs[b][c][1]), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="positive"):
        singles[0](seqs[0][0][0], losses=torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="losses"):
        MoCo(normalization="loss")(seqs[0][0][0])
    with pytest.raises(ValueError, match="reset"):
        singles[1](torch.ones(4, 11, dtype=torch.float64), losses=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="normalization"):
        MoCo(normalization="max")


@pytest.mark.parametrize("name,kw", [("graddrop", {"seed": 0}), ("db_mtl", {"beta": 0.0}), ("moco", {})])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_elementwise_half_directions_are_computed_in_float32_and_checked(name, kw, dtype):
    import mtl_opt

    losses = {"losses": torch.ones(3, dtype=torch.float64)} if name == "db_mtl" else {}
    if name != "moco" and dtype == torch.float16:  # MoCo's direction is a convex combination: it fits
        G = torch.full((3, 4), 3e4, dtype=dtype)  # the three rows' sum, 9e4, exceeds float16
        with pytest.raises(ValueError, match="overflows float16"):
            mtl_opt.get_aggregator(name, **kw)(G, **losses)
    small = torch.tensor([[1.0, -2.0, 0.5], [0.25, 1.0, -1.0], [2.0, 0.0, 1.0]], dtype=dtype)
    out = mtl_opt.get_aggregator(name, **kw)(small, **losses)
    assert out.dtype == dtype
    torch.testing.assert_close(out, mtl_opt.get_aggregator(name, **kw)(small.float(), **losses).to(dtype))


def test_simplex_projection_is_exact_at_any_scale():
    # The projection is invariant to adding a constant to a row; at the scale of a huge λ step
    # (MoCo on gradients of 1e20: γ(YYᵀ + ρI)λ ~ 1e39) the unshifted cumulative sums cancel and
    # used to leave λ far off the simplex (entries ~1e22), so MoCo's direction overflowed.
    from mtl_opt.methods.moco import project_onto_simplex

    v = torch.tensor([[0.3, -0.2, 0.1], [2.0, 2.0, -5.0]], dtype=torch.float64)
    expected = project_onto_simplex(v)
    for shift in (1e3, -1e9):  # shifts that keep the differences representable
        torch.testing.assert_close(project_onto_simplex(v + shift), expected, rtol=0, atol=1e-6)
    huge = torch.tensor([[-1e39, -3e39, -2e39]], dtype=torch.float64)
    torch.testing.assert_close(project_onto_simplex(huge), torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
