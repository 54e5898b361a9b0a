"""UPGrad, DualProj, IMTL-G, Aligned-MTL, ConFIG, FairGrad, GradVac: each against an
independent float64 reference written from its paper's equations on the rows ``G`` (not on the
Gramian), against the peer implementations that run here (TorchJD 0.18, the ConFIG authors'
``conflictfree``) with their conventions converted, and named properties on one input bank.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

import mtl_opt
from mtl_opt.solvers import DualConeError, dual_cone_weights
from mtl_opt.methods import (
    AlignedMTL, ConFIG, DualProj, FairGrad, GradVac, IMTLG, NashMTL, UPGrad,
)

KS = [2, 3, 4, 5, 6, 8]
TOL = 1e-6


def rows(K: int, seed: int, d: int = 12, mixed: bool = True) -> torch.Tensor:
    """Random rows, each with its own scale over four decades when ``mixed``."""
    g = torch.Generator().manual_seed(1000 * K + seed)
    G = torch.randn(K, d, generator=g, dtype=torch.float64)
    if mixed:
        G = G * torch.logspace(-2, 2, K, dtype=torch.float64)[torch.randperm(K, generator=g)][:, None]
    return G


def hand_built() -> list[torch.Tensor]:
    """Conflicting pairs, an obtuse triple, near-collinear rows, an orthogonal set."""
    e = torch.eye(4, dtype=torch.float64)
    return [
        torch.stack([e[0], -0.5 * e[0] + e[1]]),
        torch.stack([e[0], torch.tensor([-0.9, 0.3, 0, 0], dtype=torch.float64), e[2] - 0.2 * e[0]]),
        torch.stack([e[0] + 1e-3 * e[1], e[0] - 1e-3 * e[1], 10 * e[2]]),
        torch.stack([3 * e[0], 0.1 * e[1], e[2], 7 * e[3]]),
    ]


BANK = [rows(K, s) for K in KS for s in range(3)] + hand_built()
BANK_IDS = [f"K{K}-s{s}" for K in KS for s in range(3)] + [f"hand{i}" for i in range(4)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


# ----------------------------------------------------------------------------------------------
# Independent references on G
# ----------------------------------------------------------------------------------------------
def cone_projection_reference(G: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``y`` onto ``{x : G x ≥ 0}`` in parameter space, by enumerating the
    faces: the projection is the projection onto the null space of the active rows of some face,
    and among the feasible candidates it is the closest to ``y``."""
    K = G.shape[0]
    best, best_dist = None, math.inf
    scale = float(G.norm(dim=1).max()) * float(y.norm())
    for r in range(K + 1):
        for S in itertools.combinations(range(K), r):
            x = y.clone()
            if S:
                GS = G[list(S)]
                lam = torch.linalg.lstsq(GS.T, y[:, None]).solution[:, 0]
                x = y - GS.T @ lam
            if float((G @ x).min()) >= -1e-11 * scale:
                dist = float((x - y).norm())
                if dist < best_dist:
                    best, best_dist = x, dist
    assert best is not None
    return best


def imtl_g_reference(G: torch.Tensor) -> torch.Tensor:
    """The paper's closed form: α_{2:K} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ α_{2:K}."""
    units = G / G.norm(dim=1, keepdim=True)
    D = G[:1] - G[1:]
    U = units[:1] - units[1:]
    alpha = G[0] @ U.T @ torch.linalg.inv(D @ U.T)
    alpha = torch.cat([(1 - alpha.sum())[None], alpha])
    return alpha @ G


def aligned_mtl_reference(G: torch.Tensor, p: torch.Tensor, mode: str) -> torch.Tensor:
    """With the SVD ``G = V S Wᵀ`` (full row rank), the aligned rows are ``√λ_s V Wᵀ``."""
    V, S, Wh = torch.linalg.svd(G, full_matrices=False)
    lam = torch.sort(S**2).values
    lam_s = {"min": lam[0], "median": lam[(lam.numel() - 1) // 2], "rmse": lam.mean()}[mode]
    return torch.sqrt(lam_s) * (p @ V @ Wh)


def gradvac_reference(G: torch.Tensor, phi_hat: np.ndarray, rng: np.random.Generator,
                      beta: float, eps: float = 1e-8) -> torch.Tensor:
    """Algorithm 1 on the vectors themselves (updates ``phi_hat`` in place)."""
    K = G.shape[0]
    out = torch.zeros_like(G[0])
    for i in range(K):
        gi = G[i].clone()
        others = [j for j in range(K) if j != i]
        for idx in rng.permutation(K - 1).tolist():
            j = others[idx]
            phi = float(gi @ G[j]) / (float(gi.norm()) * float(G[j].norm()) + eps)
            t = phi_hat[i, j]
            if phi < t:
                w = float(gi.norm()) * (t * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - t**2)) / (
                    float(G[j].norm()) * math.sqrt(1 - t**2) + eps)
                gi = gi + w * G[j]
            phi_hat[i, j] = (1 - beta) * t + beta * phi
        out = out + gi
    return out


# ----------------------------------------------------------------------------------------------
# Against the references
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("G", BANK, ids=BANK_IDS)
def test_upgrad_is_the_mean_of_the_rows_projections(G):
    expected = sum(cone_projection_reference(G, G[i]) for i in range(G.shape[0])) / G.shape[0]
    assert rel(UPGrad()(G), expected) < TOL


@pytest.mark.parametrize("G", BANK, ids=BANK_IDS)
def test_dualproj_is_the_projection_of_the_mean(G):
    expected = cone_projection_reference(G, G.mean(dim=0))
    assert rel(DualProj()(G), expected) < TOL


def test_dual_cone_projection_with_a_preference_vector():
    G = rows(4, 7)
    p = torch.tensor([0.1, 0.5, 0.2, 0.2], dtype=torch.float64)
    assert rel(DualProj(pref_vector=p)(G), cone_projection_reference(G, p @ G)) < TOL
    expected = sum(cone_projection_reference(G, p[i] * G[i]) for i in range(4))
    assert rel(UPGrad(pref_vector=p.tolist())(G), expected) < TOL


def test_dual_cone_projection_handles_dependent_and_zero_rows():
    G = rows(3, 1, mixed=False)
    G = torch.cat([G, (G[0] + 2 * G[1])[None], torch.zeros(1, 12, dtype=torch.float64)])
    expected = sum(cone_projection_reference(G, G[i]) for i in range(5)) / 5
    assert rel(UPGrad()(G), expected) < TOL
    assert rel(DualProj()(G), cone_projection_reference(G, G.mean(0))) < TOL


def test_dual_cone_projection_refuses_to_return_an_uncertified_answer(monkeypatch):
    # A face solve that returns a wrong minimiser (injected) must be caught by the certificate.
    import mtl_opt.solvers.dual_cone as dual_cone

    monkeypatch.setattr(dual_cone, "_solve_face", lambda A_PP, rhs: [2.0 * x + 1.0 for x in rhs])
    M = (rows(3, 0) @ rows(3, 0).T).numpy()
    M[0, 1] = M[1, 0] = -0.9 * np.sqrt(M[0, 0] * M[1, 1])  # conflicting: the solve is needed
    with pytest.raises(DualConeError, match="certificate|did not settle"):
        dual_cone_weights(M, np.eye(3))


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("seed", range(3))
def test_imtl_g_matches_the_papers_closed_form(K, seed):
    G = rows(K, seed, d=20)
    assert rel(IMTLG()(G), imtl_g_reference(G)) < TOL


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_aligned_mtl_matches_the_svd_form(K, mode):
    G = rows(K, 0, d=20, mixed=False) * torch.linspace(0.5, 3, K, dtype=torch.float64)[:, None]
    p = torch.ones(K, dtype=torch.float64)
    assert rel(AlignedMTL(scale_mode=mode)(G), aligned_mtl_reference(G, p, mode)) < TOL
    p2 = torch.linspace(0.2, 1.0, K, dtype=torch.float64)
    assert rel(AlignedMTL(pref_vector=p2, scale_mode=mode)(G), aligned_mtl_reference(G, p2, mode)) < TOL


@pytest.mark.parametrize("K", KS)
def test_config_has_equal_cosines_and_the_projection_length(K):
    G = rows(K, 2, d=20)
    d = ConFIG()(G)
    cos = (G @ d) / (G.norm(dim=1) * d.norm())
    assert float(cos.max() - cos.min()) < TOL and float(cos.min()) > 0
    unit = d / d.norm()
    assert abs(float(d.norm()) - float((G @ unit).sum())) < TOL * float(d.norm())


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_solves_the_alpha_fair_equations_on_the_rows(K, alpha):
    G = rows(K, 3, d=20, mixed=False) * torch.logspace(-1, 1, K, dtype=torch.float64)[:, None]
    w = FairGrad(alpha=alpha, max_norm=0.0).aggregate(G).weights
    utilities = G @ (w @ G)  # g_iᵀ d
    # (G Gᵀ) w = w^{-1/α}; the 1e-9 ridge of the solver moves the residual by about 1e-9.
    assert float(((utilities - w ** (-1.0 / alpha)) / w ** (-1.0 / alpha)).abs().max()) < 1e-7


@pytest.mark.parametrize("K", KS)
def test_fairgrad_newton_at_alpha_one_solves_the_nash_system(K):
    """FairGrad's α-fair Newton method at p = 1/α = 1 and Nash-MTL's solver (which FairGrad uses
    at α = 1) solve the same regularised equations."""
    from mtl_opt.solvers.alpha_fair import _alpha_fair_newton
    from mtl_opt.solvers.nash import nash_weights

    for seed in range(3):
        M = (lambda G: (G @ G.T).numpy())(rows(K, seed, d=20))
        np.testing.assert_allclose(_alpha_fair_newton(M, 1.0)[0], nash_weights(M)[0], rtol=1e-8)


@pytest.mark.parametrize("K", KS)
def test_fairgrad_at_alpha_one_is_nash_mtl(K):
    for seed in range(3):
        G = rows(K, seed, d=20)
        fair, nash = FairGrad(alpha=1.0), NashMTL()
        for _ in range(2):
            torch.testing.assert_close(fair.aggregate(G).weights, nash.aggregate(G).weights,
                                       rtol=1e-8, atol=0.0)


def test_fairgrad_clips_to_max_norm_and_reports_solver_failure():
    G = rows(3, 0, d=20, mixed=False) * 10
    assert abs(float(FairGrad(max_norm=0.5)(G).norm()) - 0.5) < 1e-12
    with pytest.raises(ValueError, match="alpha"):
        FairGrad(alpha=0.0)


@pytest.mark.parametrize("K", KS)
def test_gradvac_matches_algorithm_1_on_the_rows_over_steps(K):
    agg = GradVac(seed=5)
    phi_hat, rng = np.zeros((K, K)), np.random.default_rng(5)
    for step in range(6):
        G = rows(K, step, d=10)
        ref = gradvac_reference(G, phi_hat, rng, beta=0.01)
        assert rel(agg(G), ref) < 1e-12
    np.testing.assert_allclose(agg.state_dict()["phi_hat"].numpy(), phi_hat, rtol=0, atol=1e-15)


def test_gradvac_state_round_trip_is_bit_for_bit_single_and_batched():
    agg = GradVac(beta=0.3, seed=2)
    Gb = torch.stack([rows(4, s, d=9) for s in range(3)])
    for s in range(3):
        agg(rows(4, s, d=9))
        agg.aggregate_batch(Gb + s)
    state = copy.deepcopy(agg.state_dict())
    other = GradVac(beta=0.3, seed=2)
    other.load_state_dict(state)
    for s in range(3):
        assert torch.equal(agg(rows(4, 10 + s, d=9)), other(rows(4, 10 + s, d=9)))
        assert torch.equal(agg.aggregate_batch(Gb * s), other.aggregate_batch(Gb * s))
    with pytest.raises(ValueError, match="reset"):
        agg(rows(3, 0))
    with pytest.raises(ValueError, match="batch entry"):
        agg.aggregate_batch(Gb[:2])


def test_gradvac_batch_entries_keep_their_own_targets():
    Gb = torch.stack([rows(3, s, d=9) for s in range(2)])
    batched, singles = GradVac(beta=0.5), [GradVac(beta=0.5), GradVac(beta=0.5)]
    for step in range(4):
        out = batched.aggregate_batch(Gb * (1 + step) + step)
        for b in range(2):
            torch.testing.assert_close(out[b], singles[b](Gb[b] * (1 + step) + step), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Against the peer implementations
# ----------------------------------------------------------------------------------------------
import torchjd.aggregation as tja  # noqa: E402  (the test extra installs TorchJD with its QP solvers)


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_upgrad_dualproj_match_torchjd_on_its_ridged_gramian(K, name):
    # TorchJD solves the same QP with quadprog on M/tr(M) + 1e-4·I. Weights are invariant to
    # M → sM, so ours on M + 1e-4·tr(M)·I must equal TorchJD's weights on M.
    ours = {"upgrad": UPGrad, "dualproj": DualProj}[name]()
    theirs = {"upgrad": tja.UPGrad, "dualproj": tja.DualProj}[name]()
    for seed in range(3):
        G = rows(K, seed, d=20)
        M = G @ G.T
        ridged = M + 1e-4 * torch.trace(M) * torch.eye(K, dtype=torch.float64)
        w_theirs = theirs.gramian_weighting(M)
        assert rel(ours.weights(ridged), w_theirs) < TOL
        # Without the ridge the answers differ by the ridge's effect; the exact answer is ours.
        exact = ours(G)
        assert float((G @ exact).min()) >= -1e-12 * float(G.norm()) ** 2


def test_imtl_g_and_aligned_mtl_match_torchjd():
    for K in KS:
        G = rows(K, 1, d=20)
        assert rel(IMTLG()(G), tja.IMTLG()(G)) < TOL
        for mode in ["min", "median", "rmse"]:
            # TorchJD averages the aligned rows (p = 1/K); the authors sum them (p = 1).
            theirs = tja.AlignedMTL(scale_mode=mode)(G) * K
            assert rel(AlignedMTL(scale_mode=mode)(G), theirs) < TOL


def test_config_matches_torchjd_and_the_authors_package():
    import conflictfree.grad_operator as conflictfree  # the test extra installs it
    from conflictfree.weight_model import EqualWeight

    class Ones(EqualWeight):  # the authors' equal weights, in the rows' dtype (theirs: float32)
        def get_weights(self, gradients, losses=None, device=None):
            return torch.ones(gradients.shape[0], dtype=gradients.dtype, device=gradients.device)

    for K in KS:
        for seed in range(3):
            G = rows(K, seed, d=20)
            assert rel(ConFIG()(G), conflictfree.ConFIG_update(G, weight_model=Ones())) < TOL
            assert rel(ConFIG()(G), tja.ConFIG()(G)) < TOL
    G = rows(3, 0, d=20)
    G = torch.cat([G, torch.zeros(1, 20, dtype=torch.float64)])  # a zero row: its unit row is 0
    assert rel(ConFIG()(G), tja.ConFIG()(G)) < TOL


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_matches_torchjd(alpha):
    # TorchJD (from the authors' code) solves by scipy least_squares to its default tolerances.
    for K in KS:
        G = rows(K, 0, d=20, mixed=False)
        M = G @ G.T
        ours = FairGrad(alpha=alpha, max_norm=0.0).weights(M)
        assert rel(ours, tja.FairGrad(alpha=alpha).gramian_weighting(M)) < TOL


def test_gradvac_matches_torchjd_at_two_tasks():
    # With two tasks there is one pair per task, so TorchJD's global-generator order is
    # irrelevant; TorchJD's default β is 0.5, ours the paper's 0.01: both set to 0.2 here.
    ours, theirs = GradVac(beta=0.2), tja.GradVac(beta=0.2)
    for step in range(5):
        G = rows(2, step, d=10)
        assert rel(ours(G), theirs(G)) < 1e-10


# ----------------------------------------------------------------------------------------------
# Named properties on the shared bank
# ----------------------------------------------------------------------------------------------
PERMUTATION_INVARIANT = ["upgrad", "dualproj", "imtl_g", "aligned_mtl", "config", "fairgrad"]
LINEAR_UNDER_SCALING = ["upgrad", "dualproj", "imtl_g", "aligned_mtl", "config"]
NON_CONFLICTING = ["upgrad", "dualproj", "config"]
STATIONARY_AT_PARETO_STATIONARY = ["upgrad", "dualproj"]


@pytest.mark.parametrize("name", PERMUTATION_INVARIANT)
@pytest.mark.parametrize("G", BANK, ids=BANK_IDS)
def test_permutation_invariance(name, G):
    perm = torch.randperm(G.shape[0], generator=torch.Generator().manual_seed(G.shape[0]))
    a = mtl_opt.get_aggregator(name)
    assert rel(a(G[perm]), mtl_opt.get_aggregator(name)(G)) < TOL


@pytest.mark.parametrize("name", LINEAR_UNDER_SCALING)
@pytest.mark.parametrize("G", BANK, ids=BANK_IDS)
def test_linear_under_scaling(name, G):
    d = mtl_opt.get_aggregator(name)(G)
    for s in (1e-3, 7.0):
        assert rel(mtl_opt.get_aggregator(name)(s * G), s * d) < TOL


# ConFIG's equal-cosine direction exists for linearly independent rows only: its cases leave
# out the rank-deficient Jacobians of the bank.
NON_CONFLICTING_CASES = [
    pytest.param(name, G, id=f"{name}-{gid}")
    for name in NON_CONFLICTING
    for G, gid in zip(BANK, BANK_IDS)
    if not (name == "config" and int(torch.linalg.matrix_rank(G)) < G.shape[0])
]


@pytest.mark.parametrize("name,G", NON_CONFLICTING_CASES)
def test_non_conflicting(name, G):
    d = mtl_opt.get_aggregator(name)(G)
    assert float((G @ d).min()) >= -1e-9 * float(G.norm(dim=1).max()) * float(d.norm())


@pytest.mark.parametrize("name", STATIONARY_AT_PARETO_STATIONARY)
def test_zero_at_pareto_stationary_points(name):
    e = torch.eye(3, dtype=torch.float64)
    for G in (torch.stack([e[0], -2.5 * e[0]]),
              torch.stack([e[0], e[1], -(e[0] + e[1])]),
              torch.stack([e[0] + e[1], -e[0], -3 * e[1], e[2] * 0])):
        d = mtl_opt.get_aggregator(name)(G)
        assert float(d.norm()) < 1e-10 * float(G.norm())


def test_fairgrad_is_not_linear_under_scaling_except_at_alpha_one():
    G = rows(3, 0, d=20)
    d = FairGrad(alpha=2.0, max_norm=0.0)(G)
    assert rel(FairGrad(alpha=2.0, max_norm=0.0)(4 * G), 4 * d) > 1e-3
    # α = 1 (Nash): the direction does not depend on the scale at all.
    assert rel(FairGrad(alpha=1.0, max_norm=0.0)(4 * G), FairGrad(alpha=1.0, max_norm=0.0)(G)) < 1e-8


def test_fairgrad_certifies_or_raises_on_extreme_inputs():
    # Gradient norms 10⁻⁸ and 10⁸ at α = 10: the documented limit of the solver. Whatever it
    # does, it never returns weights that do not solve the equations.
    from mtl_opt.methods import FairGradSolverError

    G = torch.tensor([[2.3e-8, 1e-9, 0.0], [4e7, 2e8, 1.0]], dtype=torch.float64)
    for alpha in (2.0, 5.0, 10.0):
        M = G @ G.T
        try:
            w = FairGrad(alpha=alpha, max_norm=0.0).weights(M)
        except FairGradSolverError as exc:
            assert "did not converge" in str(exc) or "line search" in str(exc)
            continue
        ridged = M + 1e-9 * torch.diag(torch.diag(M))
        assert float(((w ** (1 / alpha)) * (ridged @ w) - 1).abs().max()) < 1e-8


def test_dual_cone_projection_of_float32_opposing_rows_is_finite_and_non_conflicting():
    # g_2 = −2 g_1 exactly: the float32 Gramian is singular only up to rounding and may have a
    # tiny negative eigenvalue, along which the QP would be unbounded: the PSD part is used.
    g = torch.Generator().manual_seed(3)
    for K in (3, 5):
        G = torch.randn(K, 30, generator=g)
        G[1] = -2 * G[0]
        for name in ("upgrad", "dualproj"):
            d = mtl_opt.get_aggregator(name)(G)
            assert torch.isfinite(d).all()
            assert float((G.double() @ d.double()).min()) >= -1e-5 * float(G.norm()) ** 2


def test_config_on_a_large_float32_jacobian_matches_the_float64_answer():
    # The benchmark's two-task Jacobian (d = 10⁶, cosine −0.998 between the rows): TorchJD's
    # float32 pseudo-inverse of the unit rows loses the direction there (cosine ≈ 0 with the
    # float64 answer, norm 26x too large); the Gramian, formed in float32 but solved in float64,
    # keeps it.
    from mtl_opt.experiments.bench import make_jacobian

    G = make_jacobian(2, 10**6, torch.device("cpu"))
    exact = tja.ConFIG()(G.double())
    ours = ConFIG()(G).double()
    assert float(ours @ exact / (ours.norm() * exact.norm())) > 1 - 1e-6
    assert abs(float(ours.norm() / exact.norm()) - 1) < 1e-4
