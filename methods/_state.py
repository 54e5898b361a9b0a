"""Small checks shared by the stateful and the seeded methods (seeds, saved states)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


#: The seeds :meth:`torch.Generator.manual_seed` takes.
TORCH_SEEDS = (-(2**63), 2**64)
#: The seeds :func:`numpy.random.default_rng` takes (any non-negative int; bounded here too).
NUMPY_SEEDS = (0, 2**64)


def checked_seed(owner: str, seed: object, seeds: tuple[int, int] = TORCH_SEEDS) -> int | None:
    """``seed`` as an int in ``[seeds[0], seeds[1])``, or ``None``. A non-int raises
    ``TypeError`` and an int out of range ``ValueError``, naming the method: a seed is refused
    rather than reduced (modulo 2**64 a seed of 2**70 would draw what 0 draws)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{owner}: seed must be an int or None, got {seed!r}")
    low, end = seeds
    if not low <= int(seed) < end:
        low_text = "0" if low == 0 else "-2**63"
        raise ValueError(
            f"{owner}: seed must be an int in [{low_text}, 2**64) (what its random generator "
            f"accepts), got {seed!r}"
        )
    return int(seed)


def drawn_seed(seed: int | None) -> int:
    """The seed a generator is started from: ``seed``, or one drawn from torch's global generator
    (so that ``torch.manual_seed`` makes runs reproducible)."""
    return int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed


def checked_state(owner: str, state: object, keys: Iterable[str]) -> dict[str, Any]:
    """A saved state must be a dict with exactly ``keys``."""
    expected = sorted(keys)
    if not isinstance(state, dict) or sorted(state) != expected:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{owner} state must have keys {expected}, got {got}")
    return state


def checked_counter(owner: str, name: str, value: object) -> int:
    """A step counter of a saved state: a non-negative int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{owner} state {name!r} must be a non-negative integer, got {value!r}")
    return int(value)


def checked_tensor(owner: str, name: str, value: object, ndim: int) -> Tensor | None:
    """An optional floating tensor of a saved state with ``ndim`` dimensions (cloned)."""
    if value is None:
        return None
    if not isinstance(value, Tensor) or value.dim() != ndim or not value.is_floating_point():
        got = f"shape {tuple(value.shape)}, dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{owner} state {name!r} must be None or a {ndim}-D floating tensor, got {got}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{owner} state {name!r} is not finite")
    return value.detach().clone()


def clone_or_none(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


class SeededGenerator:
    """The state of a method whose only memory is a seeded ``torch.Generator`` (its random draws).

    :meth:`_start_generator` checks ``seed`` (an int, or ``None`` for one drawn from torch's
    global generator) and stores it as the ``seed`` hyperparameter; :meth:`reset` re-seeds, and
    :meth:`state_dict` / :meth:`load_state_dict` save and restore the generator, so a resumed
    run draws what an uninterrupted one would. Listed before the aggregator base class.
    """

    seed: int | None
    _seed_used: int
    _generator: torch.Generator

    def _start_generator(self, seed: object) -> None:
        self.seed = checked_seed(type(self).__name__, seed)  # refused, never reduced
        self._seed_used = drawn_seed(self.seed)
        self._generator = torch.Generator()
        self.reset()

    def reset(self) -> None:
        self._generator.manual_seed(self._seed_used)

    def state_dict(self) -> dict[str, Any]:
        return {"generator_state": self._generator.get_state().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checked_state(type(self).__name__, state, ["generator_state"])
        self._generator.set_state(state["generator_state"])
