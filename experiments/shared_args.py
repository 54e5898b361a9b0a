"""The arguments every study command shares, written once: ``--methods``, ``--seeds``, ``--out``.

Every ``mtl-opt`` command that takes these options adds them with the functions below and reads
them with the parsers below, so they mean the same thing everywhere (a test parses them in every
subcommand):

* ``--methods``: one or more method specs, ``NAME[:key=value,...]``, separated by spaces, by
  commas, or both: ``--methods ls mgda cagrad:c=0.5`` = ``--methods ls,mgda,cagrad:c=0.5``.
  After a spec with hyperparameters, a comma followed by ``key=value`` continues that spec
  (``came_grad:kappa=2,nu=0.1,mgda`` is two specs); commas inside brackets belong to a value
  (``came_grad:task_weights=[1,4]``). A method listed twice is refused.
* ``--seeds``: comma-separated integers (``0,4,7``) or a count (``3x`` = ``0,1,2``); a seed
  listed twice is refused.
* ``--workload``: in ``ablate`` and ``sweep``, beside ``--problem``: a training workload spec
  (``rrg``, ``multimnist:n_train=2000``) whose runs go through the one trainer.
* ``--out``: a folder that is new or empty, claimed atomically before any work
  (:mod:`mtl_opt._output_folder`); without it, ``runs/<command>-<UTC timestamp>`` (the next free
  ``-2``, ``-3``, ... when two runs start in the same second).

Only argparse is imported here (command modules import this to build the parser).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "add_methods_argument",
    "add_out_argument",
    "add_seeds_argument",
    "add_workload_argument",
    "claim_out",
    "out_target",
    "parse_methods",
    "parse_seeds",
    "study_target",
]

SEEDS_HELP = "comma-separated seeds (0,4,7) or a count such as '3x' for 0,1,2"
METHODS_HELP = ("method specs, separated by spaces or commas, e.g. ls mgda cagrad:c=0.5 or "
                "ls,came_grad:kappa=2,nu=0.5 (a comma followed by key=value continues the "
                "previous spec's hyperparameters)")


# ------------------------------------------------------------------------------------- seeds
def parse_seeds(text: str | int | Sequence[int], option: str = "--seeds") -> tuple[int, ...]:
    """The one seeds grammar: ``"0,4,7"`` -> (0, 4, 7); ``"3"`` -> (3,); a count ``"3x"`` ->
    (0, 1, 2). From Python an ``int`` is a count and a sequence is used as is. Empty, malformed
    and repeated seeds raise :class:`ValueError` naming ``option``."""
    if isinstance(text, bool):
        raise ValueError(f"{option} must be a count or a list of integers, got {text!r}")
    if isinstance(text, int):
        if text < 1:
            raise ValueError(f"{option}: the number of seeds must be >= 1, got {text}")
        return tuple(range(text))
    if isinstance(text, str):
        raw = text.strip()
        try:
            if raw.lower().endswith("x"):
                return parse_seeds(int(raw[:-1]), option)
            seeds = tuple(int(p) for p in raw.split(",") if p.strip())
        except ValueError:
            raise ValueError(
                f"{option} must be comma-separated integers (0,1,2) or a count (3x), got {text!r}"
            ) from None
    else:
        try:
            seeds = tuple(int(s) for s in text)
        except (TypeError, ValueError):
            raise ValueError(f"{option} must be integers, got {text!r}") from None
    if not seeds:
        raise ValueError(f"{option} is empty: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{option}: seeds repeat: {list(seeds)}")
    return seeds


def add_seeds_argument(parser: argparse.ArgumentParser, *, default: str = "0", more: str = "") -> None:
    """``--seeds``, read with :func:`parse_seeds` (``more``: what a seed means to this command)."""
    action = parser.add_argument("--seeds", default=default, metavar="SEEDS",
                                 help=f"{SEEDS_HELP} (default {default})" + (f". {more}" if more else ""))
    action.shared_argument = "seeds"  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------- methods
def _top_level_pieces(text: str) -> list[str]:
    from mtl_opt._spec import split_top_level

    return [p.strip() for p in split_top_level(text)]


def parse_methods(values: str | Sequence[str] | None, option: str = "--methods") -> list[str] | None:
    """The one ``--methods`` grammar (see the module docstring): the method specs in order.

    ``None`` stays ``None`` (the command's default). Only the grammar is checked here (an empty
    piece, a ``key=value`` that continues no spec, a method listed twice); the command checks
    the names and hyperparameters against the registry.
    """
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    specs: list[str] = []
    for value in values:
        for piece in _top_level_pieces(str(value)):
            if not piece:
                raise ValueError(f"{option} {' '.join(map(str, values))!r} has an empty method spec "
                                 "(a stray comma?)")
            continues = "=" in piece and ":" not in piece.split("=", 1)[0]
            if continues:
                if not specs or ":" not in specs[-1]:
                    raise ValueError(
                        f"{option}: {piece!r} continues no method spec; write the method first, "
                        f"e.g. 'cagrad:{piece}'")
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    if not specs:
        raise ValueError(f"{option} is empty: give at least one method")
    seen: set[str] = set()
    for spec in specs:
        if spec in seen:
            raise ValueError(f"{option}: method {spec!r} is listed twice")
        seen.add(spec)
    return specs


def add_methods_argument(parser: argparse.ArgumentParser, *, required: bool = False,
                         default_text: str = "") -> None:
    """``--methods``, read with :func:`parse_methods` (``default_text``: what runs without it)."""
    more = f" (default: {default_text})" if default_text else ""
    action = parser.add_argument("--methods", nargs="+", metavar="METHOD", default=None,
                                 required=required, help=METHODS_HELP + more)
    action.shared_argument = "methods"  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------- --out
def add_out_argument(parser: argparse.ArgumentParser, *, prefix: str, what: str = "output folder") -> None:
    """``--out``: a new or empty folder, claimed atomically (default ``runs/<prefix>-<UTC time>``)."""
    action = parser.add_argument("--out", default=None, metavar="FOLDER",
                                 help=f"{what}, new or empty, claimed before any work so that two "
                                 f"runs never share it (default runs/{prefix}-<UTC timestamp>)")
    action.shared_argument = "out"  # type: ignore[attr-defined]


def out_target(out: str | os.PathLike | None, *, prefix: str) -> tuple[Path, bool]:
    """The folder ``--out`` names, or the default ``runs/<prefix>-<UTC time>``, and whether a
    taken name may move on to ``-2``, ``-3``, ... (only the default's)."""
    from mtl_opt._output_folder import default_folder_name

    if out is None:
        return default_folder_name(prefix), True
    return Path(out), False


def claim_out(out: str | os.PathLike | None, *, prefix: str, command: str) -> Any:
    """Claim ``--out`` (or the default folder) for one run: an
    :class:`~mtl_opt._output_folder.OutputFolder`, usable as a context manager. A folder with
    anything in it, a file, or an unwritable place is refused with one message naming it."""
    from mtl_opt._output_folder import claim_output_folder

    path, unique = out_target(out, prefix=prefix)
    return claim_output_folder(path, command=command, unique=unique)


# -------------------------------------------------------------------------------- --workload
def add_workload_argument(parser: argparse.ArgumentParser) -> None:
    """``--workload SPEC`` of the studies that also take ``--problem`` (ablate, sweep)."""
    action = parser.add_argument(
        "--workload", default=None, metavar="SPEC",
        help="a training workload instead of --problem, e.g. rrg or 'multimnist:n_train=2000': each "
        "run is the one trainer's (as mtl-opt train); the default metric is loss_mean (the mean task "
        "loss); test_<metric> and val_<metric> are reported at the end")
    action.shared_argument = "workload"  # type: ignore[attr-defined]


def study_target(args: argparse.Namespace, *, default_problem: str = "toy") -> Any:
    """What ``--problem`` / ``--workload`` name: the problem spec, or the training workload trained
    by the one trainer (:class:`~mtl_opt.experiments.workloads.TrainedWorkload`); not both."""
    if getattr(args, "workload", None) is None:
        return args.problem
    if args.problem != default_problem:
        raise ValueError(f"give --problem or --workload, not both (got --problem {args.problem} "
                         f"and --workload {args.workload})")
    from mtl_opt.experiments.workloads import TrainedWorkload

    return TrainedWorkload(args.workload)
