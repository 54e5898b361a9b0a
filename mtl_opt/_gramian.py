"""The Gramian ``M = G Gᵀ`` of a Jacobian, float64 on the CPU: its products, its float32 range
fallback and its non-finite errors, in one place.

Three forms share them:

* :func:`gramian_of`: a flat Jacobian ``G`` (K, d) (``GramianAggregator.aggregate``);
* :func:`gramian_of_blocks`: column blocks ``G = [G_1 | ... | G_n]``, never concatenated, plus an
  optional share computed elsewhere (:func:`mtl_opt.mtl_backward`: per-parameter blocks and the
  factored linear layers);
* :func:`gramians_of_batch`: B independent Jacobians (B, K, d) (``aggregate_batch``).

Each forms its products in the Jacobian's dtype (float16/bfloat16 in float32) and hands the K × K
result to :func:`_finished`, the one owner of what happens next: a float32 product whose squared
row norms left float32's range (:func:`underflow_threshold`, overflow) is recomputed in float64,
and a result that is still not finite raises one ``ValueError`` naming the task rows that hold NaN
or inf, or the rows whose squared norms overflow float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GRAMIAN_BLOCK", "GRAMIAN_WIDE", "check_finite_rows", "gramian_of", "gramian_of_blocks",
    "gramians_of_batch", "underflow_threshold",
]


def check_finite_rows(G: Tensor) -> None:
    """Raise naming the first task row of ``G`` that holds a NaN or an infinity (one host sync)."""
    finite_rows = torch.isfinite(G).all(dim=1)
    if not bool(finite_rows.all()):
        bad = [i for i, ok in enumerate(finite_rows.tolist()) if not ok]
        raise ValueError(f"the Jacobian is not finite: task row(s) {bad} contain NaN or inf")


def gramian_of(G: Tensor) -> Tensor:
    """``M = G Gᵀ`` as a float64 CPU tensor, checked finite.

    The product runs on ``G``'s device in ``G``'s dtype (float16/bfloat16 are upcast to float32),
    and the K × K result is the call's one device-to-host transfer. A non-finite entry anywhere in
    row ``i`` makes ``M_ii`` non-finite, so checking ``M`` checks ``G`` without another pass.
    ``M`` is formed from ``G.detach()``: the weights ``β`` are constants of the graph.

    float32 range: squared norms of rows below ~1e-19 underflow and rows above ~1e19 overflow
    although ``G`` itself is representable. When a diagonal entry is non-finite or below
    :func:`underflow_threshold`, ``M`` is recomputed from ``G`` in float64 (a rare path; the
    common case costs nothing extra). Only a ``G`` that is itself non-finite, or whose squared
    norms overflow float64 too, raises.

    The K × K post-processing runs on Python floats for K ≤ 8 (one ``tolist``, the checks and
    the symmetrisation in the interpreter, one array at the end) and in NumPy beyond: each tiny
    torch or NumPy operation costs a few µs, and 10–20 µs right after the product has streamed
    ``G`` through the caches; the float path cut the post-processing from ~190 to ~70 µs in that
    state.
    """
    if G.requires_grad:
        G = G.detach()
    work = G if G.dtype in (torch.float32, torch.float64) else G.float()
    M = _gram(work)
    if M.shape[0] <= _FLOAT_PATH_MAX_K:
        rows = M.tolist()  # the one device-to-host transfer
        symmetric = _checked_symmetric(rows, 0.0 if work.dtype == torch.float64 else underflow_threshold(G.shape[1]))
        if symmetric is not None:
            return torch.from_numpy(np.array(symmetric, dtype=np.float64))
        a = np.array(rows, dtype=np.float32 if work.dtype != torch.float64 else np.float64)
    else:
        if M.device.type != "cpu":
            M = M.cpu()  # the one device-to-host transfer
        a = M.numpy()
    a = _finished(a, [G])
    return torch.from_numpy((a + a.T) * 0.5)  # exactly symmetric


_FLOAT_PATH_MAX_K = 8


def _checked_symmetric(rows: list[list[float]], low: float) -> list[list[float]] | None:
    """``(M + Mᵀ)/2`` of a K × K Gramian given as nested lists, or ``None`` when an entry is
    not finite or a diagonal entry is below ``low`` (the caller's rare path decides then)."""
    K = len(rows)
    for i in range(K):
        if not low <= rows[i][i] <= _F64_MAX:  # NaN fails too
            return None
    for row in rows:
        if not all(map(math.isfinite, row)):
            return None
    return [[(ri[j] + rows[j][i]) * 0.5 for j in range(K)] for i, ri in enumerate(rows)]


def gramian_of_blocks(
    blocks: list[Tensor],
    *,
    extra: Tensor | None = None,
    extra_rows: Callable[[], list[Tensor]] | None = None,
) -> Tensor:
    """:func:`gramian_of` of ``G = [G_1 | ... | G_n]`` given its column blocks (K, n_j), without
    concatenating them: ``M = Σ_j G_j G_jᵀ``, float64 CPU, exactly symmetric.

    Same semantics as ``gramian_of``: the product runs in the blocks' dtype; a float32 diagonal
    entry that is non-finite or below :func:`underflow_threshold` of the total width (of a row
    that is not exactly zero) triggers a float64 recomputation; a non-finite result raises naming
    the task rows that hold NaN/inf, or the overflow.

    ``extra`` is a share of ``M`` computed elsewhere (K × K, float64, on the blocks' device; the
    factored linear layers), added before the checks and moved to the CPU in the same transfer.
    When it is not finite, ``extra_rows()`` materialises the Jacobian blocks it stands for, so
    that the error names the same rows as the unfactored path.
    """
    M = _gram_blocks(blocks) if blocks else None
    if extra is not None:
        both = extra[None] if M is None else torch.stack([M.to(torch.float64), extra])
        both = both.cpu()  # the one device-to-host transfer
        a_extra = both[-1].numpy()
        if not np.isfinite(a_extra).all():
            if extra_rows is not None:
                gramian_of_blocks(blocks + extra_rows())  # raises, naming the rows
            raise ValueError("the Gramian G Gᵀ of the linear layers is not finite")
        a = _finished(both[0].numpy(), blocks) if M is not None else np.zeros_like(a_extra)
        a = a + a_extra
        if not np.isfinite(a).all():
            raise ValueError("the Gramian G Gᵀ overflows float64; rescale the losses")
    else:
        assert M is not None, "gramian_of_blocks needs blocks or extra"
        if M.device.type != "cpu":
            M = M.cpu()  # the one device-to-host transfer
        a = _finished(M.numpy(), blocks)
    return torch.from_numpy((a + a.T) * 0.5)


def gramians_of_batch(G: Tensor) -> Tensor:
    """The Gramians ``M_b = G_b G_bᵀ`` (B, K, K) of B Jacobians ``G`` (B, K, d), float64 CPU,
    exactly symmetric, with the range fallback and the errors of :func:`gramian_of` (errors name
    ``(batch, task)`` entries)."""
    Gd = G.detach()
    work = Gd if Gd.dtype in (torch.float32, torch.float64) else Gd.float()
    a = _finished((work @ work.transpose(1, 2)).cpu().numpy(), [Gd])
    return torch.from_numpy(0.5 * (a + a.transpose(0, 2, 1)))


def _finished(a: np.ndarray, blocks: list[Tensor]) -> np.ndarray:
    """The float64 Gramian(s) ``a`` (…, K, K), formed from the column blocks (…, K, n_j) in their
    dtype, checked: recomputed in float64 when a float32 product lost range
    (:func:`_needs_float64`), then raising when still not finite (:func:`_raise_non_finite`)."""
    if blocks[0].dtype != torch.float64:
        a = a.astype(np.float64)
        d = sum(b.shape[-1] for b in blocks)
        # Common case: every squared norm finite and far above the underflow range (a K-long
        # comparison in Python; NaN fails it too).
        diag = np.diagonal(a, axis1=-2, axis2=-1)
        if not _diagonal_in_range(diag, underflow_threshold(d)) and _needs_float64(diag, blocks, d):
            a = _gram_any([b.double() for b in blocks]).cpu().numpy()
    if not np.isfinite(a).all():
        _raise_non_finite(a, blocks)
    return a


def _raise_non_finite(a: np.ndarray, blocks: list[Tensor]) -> None:
    """``a`` (float64, from float64 arithmetic) is not finite: name the rows and the cause."""
    batched = blocks[0].dim() == 3
    finite_rows = torch.isfinite(blocks[0]).all(dim=-1).cpu()
    for b in blocks[1:]:
        finite_rows &= torch.isfinite(b).all(dim=-1).cpu()
    diag = np.diagonal(a, axis1=-2, axis2=-1)
    if batched:
        if not bool(finite_rows.all()):
            bad = torch.nonzero(~finite_rows).tolist()
            raise ValueError(
                f"the Jacobians are not finite: (batch, task) entries {bad[:10]} contain NaN or inf"
            )
        bad = np.argwhere(~np.isfinite(diag)).tolist()
        where = f"(batch, task) entries {bad[:10]}" if bad else "an off-diagonal entry"
        raise ValueError(f"the Gramians overflow float64 at {where}; rescale the losses")
    if not bool(finite_rows.all()):
        bad = [i for i, ok in enumerate(finite_rows.tolist()) if not ok]
        raise ValueError(f"the Jacobian is not finite: task row(s) {bad} contain NaN or inf")
    bad = [i for i, x in enumerate(diag.tolist()) if not math.isfinite(x)]
    if bad:
        raise ValueError(
            f"the squared norm of task row(s) {bad} of the Jacobian overflows float64; "
            "rescale the losses"
        )
    raise ValueError("the Gramian G Gᵀ overflows float64; rescale the losses")


def underflow_threshold(d: int) -> float:
    """Smallest float32 squared row norm trusted without a float64 recomputation.

    Each product ``g_k²`` that falls below float32's smallest normal number (``tiny = 2⁻¹²⁶``)
    is rounded with an absolute error up to ``2⁻¹⁵⁰ = tiny·2⁻²⁴``, so a sum of ``d`` of them
    is off by at most ``d·tiny·2⁻²⁴``. Above ``tiny·2²⁴·d`` that error is below ``2⁻⁴⁸`` of
    the norm, far below float32 rounding; the same bound holds for off-diagonal entries
    (``|M_ij| ≤ √(M_ii M_jj)``).
    """
    return _F32_TINY_2_24 * max(d, 1)


_F32_TINY_2_24 = float(torch.finfo(torch.float32).tiny) * 2.0**24
_F64_MAX = float(np.finfo(np.float64).max)


def _diagonal_in_range(diag: np.ndarray, low: float) -> bool:
    """Every entry of the diagonal(s) ``diag`` in ``[low, float64 max]`` (NaN fails)."""
    for x in diag.ravel().tolist():
        if not low <= x <= _F64_MAX:
            return False
    return True


def _needs_float64(diag: np.ndarray, G: Tensor | list[Tensor], d: int) -> bool:
    """Whether a float32 Gramian with diagonal ``diag`` lost range (overflow or underflow).

    Exactly-zero rows of ``G`` (a task with no gradient) are fine in float32; a zero diagonal
    entry is checked against its row (one pass over that row only) before recomputing.
    ``G`` is a Jacobian or its column blocks; ``diag`` has shape (K,) for (K, d) blocks or
    (B, K) for (B, K, d) blocks.
    """
    blocks = G if isinstance(G, list) else [G]
    suspect = ~np.isfinite(diag) | (diag < underflow_threshold(d))
    if not suspect.any():
        return False
    if (~np.isfinite(diag)).any():
        return True
    for index in zip(*np.nonzero(suspect)):
        if diag[index] != 0.0 or any(bool(b[index].any()) for b in blocks):
            return True  # a nonzero row whose squared norm underflowed
    return False


#: Column block of the CPU Gramian (see :func:`_gram`).
GRAMIAN_BLOCK = 1 << 16
#: From this width on, K < 4 Jacobians get the blocked Gramian too.
GRAMIAN_WIDE = 1 << 22


def _gram(work: Tensor) -> Tensor:
    """``work @ work.T``; on the CPU for wide ``work``, summed over 65 536-column blocks.

    MKL's single-call product of a (K × d)·(d × K) pair with d ≥ 10⁶ picks a slow kernel for some
    K and accumulates each entry in one float32 run. The blocked form is one batched product of
    the (K × 65 536) blocks (``torch.bmm`` over a strided view: no copy) and a sum of the K × K
    partial Gramians. Measured on one thread of a 2-core x86 machine: K = 8, d = 10⁶ in 4.3 ms
    instead of 6.8 ms; K = 2 and 4, d = 10⁷ in 6.3 and 12.4 ms instead of 7.3 and 21 ms; K = 4,
    d = 10⁶ on par. It is also more accurate: the largest relative error of a float32 Gramian
    (against float64) at d = 10⁷ drops from ~1e-3 to ~1e-6. Rows or columns of unit stride (a row slice, a transposed array) are both
    blocked through views. K < 4 below ``GRAMIAN_WIDE`` columns (where the single product was up
    to 5 % faster), narrow Jacobians, other layouts and GPUs get the single product.
    """
    K, d = work.shape
    if (
        work.device.type != "cpu"
        or d <= 2 * GRAMIAN_BLOCK
        or (K < 4 and d < GRAMIAN_WIDE)
        or (work.stride(1) != 1 and work.stride(0) != 1)
    ):
        return work @ work.T
    n_blocks = d // GRAMIAN_BLOCK
    covered = n_blocks * GRAMIAN_BLOCK
    if work.stride(1) == 1:  # rows of unit stride: blocks (n_blocks, K, BLOCK)
        blocks = work[:, :covered].view(K, n_blocks, GRAMIAN_BLOCK).transpose(0, 1)
    else:  # columns of unit stride (a transposed (d, K) array): the same blocks, transposed
        blocks = work.T[:covered].view(n_blocks, GRAMIAN_BLOCK, K).transpose(1, 2)
    M = torch.bmm(blocks, blocks.transpose(1, 2)).sum(dim=0)
    if covered < d:
        tail = work[:, covered:]
        M.addmm_(tail, tail.T)
    return M


def _gram_blocks(blocks: list[Tensor]) -> Tensor:
    """``Σ_j G_j G_jᵀ`` of (K, n_j) blocks in their dtype, on their device."""
    M = _gram(blocks[0])
    for b in blocks[1:]:
        if b.shape[1] > 2 * GRAMIAN_BLOCK:
            M.add_(_gram(b))
        elif b.shape[1] > 0:
            M.addmm_(b, b.T)
    return M


def _gram_any(blocks: list[Tensor]) -> Tensor:
    """``Σ_j G_j G_jᵀ`` of (K, n_j) or (B, K, n_j) blocks."""
    if blocks[0].dim() == 2:
        return _gram_blocks(blocks)
    M = blocks[0] @ blocks[0].transpose(1, 2)
    for b in blocks[1:]:
        M = M + b @ b.transpose(1, 2)
    return M
