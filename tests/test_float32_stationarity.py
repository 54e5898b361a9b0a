"""Near Pareto-stationarity, float32 Jacobians keep every method's no-conflict guarantee.

Methods whose direction provably conflicts with no task (MGDA; CAGrad with c ≥ 1; CAME-Grad's
rectified direction with ρ ≥ 1; Nash-MTL; PCGrad at K = 2) must keep that property on float32
input up to the input's precision: ``g_j · d ≥ −tol_j`` with
``tol_j = 4 · rtol · ‖g_j‖ · Σ_i |β_i| ‖g_i‖`` (``rtol`` the Gramian's relative precision,
the bound of :func:`mtl_opt._validation.gramian_rtol`: what rounding a combination ``βᵀG`` of these rows can
contribute), and the weights must stay bounded (Nash-MTL's by what float64 rows give: its
weights grow without bound at stationarity by construction). A float32 Gramian's rounding noise once passed
for a direction there: CAGrad's weights reached ~1e3 and CAME-Grad's ~1e9, with directions that
conflicted with a task far beyond rounding.
"""

from __future__ import annotations

import pytest
import torch

from mtl_opt import aggregate_many, get_aggregator


def _rtol(dtype: torch.dtype, d: int) -> float:
    """The precision a combination of d-wide rows can be trusted to: the Gramian's rounding
    (~eps·√d, float32 products) or the dtype's own precision (the oracle of these tests,
    written independently of the library's threshold)."""
    eps = torch.finfo(dtype).eps
    return max(1e-14, torch.finfo(torch.float32).eps * d**0.5, eps)

GUARANTEED = {
    "mgda": {},
    "cagrad_c1": {"c": 1.0},
    "cagrad_c2": {"c": 2.0},
    "came_rectified_rho1": {"rho": 1.0, "inject": False, "fuse": False},
    "came_rectified_rho2": {"rho": 2.0, "inject": False, "fuse": False},
    "came_injected_rho2": {"rho": 2.0, "fuse": False},
    "nash_mtl": {},
    "pcgrad": {"order": "fixed"},
}


def _method(label: str):
    name = label.split("_c")[0] if label.startswith("cagrad") else label
    name = "came_grad" if label.startswith("came") else name
    return get_aggregator(name, **GUARANTEED[label])


def _stationary(case: str, d: int, seed: int) -> torch.Tensor:
    """float32 Jacobians at (or within rounding of) Pareto-stationarity."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    w = torch.randn(d, generator=g)
    if case == "opposed":  # the issue's example: u and -0.7u
        return torch.stack([u, -0.7 * u])
    if case == "opposed_scaled":  # the same, large: rounding noise ~1e-7 of 1e6-sized rows
        return torch.stack([u, -0.7 * u]) * 1e6
    if case == "triangle":  # (1/4) g1 + (1/4) g2 + (1/2) g3 = 0
        return torch.stack([u, w, -(u + w) / 2])
    if case == "nearly":  # just off stationarity: a common component 1e-4 of the rows
        v = torch.randn(d, generator=g)
        v = v / v.norm() * u.norm() * 1e-4
        return torch.stack([u + v, -0.7 * u + v])
    raise ValueError(case)


CASES = ["opposed", "opposed_scaled", "triangle", "nearly"]


def _check(G: torch.Tensor, direction: torch.Tensor, beta: torch.Tensor, where: str,
           label: str = "") -> None:
    assert direction.dtype == torch.float32 and bool(torch.isfinite(direction).all()), where
    G64 = G.double()
    norms = G64.norm(dim=1)
    rtol = _rtol(G.dtype, G.shape[1])
    scale = float((beta.abs() * norms).sum())
    tol = 4 * rtol * norms * scale
    Gd = G64 @ direction.double()
    assert bool((Gd >= -tol).all()), f"{where}: G d = {Gd.tolist()}, tolerance {tol.tolist()}"
    if label == "nash_mtl":
        # Nash-MTL's weights grow without bound as the Gramian becomes singular (Mα = 1/α has no
        # solution at stationarity; its ridge decides): bounded by what float64 rows give.
        bound = 10 * float(_method(label).aggregate(G64).weights.abs().max())
    else:
        # Bounded weights: nothing like the ~1e3-1e9 that rounding noise used to produce.
        bound = 1e2 * G.shape[0]
    assert float(beta.abs().max()) <= bound, f"{where}: weights {beta.tolist()}"


# PCGrad's no-conflict property holds at K = 2 only: the K = 3 triangle is left out for it.
SINGLE_CALL_CASES = [
    (label, case) for label in GUARANTEED for case in CASES
    if not (label == "pcgrad" and case == "triangle")
]


@pytest.mark.parametrize("label,case", SINGLE_CALL_CASES)
@pytest.mark.parametrize("d", [10, 1000, 100_000])
def test_no_conflict_beyond_precision_single_call(label, case, d):
    for seed in range(3):
        G = _stationary(case, d, seed)
        result = _method(label).aggregate(G)
        _check(G, result.direction, result.weights, f"{label} {case} d={d} seed={seed}", label)


@pytest.mark.parametrize("case", CASES)
def test_no_conflict_beyond_precision_batched_and_many(case):
    G = torch.stack([_stationary(case, 1000, seed) for seed in range(3)])
    for label in GUARANTEED:
        if label == "pcgrad" and case == "triangle":
            continue
        agg = _method(label)
        D = agg.aggregate_batch(G)
        for b in range(G.shape[0]):
            beta = _method(label).aggregate(G[b]).weights
            _check(G[b], D[b], beta, f"{label} {case} batch {b}", label)
            many = aggregate_many(G[b], {label: _method(label)}, return_results=True)[label]
            _check(G[b], many.direction, many.weights, f"{label} {case} many {b}", label)


@pytest.mark.parametrize("d", [10, 100, 1000])
def test_the_issue_example_gives_no_conflicting_cagrad_direction(d):
    for seed in range(5):
        G = _stationary("opposed", d, seed)  # u and -0.7u in float32, c = 2
        result = get_aggregator("cagrad", c=2.0).aggregate(G)
        Gd = G.double() @ result.direction.double()
        # Exactly opposing rows: the only non-conflicting direction is 0 (to rounding).
        assert float(Gd.abs().max()) <= 1e-5 * float(G[0].double().norm() ** 2), (seed, Gd)
        assert float(result.weights.abs().max()) < 10, (seed, result.weights)
