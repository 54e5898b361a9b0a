"""The Gramian M = G Gᵀ behind every Gramian method: blocked on the CPU for wide G, same result."""

from __future__ import annotations

import pytest
import torch

from mtl_opt._validation import GRAMIAN_BLOCK, GRAMIAN_WIDE, gramian_of


@pytest.mark.parametrize("K", [1, 2, 4, 8])
@pytest.mark.parametrize("d", [10, 2 * GRAMIAN_BLOCK, 2 * GRAMIAN_BLOCK + 1, 5 * GRAMIAN_BLOCK + 17])
def test_gramian_matches_float64_reference(K, d):
    g = torch.Generator().manual_seed(K * 1000 + d)
    G = torch.randn(K, d, generator=g) * torch.logspace(0, 2, K).unsqueeze(1)
    ref = G.double() @ G.double().T
    M = gramian_of(G)
    assert M.dtype == torch.float64 and M.shape == (K, K)
    assert torch.equal(M, M.T)
    # float32 accumulation over d terms: relative error well under 1e-5 of the largest entry.
    assert float((M - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    G64 = G.double()
    torch.testing.assert_close(gramian_of(G64), ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize(
    "K, layout",
    [(4, "row_slice"), (4, "transposed"), (5, "row_slice"), (6, "transposed"), (2, "wide"), (3, "wide")],
)
def test_blocked_gramian_of_strided_and_very_wide_jacobians(K, layout):
    """Rows that are slices of longer rows and transposed (column-major) Jacobians, both blocked
    through strided views, and K < 4 beyond ``GRAMIAN_WIDE`` columns (blocked too)."""
    g = torch.Generator().manual_seed(K)
    d = GRAMIAN_WIDE + 7 if layout == "wide" else 3 * GRAMIAN_BLOCK + 11
    if layout == "row_slice":
        G = torch.randn(K, d + 100, generator=g)[:, 50:50 + d]
    elif layout == "transposed":
        G = torch.randn(d, K, generator=g).T
    else:
        G = torch.randn(K, d, generator=g)
    ref = G.double() @ G.double().T
    M = gramian_of(G)
    # float32 sums of 65 536-term blocks; a wrong block or stride would be off by O(1).
    assert float((M - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_small_jacobians_take_the_single_product():
    G = torch.randn(3, 100, dtype=torch.float64)
    M = G @ G.T
    assert torch.equal(gramian_of(G), 0.5 * (M + M.T))


@pytest.mark.parametrize("col", [0, GRAMIAN_BLOCK + 5, 3 * GRAMIAN_BLOCK - 1])
def test_non_finite_entry_in_any_block_names_its_row(col):
    G = torch.ones(4, 3 * GRAMIAN_BLOCK)
    G[2, col] = float("nan")
    with pytest.raises(ValueError, match=r"task row\(s\) \[2\]"):
        gramian_of(G)
