"""Epoch bookkeeping shared by the loss weightings that read epoch-level losses (DWA, STCH)."""

from __future__ import annotations

from mtl_opt._validation import check_range


def check_epoch_length(value: object, owner: str) -> int | None:
    """``None`` (epochs end by ``end_epoch()``) or an integer ≥ 1 (steps per epoch)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: epoch_length must be an integer >= 1 or None, got {value!r}")
    return int(check_range("epoch_length", value, low=1, owner=owner))
