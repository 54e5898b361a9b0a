"""``mtl-opt``: the one command; its subcommands are discovered, not listed here.

A module declares a subcommand with two module-level string constants and two functions::

    COMMAND = "compare"                      # the subcommand's name
    COMMAND_HELP = "compare methods on ..."  # its one-line help
    def configure(parser): ...               # adds its arguments; imports nothing heavy
    def run(args) -> int: ...                # does the work; heavy imports go in here

Two places are searched: the modules of :mod:`mtl_opt.experiments` (where the library's studies
live), and the ``mtl_opt.commands`` entry points of installed packages
(``[project.entry-points."mtl_opt.commands"] mine = "my_package.my_command"``), which lets
another package add a subcommand. The declarations are read from the modules' source without
importing them, so ``mtl-opt --help`` lists every subcommand without importing torch; only the
subcommand that runs is imported (to add its arguments and run).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import pkgutil
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["Subcommand", "build_parser", "discover_subcommands", "main"]

#: Entry-point group through which other packages add subcommands.
ENTRY_POINT_GROUP = "mtl_opt.commands"
#: Package whose modules are searched for ``COMMAND`` declarations.
COMMAND_PACKAGE = "mtl_opt.experiments"


@dataclass(frozen=True)
class Subcommand:
    """A discovered subcommand: its name, help line and the module that implements it."""

    name: str
    help: str
    module: str


def _string_constant(source: str, name: str) -> str | None:
    """The string assigned to ``name`` at the start of a line of ``source`` (a literal, possibly
    parenthesised over several lines), read by parsing that statement alone."""
    match = re.search(rf"^{name}\s*=", source, re.MULTILINE)
    if match is None:
        return None
    lines = source[match.start():].splitlines()
    for n in range(1, min(len(lines), 12) + 1):
        try:
            node = ast.parse("\n".join(lines[:n])).body[0]
        except SyntaxError:
            continue  # the statement goes on
        value = getattr(node, "value", None)
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return value.value
        return None
    return None


def _declaration(path: Path, module: str) -> Subcommand | None:
    """The ``COMMAND`` / ``COMMAND_HELP`` constants of the module at ``path``, read from its source
    (the module is neither imported nor parsed whole); ``None`` when it declares no subcommand."""
    try:
        source = path.read_text(encoding="utf-8")
    except OSError:
        return None
    name = _string_constant(source, "COMMAND")
    if name is None:
        return None
    return Subcommand(name, _string_constant(source, "COMMAND_HELP") or "", module)


def _entry_point_modules() -> list[str]:
    from importlib.metadata import entry_points

    return [ep.value.split(":", 1)[0].strip() for ep in entry_points(group=ENTRY_POINT_GROUP)]


def _add(found: dict[str, Subcommand], command: Subcommand) -> None:
    if command.name in found and found[command.name].module != command.module:
        raise RuntimeError(f"two modules declare the subcommand {command.name!r}: "
                           f"{found[command.name].module} and {command.module}")
    found[command.name] = command


@lru_cache(maxsize=1)
def _library_subcommands() -> dict[str, Subcommand]:
    """The subcommands the modules of :mod:`mtl_opt.experiments` declare."""
    package = importlib.import_module(COMMAND_PACKAGE)  # light: loads its studies lazily
    found: dict[str, Subcommand] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            continue
        spec = info.module_finder.find_spec(info.name)  # type: ignore[call-arg]
        command = _declaration(Path(spec.origin), f"{COMMAND_PACKAGE}.{info.name}") \
            if spec is not None and spec.origin else None
        if command is not None:
            _add(found, command)
    return found


@lru_cache(maxsize=1)
def discover_subcommands() -> dict[str, Subcommand]:
    """Every subcommand, by name (sorted): the modules of :mod:`mtl_opt.experiments` that declare
    one, then the ``mtl_opt.commands`` entry points. Two modules declaring one name are refused."""
    found = dict(_library_subcommands())
    for module in _entry_point_modules():
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin:
            raise RuntimeError(f"the {ENTRY_POINT_GROUP} entry point {module!r} names no module")
        command = _declaration(Path(spec.origin), module)
        if command is None:
            raise RuntimeError(f"the {ENTRY_POINT_GROUP} entry point {module!r} declares no COMMAND")
        _add(found, command)
    return dict(sorted(found.items()))


ALL = "*"


def build_parser(command: str | None = ALL) -> argparse.ArgumentParser:
    """The ``mtl-opt`` parser. Only ``command``'s module is imported (to add its arguments), every
    module with ``ALL``; the others are listed by name and help text, so ``mtl-opt --help``
    (``command=None``) imports no subcommand module."""
    parser = argparse.ArgumentParser(
        prog="mtl-opt",
        description="Multi-task gradient aggregation: list methods, compare them, ablate and "
        "sweep them, train workloads.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # A library subcommand named on the command line needs nobody else's declaration (the
    # installed packages' entry points are not scanned): the parser holds that one alone.
    library = _library_subcommands()
    known = {command: library[command]} if command in library else discover_subcommands()
    for name, found in known.items():
        p = sub.add_parser(name, help=found.help, description=found.help)
        if command in (name, ALL):
            module = importlib.import_module(found.module)
            module.configure(p)
            p.set_defaults(_run=module.run)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option, if known."""
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is None:
        return None
    return word if word in _library_subcommands() or word in discover_subcommands() else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # Bad options and bad input: one clear line, no traceback.
        print(f"mtl-opt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
