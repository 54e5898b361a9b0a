"""GradNorm and PCD against float64 references written from their papers' equations, over
several calls (learned weights, moving averages), TorchJD's PCD, and their properties."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mtl_opt.methods.gradnorm import GradNorm
from mtl_opt.methods.pcd import PCD

KS = [2, 3, 4, 5, 6, 7, 8]


def jacobians(K: int, n: int, d: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, K, dtype=torch.float64)
    return [torch.randn(K, d, generator=g, dtype=torch.float64) * scales[:, None] for _ in range(n)]


# ------------------------------------------------------------------------------- GradNorm
def gradnorm_reference(Gs, losses, alpha, lr, update="sgd"):
    """Chen et al. (2018), Algorithm 1: d = Σ w_i(t) g_i, then the L_grad step and renormalisation;
    the Adam step is torch.optim.Adam's on a parameter holding w."""
    K = Gs[0].shape[0]
    w = [1.0] * K
    param = torch.nn.Parameter(torch.ones(K, dtype=torch.float64))
    adam = torch.optim.Adam([param], lr=lr)
    L0 = None
    outs = []
    for G, L in zip(Gs, losses):
        G, L = G.numpy(), L.tolist()
        L0 = L if L0 is None else L0
        outs.append((sum(w[i] * G[i] for i in range(K)), list(w)))
        n = [float(np.sqrt(G[i] @ G[i])) for i in range(K)]
        GW = [w[i] * n[i] for i in range(K)]
        Gbar = sum(GW) / K
        Lt = [L[i] / L0[i] for i in range(K)]
        r = [x / (sum(Lt) / K) for x in Lt]
        grad = [np.sign(GW[i] - Gbar * r[i] ** alpha) * n[i] for i in range(K)]
        if update == "sgd":
            w = [w[i] - lr * grad[i] for i in range(K)]
        else:
            with torch.no_grad():
                param.copy_(torch.tensor(w, dtype=torch.float64))
            param.grad = torch.tensor(grad, dtype=torch.float64)
            adam.step()
            w = param.detach().tolist()
        w = [K * x / sum(w) for x in w]
    return outs


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("alpha,lr,update", [(1.5, 0.025, "adam"), (0.12, 0.1, "adam"), (1.5, 0.025, "sgd"),
                                             (0.12, 0.01, "sgd"), (0.0, 0.002, "sgd")])
def test_gradnorm_matches_the_reference_over_several_calls(K, alpha, lr, update):
    scale = 1.0 if update == "adam" else 1 / 500  # sgd: norms below ~1 keep the weights positive
    Gs = [G * scale for G in jacobians(K, 6, seed=K)]
    g = torch.Generator().manual_seed(K)
    losses = [torch.rand(K, generator=g, dtype=torch.float64) + 0.2 for _ in Gs]
    agg = GradNorm(alpha=alpha, lr=lr, update=update)
    for G, L, (ref_d, ref_w) in zip(Gs, losses, gradnorm_reference(Gs, losses, alpha, lr, update)):
        res = agg.aggregate(G, losses=L)
        np.testing.assert_allclose(res.weights.numpy(), ref_w, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(res.direction.numpy(), ref_d, rtol=1e-10, atol=1e-12)


def test_gradnorm_weights_sum_to_K_and_shift_toward_the_slow_task():
    # Equal gradient norms; task 0's loss falls slower (higher L(t)/L(0)): it gets more weight.
    G = torch.eye(3, dtype=torch.float64)
    agg = GradNorm(alpha=1.0, lr=0.05, update="sgd")
    agg(G, losses=torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    w_prev = agg.task_weights_now
    for _ in range(5):
        agg(G, losses=torch.tensor([0.9, 0.5, 0.5], dtype=torch.float64))
        w = agg.task_weights_now
        assert abs(float(w.sum()) - 3.0) < 1e-12
        assert float(w[0]) > float(w_prev[0]) and float(w[1]) == pytest.approx(float(w[2]), rel=1e-12)
        w_prev = w


def test_gradnorm_errors_are_clear_and_state_round_trips():
    G = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="positive"):
        GradNorm()(G, losses=torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="lower lr"):
        big = torch.tensor([[100.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        GradNorm(lr=0.1, update="sgd")(big, losses=torch.tensor([1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="update"):
        GradNorm(update="rmsprop")
    with pytest.raises(ValueError, match="losses"):
        GradNorm()(G)
    agg = GradNorm()
    L = torch.tensor([1.0, 2.0], dtype=torch.float64)
    for _ in range(3):
        agg(G, losses=L * 0.9)
    other = GradNorm()
    other.load_state_dict(copy.deepcopy(agg.state_dict()))
    assert torch.equal(other(G, losses=L), agg(G, losses=L))
    with pytest.raises(ValueError, match="reset"):
        agg(torch.randn(3, 4, dtype=torch.float64), losses=torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------------------------- PCD
def pcd_qp_cvxpy(rows: np.ndarray, tau: np.ndarray) -> np.ndarray | None:
    """Def. 4.1 solved in the primal with explicit rows: argmin ½‖d − g̃_1‖², g̃_jᵀd ≥ τ_j‖g̃_j‖²."""
    import cvxpy as cp

    d = cp.Variable(rows.shape[1])
    cons = [rows[j] @ d >= tau[j - 1] * float(rows[j] @ rows[j]) for j in range(1, rows.shape[0])]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(d - rows[0])), cons)
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return None if prob.status == "infeasible" else d.value


def pcd_reference(Gs, tau, beta, eps):
    """Def. 4.5 normalisation, the QP (by cvxpy), and Algorithm 1's rescale, call by call."""
    K = Gs[0].shape[0]
    v = np.zeros(K)
    outs = []
    for t, G in enumerate(Gs, start=1):
        G = G.numpy()
        sq = np.array([float(r @ r) for r in G])
        v = beta * v + (1 - beta) * sq
        s = 1.0 / np.sqrt(v / (1 - beta**t) + eps)
        rows = G * s[:, None]
        d_tilde = pcd_qp_cvxpy(rows, np.broadcast_to(tau, (K - 1,))) if K > 1 else rows[0]
        outs.append(d_tilde * np.sqrt(sq[0]) / np.linalg.norm(d_tilde))
    return outs


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("tau", [0.02, 0.6])
def test_pcd_matches_the_primal_qp_over_several_calls(K, tau):
    Gs = jacobians(K, 4, d=3 * K, seed=20 + K)
    agg = PCD(tau=tau, beta=0.9)
    for G, ref in zip(Gs, pcd_reference(Gs, tau, 0.9, 1e-8)):
        out = agg(G).numpy()
        assert np.linalg.norm(out - ref) <= 1e-6 * np.linalg.norm(ref)


@pytest.mark.parametrize("K", [2, 3, 5, 8])
def test_pcd_equals_torchjd_pcd(K):
    from torchjd.aggregation import PCD as TorchJDPCD

    ours, theirs = PCD(tau=0.3), TorchJDPCD(tau=0.3)
    for G in jacobians(K, 5, seed=K):
        a, b = ours(G), theirs(G)
        assert float((a - b).norm()) <= 1e-12 * float(b.norm())


def test_pcd_constraints_hold_and_scale_invariance():
    Gs = jacobians(4, 5, d=20, seed=1)
    tau = [0.1, 0.3, 0.5]
    agg = PCD(tau=tau, beta=0.5)
    scaled = PCD(tau=tau, beta=0.5, eps=0.0)
    plain = PCD(tau=tau, beta=0.5, eps=0.0)
    v = np.zeros(4)
    for t, G in enumerate(Gs, start=1):
        d = agg(G).numpy()
        sq = (G * G).sum(1).numpy()
        v = 0.5 * v + 0.5 * sq
        s = 1 / np.sqrt(v / (1 - 0.5**t) + 1e-8)
        g_t = G.numpy() * s[:, None]
        d_tilde_dir = d / np.linalg.norm(d)
        # g̃_jᵀ d̃ ≥ τ‖g̃_j‖² with d̃ = d · ‖d̃‖/‖d‖: check the sign-free form on the unit direction.
        c = np.linalg.norm(d) / np.linalg.norm(G[0].numpy())
        assert c == pytest.approx(1.0, rel=1e-12)  # rescaled to ‖g_1‖
        for j in range(1, 4):
            lhs = g_t[j] @ d_tilde_dir
            assert lhs > 0  # every secondary improves
        # Each secondary rescaled by its own constant at every call: the same direction.
        c_rows = torch.tensor([1.0, 1e-3, 40.0, 2.5], dtype=torch.float64)[:, None]
        torch.testing.assert_close(scaled(G * c_rows) / 1.0, plain(G) * 1.0, rtol=1e-9, atol=1e-12)


def test_pcd_hand_built_cases():
    def fresh(G, **kw):
        return PCD(**kw)(torch.tensor(G, dtype=torch.float64))

    # Primary already gives every secondary its share: d = g_1 exactly.
    torch.testing.assert_close(fresh([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([1.0, 1.0], dtype=torch.float64))
    # K = 2 closed form on equal-norm rows (s cancels): d̃ = g̃_1 + (τ − cos) g̃_2, then ‖d‖ = ‖g_1‖.
    tau = 0.5
    d_t = np.array([1.0, 0.0]) + (tau - 0.0) * np.array([0.0, 1.0])
    expected = d_t / np.linalg.norm(d_t)
    np.testing.assert_allclose(fresh([[1.0, 0.0], [0.0, 1.0]], tau=tau).numpy(), expected, rtol=1e-12)
    # g_1 = 0: no update.
    assert torch.equal(fresh([[0.0, 0.0], [1.0, 2.0]]), torch.zeros(2, dtype=torch.float64))
    # Two opposite secondaries cannot both progress: the constraints are dropped, d = g_1.
    torch.testing.assert_close(
        fresh([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], tau=0.1), torch.tensor([1.0, 0.0], dtype=torch.float64)
    )
    # K = 1: the primary gradient.
    torch.testing.assert_close(fresh([[3.0, -4.0]]), torch.tensor([3.0, -4.0], dtype=torch.float64))


def test_pcd_errors_and_state_round_trip():
    with pytest.raises(ValueError, match="tau"):
        PCD(tau=1.5)
    with pytest.raises(ValueError, match="2 tau values but there are 3 secondary tasks"):
        PCD(tau=[0.1, 0.2])(torch.randn(4, 5, dtype=torch.float64))
    agg = PCD()
    Gs = jacobians(3, 3, seed=5)
    agg(Gs[0]); agg(Gs[1])
    other = PCD()
    other.load_state_dict(copy.deepcopy(agg.state_dict()))
    assert torch.equal(other(Gs[2]), agg(Gs[2]))
    with pytest.raises(ValueError, match="reset"):
        agg(torch.randn(4, 12, dtype=torch.float64))
