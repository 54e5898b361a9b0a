"""Preference vectors: the per-task weighting ``u`` that several methods combine rows with."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from mtl_opt._validation import check_task_vector


def check_preference(value: Sequence[float] | Tensor | None, owner: str) -> list[float] | None:
    """A finite, non-empty preference vector as a list of floats (``None`` stays ``None``)."""
    if value is None:
        return None
    n = len(value)
    if n == 0:
        raise ValueError(f"{owner}: pref_vector must not be empty")
    return [float(x) for x in check_task_vector(value, n, f"{owner} pref_vector").tolist()]


def preference_for(pref: list[float] | None, n_tasks: int, default: float, owner: str) -> np.ndarray:
    """``pref`` as a float64 array of length ``n_tasks``; ``None`` means ``default`` everywhere."""
    if pref is None:
        return np.full(n_tasks, default)
    if len(pref) != n_tasks:
        raise ValueError(
            f"{owner}: pref_vector has {len(pref)} entries but there are {n_tasks} tasks"
        )
    return np.asarray(pref, dtype=np.float64)
