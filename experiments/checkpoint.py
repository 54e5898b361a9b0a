"""Checkpoints of training runs: tensors and plain data only, loaded without running code.

A checkpoint is a dict written with ``torch.save`` whose every entry is a tensor or plain data
(str, int, float, bool, None, ``torch.Size``/``dtype``/``device``, and lists, tuples and dicts of
them): :func:`save_checkpoint` checks that before writing (and writes atomically: a crash mid-write
keeps the old file). :func:`load_checkpoint` reads one with ``torch.load(weights_only=True)``, so
a file that asks to import anything (a crafted pickle whose objects would run code when rebuilt)
is refused before anything in it runs; a damaged file, another kind of file or one without the
required entries is refused too, each with one ``ValueError`` naming the file.

:func:`rng_state` / :func:`set_rng_state` capture and restore every global random generator
(Python's, NumPy's, torch's CPU and CUDA) as tensors and plain data, so a resumed run draws what
an uninterrupted one would have drawn.
"""

from __future__ import annotations

import collections
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_plain", "first_line", "load_checkpoint", "plain_data", "rng_state",
           "save_checkpoint", "set_rng_state"]

#: Plain data that ``torch.load(weights_only=True)`` rebuilds (besides tensors, lists, tuples and
#: dicts of them); exact types: a subclass such as ``numpy.float64`` would be refused at load.
_PLAIN_TYPES = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global random generator's state as tensors and plain data (NumPy's key as a tensor:
    ``weights_only`` loading refuses NumPy arrays)."""
    import numpy as np

    name, key, pos, has_gauss, gauss = np.random.get_state()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
    }
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def plain_data(value: Any) -> Any:
    """``value`` with NumPy scalars (a hyperparameter drawn by a sweep, say) made Python numbers,
    through dicts, lists and tuples; unchanged containers are kept as they are."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (dict, list, tuple)):
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        plain = [(k, plain_data(v)) for k, v in items]
        if all(p is v for (_, p), (_, v) in zip(plain, items)):
            return value
        if isinstance(value, dict):
            return dict(plain)
        return type(value)(v for _, v in plain)
    return value


def check_plain(value: Any, where: str) -> None:
    """Raise ``TypeError`` naming the first entry of ``value`` that is not a tensor or plain data
    (such an entry would make the checkpoint unloadable with ``weights_only=True``)."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_TYPES:
        return
    if type(value) in (dict, collections.OrderedDict):
        for k, v in value.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; checkpoints hold "
                                "only tensors and plain data")
            check_plain(v, f"{where}[{k!r}]")
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}; checkpoints "
                    "hold only tensors and plain data (str, int, float, bool, None, and lists, "
                    "tuples and dicts of them)")


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``ckpt`` (checked to be tensors and plain data) to ``path`` atomically."""
    ckpt = plain_data(ckpt)
    check_plain(ckpt, "checkpoint")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def first_line(text: str) -> str:
    """The first line of an error message, at most 200 characters."""
    line = text.strip().splitlines()[0] if text.strip() else "no details"
    return line if len(line) <= 200 else line[:197] + "..."


def load_checkpoint(path: str | os.PathLike, *, fmt: str, required: Sequence[str] = (),
                    dicts: Sequence[str] = (), map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint of format ``fmt`` without running code from it (see the module
    docstring). ``required``: entries it must have; ``dicts``: those of them that are dicts. Every failure is one
    ``ValueError`` naming the file; a missing file is ``FileNotFoundError``."""
    import pickle
    import re
    import warnings

    where = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. pickle protocol notes: the error below says it all
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise ValueError(f"checkpoint {where} is corrupt or not a checkpoint ({first_line(text)})") from None
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = (f"it asks to import {found.group(1)}" if found else
                "it holds pickle instructions that a checkpoint of tensors and plain data never has")
        raise ValueError(f"checkpoint {where} refused: {what}; only tensors and plain data are loaded "
                         "(torch.load with weights_only=True), so nothing in it ran. mtl-opt "
                         "checkpoints hold nothing else: do not load this file with other tools") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {where} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for damaged files
        raise ValueError(f"checkpoint {where} is corrupt, truncated or not a checkpoint "
                         f"({type(exc).__name__}: {first_line(str(exc))})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise ValueError(f"checkpoint {where} is not an mtl-opt checkpoint of format {fmt!r}")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {where} lacks {missing}: it is incomplete or not written by mtl-opt")
    for key in dicts:
        if not isinstance(ckpt[key], dict):
            raise ValueError(f"checkpoint {where}: {key!r} is a {type(ckpt[key]).__name__}, not a dict")
    return ckpt
