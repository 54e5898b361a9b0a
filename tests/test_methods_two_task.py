"""The K = 2 single-call closed forms (Python floats) against the vectorised NumPy path.

Each K = 2 closed form of :mod:`mtl_opt.solvers` is written once and evaluated on Python floats
for one Gramian (a method's ``_weights``, a batch of one) and on arrays for a batch (two or more
Gramians: ``_batch_weights`` on a stack, the reference); both must give the same weights to
rounding on random and degenerate Gramians.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_opt.methods import CAGrad, CAMEGrad, MGDA, PCGrad
from mtl_opt.solvers._linalg import FLOAT_OPS
from mtl_opt.solvers.cagrad_dual import _conflict_averse_single
from mtl_opt.solvers.min_norm import min_norm_2


def _gram(rows: list[list[float]]) -> torch.Tensor:
    G = torch.tensor(rows, dtype=torch.float64)
    M = G @ G.T
    return 0.5 * (M + M.T)


def gramians() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(300):  # random directions, random relative scales, some conflicting
        G = torch.randn(2, 5, generator=gen, dtype=torch.float64)
        G = G * torch.exp(3 * torch.randn(2, 1, generator=gen, dtype=torch.float64))
        M = G @ G.T
        out.append(0.5 * (M + M.T))
    g = [1.0, -2.0, 0.5]
    degenerate = [
        [[0.0, 0.0, 0.0], g],  # zero row
        [g, [0.0, 0.0, 0.0]],
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],  # all zero
        [g, g],  # identical rows
        [g, [-x for x in g]],  # opposite rows
        [g, [-3 * x for x in g]],  # opposite, unequal lengths
        [g, [2 * x for x in g]],  # collinear, same direction
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # orthogonal
        [[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0]],  # mild conflict
        [[1.0, 0.0, 0.0], [-1.0, 1e-9, 0.0]],  # nearly opposite
        [[1.0, 0.0, 0.0], [1.0, 1e-9, 0.0]],  # nearly identical
    ]
    for rows in degenerate:
        for scale in (1e-150, 1e-8, 1.0, 1e8, 1e150):
            out.append(_gram([[scale * x for x in row] for row in rows]))
    return out


GRAMIANS = gramians()


def _assert_same(fast: torch.Tensor, ref: torch.Tensor) -> None:
    assert fast.dtype == torch.float64 and fast.shape == ref.shape == (2,)
    scale = max(float(ref.abs().max()), 1e-300)
    assert float((fast - ref).abs().max()) <= 1e-14 * scale, (fast.tolist(), ref.tolist())


def _check(agg, copies: int = 2, **ctx) -> None:
    """``_weights(M)`` against entry 0 of ``_batch_weights`` on ``copies`` copies of ``M``
    (two or more: the vectorised path; one for methods whose batch entries draw their own
    random numbers)."""
    for M in GRAMIANS:
        fast = agg._weights(M, losses=ctx.get("losses"), task_weights=ctx.get("task_weights"))
        batched_losses = None if ctx.get("losses") is None else ctx["losses"].expand(copies, -1)
        stack = M.expand(copies, -1, -1)
        ref = agg._batch_weights(stack, losses=batched_losses, task_weights=ctx.get("task_weights"))[0]
        _assert_same(fast, ref)


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_fast_path_matches_batched(normalization: str) -> None:
    losses = torch.tensor([0.7, 2.5], dtype=torch.float64)
    _check(MGDA(normalization), losses=losses)


def test_mgda_fast_path_rejects_bad_losses() -> None:
    M = _gram([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="positive"):
        MGDA("loss")._weights(M, losses=torch.tensor([1.0, 0.0], dtype=torch.float64), task_weights=None)
    with pytest.raises(ValueError, match="losses"):
        MGDA("loss+")._weights(M, losses=None, task_weights=None)


@pytest.mark.parametrize("c", [0.0, 1e-6, 0.4, 1.0, 3.0, 100.0])
@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_cagrad_fast_path_matches_batched(c: float, rescale: int) -> None:
    _check(CAGrad(c=c, rescale=rescale))


def test_pcgrad_fast_path_matches_batched() -> None:
    _check(PCGrad(seed=0), copies=1)
    _check(PCGrad(order="fixed"), copies=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"rho": 0.0},
        {"rho": 2.0, "kappa": 0.5, "nu": 0.0},
        {"task_weights": [1.0, 4.0]},
        {"task_weights": [0.0, 1.0]},
        {"rectify": False},
        {"inject": False},
        {"fuse": False},
        {"rectify": False, "inject": False},
        {"rectify": False, "inject": False, "fuse": False},
        {"inject": False, "fuse": False, "task_weights": [2.0, 3.0]},
    ],
)
def test_came_grad_fast_path_matches_batched(kwargs: dict) -> None:
    _check(CAMEGrad(**kwargs))


def test_came_grad_fast_path_call_task_weights() -> None:
    _check(CAMEGrad(), task_weights=torch.tensor([3.0, 0.5], dtype=torch.float64))


def test_min_norm_2_closed_form_by_hand() -> None:
    # g1 = (1, 0), g2 = (0, 2): α1 = 4/5 (the min-norm point (0.8, 0.4) is orthogonal to g1 − g2).
    assert min_norm_2(1.0, 0.0, 4.0, FLOAT_OPS) == pytest.approx(0.8, rel=1e-15)
    assert min_norm_2(1.0, 1.0, 1.0, FLOAT_OPS) == 0.5  # identical rows
    assert min_norm_2(1.0, 2.0, 4.0, FLOAT_OPS) == 1.0  # g2 = 2 g1: the vertex g1
    arrays = min_norm_2(np.array([1.0, 1.0, 1.0]), np.array([0.0, 1.0, 2.0]), np.array([4.0, 1.0, 4.0]))
    assert arrays.tolist() == [min_norm_2(1.0, 0.0, 4.0, FLOAT_OPS), 0.5, 1.0]


def test_conflict_averse_2_origin_is_left_to_the_batched_path() -> None:
    # 1-D rows g1 = 1, g2 = −2: g0 = −½, s = c/2, b = (−½, 1). F(vertex 1) = −½ + c/2 and F = 0 at the
    # origin of the hull (w1 = 2/3), so for c ≥ 1 the origin is optimal and the cone projection is
    # needed: the closed form hands it back (None); for c < 1 the vertex g1 wins.
    assert _conflict_averse_single([[1.0, -2.0], [-2.0, 4.0]], 2.0) is None
    _, coef = _conflict_averse_single([[1.0, -2.0], [-2.0, 4.0]], 0.5)
    assert coef == pytest.approx([0.5 + 0.25, 0.5], rel=1e-15)  # γ = ½ + (s/r) w, s = ¼, r = 1
    _, coef = _conflict_averse_single([[1.0, -1.0], [-1.0, 1.0]], 0.4)
    assert coef == [0.5, 0.5]  # opposite equal rows: g0 = 0, s = 0
    agg = CAGrad(c=2.0)
    M = torch.tensor([[1.0, -2.0], [-2.0, 4.0]], dtype=torch.float64)
    _assert_same(agg._weights(M, losses=None, task_weights=None), agg._batch_weights(M[None], losses=None, task_weights=None)[0])


def test_fast_path_is_used_by_a_single_call() -> None:
    """``agg(G)`` at K = 2 gives the batched path's direction (end-to-end, through the checks)."""
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    G[1] = -0.7 * G[0] + 0.1 * G[1]
    for agg in (MGDA(), MGDA("l2"), CAGrad(), PCGrad(seed=0), CAMEGrad()):
        d = agg(G)
        copies = 1 if isinstance(agg, PCGrad) else 2  # two: the vectorised solvers
        d_ref = agg.aggregate_batch(G.expand(copies, -1, -1))[0]
        assert torch.allclose(d, d_ref, rtol=1e-13, atol=1e-13 * float(G.abs().max())), type(agg)
    assert np.isfinite(d.numpy()).all()
