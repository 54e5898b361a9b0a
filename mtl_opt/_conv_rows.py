"""Convolutions as products of rows: the unfolded input, for the Jacobian-free Gramian.

A convolution ``Y = W ⋆ X`` (``nn.Conv1d``/``nn.Conv2d``, ``F.conv1d``/``F.conv2d``, any stride,
padding, dilation and groups) is, at every output position ``p`` of every example ``n``, the
product ``Y[n, :, p] = W_flat · U[n, :, p]`` of the flattened weight (out × in/groups·k) with the
input patch ``U = unfold(X)`` that the kernel sees there (per group, a block of the columns). With
one row per (n, p), ``U`` (rows × in·k) and ``Δ_k = ∂L_k/∂Y`` (rows × out) play the roles of a
linear layer's ``X`` and ``Δ_k``: task ``k``'s weight gradient is ``Δ_kᵀ U`` per group, so the
weight's Gramian share is ``Σ_g Σ_ab (Δ_i,g Δ_j,gᵀ)_ab (U_g U_gᵀ)_ab`` and its update
``(Σ_k β_k Δ_k,g)ᵀ U_g`` (the per-example-gradient factorisation of convolutions, Rochette,
Manoel and Tramel, "Efficient per-example gradient computations in convolutional neural
networks", 2019, applied to task gradients). It pays where rows are few and channels many: late,
low-resolution layers; :mod:`mtl_opt._layerwise`'s cost rule decides per layer.

Only what the graph proves is accepted (:func:`conv_geometry`): a ``ConvolutionBackward0`` node,
not transposed, 1-D or 2-D, whose saved input can be read without running saved-tensor hooks
and matches the weight's dtype, device and channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["ConvGeometry", "conv_geometry", "unfold_rows"]


@dataclass
class ConvGeometry:
    """A convolution's kernel, stride, padding and dilation (2-D; a 1-D one has height 1), its
    groups, and how many (example, output position) rows it has."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    rows: int


def _pair(values: Any, dims: int, height: int) -> tuple[int, int] | None:
    """Two values (height, width); a 1-D convolution's one value gets ``height`` before it."""
    values = tuple(values)
    if len(values) != dims or not all(isinstance(v, int) and v >= 0 for v in values):
        return None
    return (height, *values) if dims == 1 else values  # type: ignore[return-value]


def conv_geometry(node: Any, W: Tensor) -> tuple[Tensor, ConvGeometry] | None:
    """The saved input ``X`` and the geometry of a convolution node that uses ``W`` as its
    weight, or None when the node is not exactly such a convolution (transposed, 3-D, padding
    given as a string that was not resolved, saved input behind saved-tensor hooks or freed)."""
    if node.name() != "ConvolutionBackward0":
        return None
    dims = W.dim() - 2
    try:
        if node._saved_transposed or dims not in (1, 2):
            return None
        raw = node._raw_saved_input
        if getattr(raw, "unpack_hook", True) is not None:
            return None
        X = raw.unpack()
        stride = _pair(node._saved_stride, dims, 1)
        padding = _pair(node._saved_padding, dims, 0)
        dilation = _pair(node._saved_dilation, dims, 1)
        groups = int(node._saved_groups)
    except (AttributeError, RuntimeError, TypeError):  # freed graph, new names, symbolic sizes
        return None
    if stride is None or padding is None or dilation is None or min(stride) < 1 or min(dilation) < 1:
        return None
    if (
        not isinstance(X, Tensor) or X.layout != torch.strided or X.dim() != W.dim()
        or X.shape[0] == 0 or groups < 1 or W.shape[0] % groups
        or X.shape[1] != W.shape[1] * groups or X.dtype != W.dtype or X.device != W.device
        or X.is_complex()
    ):
        return None
    kernel = (1, W.shape[2]) if dims == 1 else (W.shape[2], W.shape[3])
    size = (1, X.shape[2]) if dims == 1 else (X.shape[2], X.shape[3])
    positions = 1
    for n, k, s, p, d in zip(size, kernel, stride, padding, dilation):
        extent = n + 2 * p - d * (k - 1) - 1
        if extent < 0:
            return None
        positions *= extent // s + 1
    return X.detach(), ConvGeometry(kernel, stride, padding, dilation, groups, X.shape[0] * positions)


def unfold_rows(X: Tensor, geometry: ConvGeometry) -> Tensor:
    """The input patches (rows × in·k): row ``n · P + p`` is the patch of example ``n`` at
    output position ``p`` (row-major over the output's spatial positions), columns ordered like
    the flattened weight (channel, then kernel position)."""
    if X.dim() == 3:
        X = X.unsqueeze(2)
    U = F.unfold(X, geometry.kernel, dilation=geometry.dilation, padding=geometry.padding,
                 stride=geometry.stride)  # (N, in·k, P)
    return U.transpose(1, 2).reshape(-1, U.shape[1])
