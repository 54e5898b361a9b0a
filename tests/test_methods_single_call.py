"""The single-call paths on Python floats agree with the batched paths on arrays.

UPGrad, DualProj, IMTL-G, Aligned-MTL, ConFIG, PCD and GradNorm run one Gramian on Python
floats (the K = 2 closed forms, the dual-cone solver on lists, GradNorm's update over per-task
columns) and a batch on NumPy arrays, from one formula each. These tests check that a single
call gives the weights of the same Gramian inside a batch, to 1e-12, on random and
near-singular Gramians at K = 2 and K = 3, over several calls for the stateful methods; and that
the K = 2 single call does not fall back to NumPy's solvers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mtl_opt
from mtl_opt.registry import parse_method_spec


def _make(spec: str) -> mtl_opt.GradientAggregator:
    name, options = parse_method_spec(spec)
    return mtl_opt.get_aggregator(name, **options)

SPECS = [
    "upgrad", "dualproj", "imtl_g", "aligned_mtl", "aligned_mtl:scale_mode=median",
    "aligned_mtl:scale_mode=rmse", "config", "pcd", "pcd:tau=0.5", "gradnorm", "gradnorm:update=sgd,lr=0.00001",
]


def _jacobians(K: int, seed: int) -> list[torch.Tensor]:
    """Random rows of mixed scales, and near-singular cases: nearly parallel, exactly parallel,
    opposite, nearly opposite, a zero row, a tiny row, all zero."""
    g = torch.Generator().manual_seed(seed)
    d = 6
    out = []
    for _ in range(6):
        G = torch.randn(K, d, generator=g, dtype=torch.float64)
        out.append(G * torch.logspace(-3, 3, K, dtype=torch.float64)[torch.randperm(K, generator=g)][:, None])
    base = torch.randn(K, d, generator=g, dtype=torch.float64)
    for make in (
        lambda G: torch.cat([G[:1], G[:1] * (1 + 1e-9) + 1e-12 * G[1:2], G[2:]]),
        lambda G: torch.cat([G[:1], 3.0 * G[:1], G[2:]]),
        lambda G: torch.cat([G[:1], -G[:1], G[2:]]),
        lambda G: torch.cat([G[:1], -G[:1] + 1e-8 * G[1:2], G[2:]]),
        lambda G: torch.cat([G[:1], 0.0 * G[1:2], G[2:]]),
        lambda G: torch.cat([G[:1], 1e-7 * G[1:2], G[2:]]),
        lambda G: 0.0 * G,
    ):
        out.append(make(base))
    return out


def _gramians(K: int, seed: int) -> torch.Tensor:
    Ms = []
    for G in _jacobians(K, seed):
        M = G @ G.T
        Ms.append(0.5 * (M + M.T))
    return torch.stack(Ms)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("K", [2, 3])
def test_single_call_equals_batched_call(spec: str, K: int) -> None:
    calls = 3  # stateful methods (PCD's moving average, GradNorm's weights) over several calls
    stacks = [_gramians(K, seed) for seed in range(calls)]
    B = stacks[0].shape[0]
    g = torch.Generator().manual_seed(7)
    losses = [torch.rand(B, K, generator=g, dtype=torch.float64) + 0.1 for _ in range(calls)]
    batched = _make(spec)
    singles = [_make(spec) for _ in range(B)]
    for t in range(calls):
        kw = {"losses": losses[t]} if batched.uses_losses else {}
        expected = batched.batch_weights(stacks[t], **kw)
        for b, agg in enumerate(singles):
            kw1 = {"losses": losses[t][b]} if agg.uses_losses else {}
            got = agg.weights(stacks[t][b], **kw1)
            scale = max(1.0, float(expected[b].abs().max()))
            torch.testing.assert_close(got, expected[b], rtol=1e-12, atol=1e-12 * scale, msg=lambda m: f"{spec}, K={K}, call {t}, entry {b}: {m}")


@pytest.mark.parametrize(("spec", "K"), [
    *[(spec, 2) for spec in ("imtl_g", "aligned_mtl", "config", "pcd", "gradnorm", "upgrad", "dualproj")],
    *[(spec, K) for spec in ("gradnorm", "upgrad", "dualproj") for K in (3, 5)], ("pcd", 3),
])
def test_single_call_runs_on_floats(spec: str, K: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single call uses neither NumPy's solvers, its einsum, nor its element-wise functions:
    at K = 2 the closed forms, and for PCD, GradNorm, UPGrad and DualProj at any K the solver,
    run on Python floats. UPGrad and DualProj repair a singular Gramian with an
    eigen-decomposition, and PCD with two or more active constraints solves in NumPy (both
    rare); they are checked on the random, well-posed Gramians."""
    M = _gramians(K, 0)
    if spec in ("upgrad", "dualproj") or K > 2:
        M = M[:6]
    if spec == "pcd" and K > 2:  # one conflicting secondary (one active constraint), the rest aligned
        g = torch.Generator().manual_seed(3)
        Gs = torch.randn(6, K, 6, generator=g, dtype=torch.float64)
        Gs[:, 1] = -0.5 * Gs[:, 0] + 0.3 * Gs[:, 1]
        Gs[:, 2:] = Gs[:, :1] + 0.3 * Gs[:, 2:]
        M = Gs @ Gs.transpose(1, 2)
    losses = torch.rand(M.shape[0], K, dtype=torch.float64) + 0.1
    agg = _make(spec)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("NumPy called on the single-call path")

    for name in ("eigh", "eigvalsh", "lstsq", "solve"):
        monkeypatch.setattr(np.linalg, name, forbidden)
    for name in ("einsum", "sign", "sqrt", "maximum", "where", "diagonal", "broadcast_to", "asarray"):
        monkeypatch.setattr(np, name, forbidden)
    for b in range(M.shape[0]):  # the solve of aggregate(G), after gramian_of's checks
        beta = agg._checked_weights(M[b], losses[b] if agg.uses_losses else None, None)
        assert torch.isfinite(beta).all()
