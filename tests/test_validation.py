"""Input checks and numeric range at the library boundary, for every registered method.

* float32/bfloat16 Jacobians whose squared row norms leave float32's range (tiny or huge
  gradients) give the answer of the same Jacobian in float64;
* float16/bfloat16 directions are combined in float32 and checked to fit;
* a Jacobian on the 'meta' device and non-PSD or asymmetric Gramians are rejected clearly.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import mtl_opt
from mtl_opt._validation import check_gramian, gramian_of
try:
    from mtl_opt._validation import _needs_float64, underflow_threshold
except ImportError:
    pass
from mtl_opt.registry import aggregator_class

NAMES = mtl_opt.available_aggregators()
# Checks of weights β and Gramians apply to the Gramian weightings: `weights(M)` and
# `batch_weights(M)` take a Gramian (loss weightings' `weights` take the losses, see
# tests/test_loss_weightings.py); element-wise methods (GradDrop, DB-MTL, MoCo) return
# directions only, which the range checks compare.
GRAMIAN_NAMES = [n for n in NAMES if issubclass(aggregator_class(n), mtl_opt.GramianAggregator)]


def make(name: str) -> mtl_opt.GradientAggregator:
    kw = {"seed": 0} if "seed" in inspect.signature(aggregator_class(name).__init__).parameters else {}
    torch.manual_seed(1234)
    return mtl_opt.get_aggregator(name, **kw)


def extra(agg, K, B=None):
    if not agg.uses_losses:
        return {}
    row = torch.linspace(0.5, 2.0, K, dtype=torch.float64)
    return {"losses": row if B is None else row.expand(B, K).clone()}


def _atol(scale: float, rel: float = 1e-6) -> float:
    """Absolute tolerance of a float32 direction of largest entry ``scale``: ``rel · scale``, but
    never below a few float32 subnormal steps (2⁻¹⁴⁹), the precision of an answer that is itself
    below float32's normal range (DB-MTL's ε makes tiny gradients' directions that small)."""
    return max(rel * scale, 4 * 2.0**-149)


def conflicting(K=3, d=6, seed=0) -> torch.Tensor:
    """A float32 Jacobian with a clear conflict between tasks 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(K, d, generator=g, dtype=torch.float64)
    G[1] = -0.8 * G[0] + 0.3 * G[1]
    return G.float()


# --------------------------------------------------------------------------------------------
# float32 range: tiny and huge gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [1e-25, 1e-21, 1e20])
def test_float32_out_of_range_squares_give_the_float64_answer(name, scale):
    G32 = conflicting() * scale
    assert torch.isfinite(G32).all() and (G32 != 0).any()
    reference = make(name).aggregate(G32.double(), **extra(make(name), 3))
    got = make(name).aggregate(G32, **extra(make(name), 3))
    if reference.weights is not None:
        torch.testing.assert_close(got.gramian, reference.gramian, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.weights, reference.weights, rtol=1e-9, atol=0)
    assert got.direction.dtype == torch.float32
    expected = reference.direction.float()
    torch.testing.assert_close(got.direction, expected, rtol=1e-5, atol=_atol(float(expected.abs().max())))


@pytest.mark.parametrize("name", NAMES)
def test_batched_float32_out_of_range_squares_give_the_float64_answer(name):
    G32 = torch.stack([conflicting(seed=0) * 1e-25, conflicting(seed=1), conflicting(seed=2) * 1e20])
    agg = make(name)
    got = agg.aggregate_batch(G32, **extra(agg, 3, B=3))
    reference = make(name).aggregate_batch(G32.double(), **extra(agg, 3, B=3))
    for b in range(3):  # each entry at its own scale (a coordinate may cancel to far below it)
        scale = float(reference[b].abs().max())
        torch.testing.assert_close(got[b], reference[b].float(), rtol=1e-5, atol=_atol(scale))


def test_float32_ls_of_huge_gradients_is_their_sum():
    G = torch.full((3, 4), 1e20, dtype=torch.float32)
    out = mtl_opt.get_aggregator("ls")(G)
    torch.testing.assert_close(out, torch.full((4,), 3e20, dtype=torch.float32))


def test_non_finite_rows_are_still_named_and_float64_overflow_is_reported():
    G = conflicting() * 1e20
    G[2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"not finite: task row\(s\) \[2\]"):
        mtl_opt.get_aggregator("ls")(G)
    G64 = torch.ones(3, 4, dtype=torch.float64)
    G64[1] = 1e200
    with pytest.raises(ValueError, match=r"row\(s\) \[1\].*overflows float64"):
        mtl_opt.get_aggregator("mgda")(G64)


def test_recomputation_only_for_rows_that_lost_range():
    d = 5
    G = torch.ones(3, d, dtype=torch.float32)
    G[1] = 0.0  # an exactly-zero task row: fine in float32, no recomputation
    diag = np.diagonal(gramian_of(G).numpy()).copy()
    assert not _needs_float64(diag, G, d)
    G[1, 2] = 1e-25  # a nonzero row whose square underflows to 0
    assert _needs_float64(np.array([5.0, 0.0, 5.0]), G, d)
    assert gramian_of(G)[1, 1].item() == pytest.approx(1e-50, rel=1e-6)
    assert _needs_float64(np.array([5.0, float("inf"), 5.0]), G, d)
    assert not _needs_float64(np.array([5.0, 2 * underflow_threshold(d), 5.0]), G, d)


# --------------------------------------------------------------------------------------------
# Half-precision directions
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GRAMIAN_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_directions_are_combined_in_float32_and_checked(name, dtype):
    limit = float(torch.finfo(dtype).max)
    for G in (torch.full((3, 4), 3e4, dtype=dtype), conflicting().to(dtype) * 100):
        agg = make(name)
        beta = make(name).aggregate(G.double(), **extra(agg, 3)).weights
        exact = beta @ G.double()
        if exact.abs().max() > 1.001 * limit:
            with pytest.raises(ValueError, match=f"overflows {str(dtype)[6:]}"):
                agg(G, **extra(agg, 3))
            with pytest.raises(ValueError, match=f"overflows {str(dtype)[6:]}"):
                make(name).aggregate_batch(G[None], **extra(agg, 3, B=1))
            continue
        out = agg(G, **extra(agg, 3))
        assert out.dtype == dtype and torch.isfinite(out).all()
        expected = (beta.float() @ G.float()).to(dtype)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(
            make(name).aggregate_batch(G[None], **extra(agg, 3, B=1))[0], expected
        )


def test_float16_overflow_raises_and_the_largest_fitting_direction_does_not():
    G = torch.full((3, 4), 3e4, dtype=torch.float16)  # LS and MGDA (scale of the sum): 9e4
    for name in ("ls", "mgda"):
        with pytest.raises(ValueError, match="overflows float16; rescale the losses"):
            mtl_opt.get_aggregator(name)(G)
    G = torch.full((3, 4), 2e4, dtype=torch.float16)
    for name in ("ls", "mgda"):
        out = mtl_opt.get_aggregator(name)(G)
        torch.testing.assert_close(out, torch.full((4,), 6e4, dtype=torch.float16))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_meta_jacobian_is_rejected(name):
    agg = make(name)
    with pytest.raises(ValueError, match="'meta' device"):
        agg(torch.empty(3, 4, device="meta"), **extra(agg, 3))
    with pytest.raises(ValueError, match="'meta' device"):
        agg.aggregate_batch(torch.empty(2, 3, 4, device="meta"), **extra(agg, 3, B=2))


@pytest.mark.parametrize("name", GRAMIAN_NAMES)
def test_gramians_that_are_not_psd_are_rejected(name):
    agg = make(name)
    with pytest.raises(ValueError, match="negative diagonal"):
        agg.weights(torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), **extra(agg, 2))
    with pytest.raises(ValueError, match="not positive semidefinite"):
        agg.weights(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64), **extra(agg, 2))
    good = torch.eye(2, dtype=torch.float64)
    bad = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"not positive semidefinite.*batch entry 1"):
        agg.batch_weights(torch.stack([good, bad]), **extra(agg, 2, B=2))


@pytest.mark.parametrize("name", GRAMIAN_NAMES)
def test_batch_weights_check_every_entry_like_the_single_path(name):
    agg = make(name)
    asym = torch.tensor([[2.0, 0.5], [0.0, 2.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not symmetric"):
        agg.weights(asym, **extra(agg, 2))
    with pytest.raises(ValueError, match=r"not symmetric.*batch entry 1"):
        agg.batch_weights(torch.stack([torch.eye(2, dtype=torch.float64), asym]), **extra(agg, 2, B=2))
    losses = torch.ones(2, 2, dtype=torch.float64)
    losses[1, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        agg.batch_weights(torch.eye(2, dtype=torch.float64).expand(2, 2, 2), losses=losses)


def test_float32_gramian_of_rank_deficient_jacobian_is_accepted():
    g = torch.Generator().manual_seed(3)
    row = torch.randn(1, 50, generator=g)
    G = torch.cat([row, row, 2 * row, torch.randn(1, 50, generator=g)])  # rank 2, K = 4
    M32 = G @ G.T
    M = check_gramian(M32)
    assert M.dtype == torch.float64 and torch.equal(M, M.T)
    mgda = mtl_opt.get_aggregator("mgda")
    torch.testing.assert_close(mgda.weights(M32), mgda.weights(M32.double()), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_zero_rows_next_to_tiny_rows_in_a_float32_batch(name):
    G32 = torch.stack([conflicting(seed=0) * 1e-25, conflicting(seed=1)])
    G32[0, 2] = 0.0  # a task without gradient next to underflowing ones
    G32[1, 0] = 0.0  # a zero row in an entry that float32 handles
    agg = make(name)
    got = agg.aggregate_batch(G32, **extra(agg, 3, B=2))
    reference = make(name).aggregate_batch(G32.double(), **extra(agg, 3, B=2))
    for b in range(2):  # each entry at its own scale
        scale = float(reference[b].abs().max())
        torch.testing.assert_close(got[b], reference[b].float(), rtol=1e-5, atol=_atol(scale))
    if isinstance(agg, mtl_opt.GramianAggregator):
        single = make(name).aggregate(G32[0], **extra(agg, 3)).weights
        torch.testing.assert_close(single, make(name).aggregate(G32[0].double(), **extra(agg, 3)).weights, rtol=1e-9, atol=0)
