"""Drift and diffusion: how the report and classification gradients meet on the shared encoder.

The two symptoms of "The Double Dilemma in Multi-Task Radiology Report Generation" (ICML 2026),
measured on the shared encoder's parameters with ``g_i = ∇_θ L_i`` the task gradients and ``ω``
the task weights:

* **drift** ``cos(g_report, g_cls) = ⟨g_1, g_2⟩ / (‖g_1‖ ‖g_2‖)``: negative when the tasks
  conflict, i.e. a joint update moves the shared encoder against one of them;
* **diffusion** ``‖g_combined‖ / ‖g_joint‖`` with ``g_joint = Σ ω_i g_i`` and ``g_combined`` the
  update a method actually applies to the encoder: below 1 when conflict-averse aggregation
  shrinks the update (the magnitude loss CAME-Grad's energy injection counters).

Everything here follows from the Gramian ``M = G Gᵀ`` (K × K), so a training step that already
aggregated ``G`` gets the figures for free (:func:`conflict_figures`); :func:`measure_conflict`
computes them on its own for a model and some batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .model import RRGModel

__all__ = ["conflict_figures", "conflict_of_gradients", "measure_conflict", "task_gradients"]

#: The CAME-Grad authors' task weights: report loss 1, classification loss ``cls_weight = 4``.
AUTHORS_TASK_WEIGHTS = (1.0, 4.0)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (asynchronous copies from pinned memory on CUDA)."""
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def task_gradients(losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """The Jacobian ``G`` (K, d): row i is ``∇_θ L_i`` flattened over ``params`` (float32)."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
            for g, p in zip(grads, params)
        ]))
    return torch.stack(rows)


def conflict_figures(M: Tensor, weights: Sequence[float], *, row_scale: Sequence[float] | None = None,
                     combined_norm: float | None = None) -> dict[str, float]:
    """Drift and magnitude figures from the Gramian ``M = G Gᵀ`` (K × K) of the task gradients.

    ``row_scale`` ``s`` says the rows of ``G`` are ``s_i g_i`` (losses scaled before
    differentiation); the figures are of the unscaled ``g_i``. With ``ω = weights``:

    * ``drift_cos = ⟨g_1, g_2⟩ / (‖g_1‖ ‖g_2‖)`` (report vs classification);
    * ``norm_ratio = ‖g_2‖ / ‖g_1‖``; ``grad_norm_i = ‖g_i‖``; ``joint_norm = ‖Σ ω_i g_i‖``;
    * with ``combined_norm = ‖g_combined‖`` (the update applied to the encoder):
      ``diffusion = ‖g_combined‖ / ‖Σ ω_i g_i‖``.

    Undefined ratios (a zero norm) are NaN, on purpose: the log shows that they are undefined.
    """
    M64 = M.detach().to(device="cpu", dtype=torch.float64)
    K = M64.shape[0]
    if K < 2:
        raise ValueError("drift needs at least two tasks")
    if row_scale is not None:
        s = torch.tensor(list(row_scale), dtype=torch.float64)
        if bool((s <= 0).any()):
            raise ValueError(f"row scales must be positive, got {list(row_scale)}")
        M64 = M64 / (s[:, None] * s[None, :])
    w = torch.tensor(list(weights), dtype=torch.float64)
    norms = M64.diagonal().clamp(min=0).sqrt()
    joint = float((w @ M64 @ w).clamp(min=0).sqrt())
    denom = float(norms[0] * norms[1])
    nan = float("nan")
    out = {
        "drift_cos": float(M64[0, 1]) / denom if denom > 0 else nan,
        "norm_ratio": float(norms[1] / norms[0]) if float(norms[0]) > 0 else nan,
    }
    for i, n in enumerate(norms.tolist()):
        out[f"grad_norm_{i + 1}"] = n
    out["joint_norm"] = joint
    if combined_norm is not None:
        out["combined_norm"] = float(combined_norm)
        out["diffusion"] = float(combined_norm) / joint if joint > 0 else nan
    return out


def conflict_of_gradients(G: Tensor, weights: Sequence[float] | None = None,
                          combined: Tensor | None = None) -> dict[str, float]:
    """:func:`conflict_figures` of a Jacobian ``G`` (K, d) of unscaled task gradients; ``combined``
    (d,) is the applied update. ``weights`` default to ones."""
    G64 = G.detach().double()
    M = G64 @ G64.T
    w = [1.0] * G.shape[0] if weights is None else list(weights)
    c = None if combined is None else float(combined.detach().double().norm())
    return conflict_figures(M, w, combined_norm=c)


@torch.no_grad()
def shared_grad(params: Sequence[Tensor]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in params])


def measure_conflict(model: RRGModel, batches: Iterable[dict[str, Any]], n_batches: int, *,
                     task_weights: Sequence[float] | None = None,
                     device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean and spread of the report/classification gradient conflict on the shared encoder.

    Over ``n_batches`` batches (dicts from ``collate_rrg``), computes per batch the Jacobian of
    the two losses on the encoder's parameters and reports the mean and standard deviation of
    ``drift_cos`` and of ``norm_ratio = ‖g_cls‖/‖g_report‖`` (unweighted gradients), the share
    of conflicting batches (cos < 0) and the mean weighted ratio ``ω_2‖g_cls‖ / (ω_1‖g_report‖)``.
    The model's parameters and ``.grad`` are left unchanged.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    device = torch.device(device)
    w = list(task_weights) if task_weights is not None else list(AUTHORS_TASK_WEIGHTS)
    shared = model.shared_parameters()
    cos, ratio = [], []
    it = iter(batches)
    for _ in range(n_batches):
        try:
            batch = to_device(next(it), device)
        except StopIteration:
            break
        out = model(batch["images"], batch["tokens"], batch["classes"])
        G = task_gradients([out["report"], out["classification"]], shared)
        c = conflict_of_gradients(G)
        cos.append(c["drift_cos"])
        ratio.append(c["norm_ratio"])
    if not cos:
        raise ValueError("no batches to measure the conflict on")
    cos_t, ratio_t = torch.tensor(cos, dtype=torch.float64), torch.tensor(ratio, dtype=torch.float64)
    return {
        "n_batches": len(cos),
        "cos_mean": float(cos_t.mean()),
        "cos_std": float(cos_t.std()) if len(cos) > 1 else 0.0,
        "frac_conflicting": float((cos_t < 0).double().mean()),
        "norm_ratio_mean": float(ratio_t.mean()),
        "norm_ratio_std": float(ratio_t.std()) if len(ratio) > 1 else 0.0,
        "weighted_norm_ratio_mean": float(ratio_t.mean() * w[1] / w[0]),
    }
