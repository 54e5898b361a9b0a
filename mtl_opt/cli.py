"""``mtl-opt``: the one command.

Each subcommand lives in its own module exposing ``configure(parser)`` (adds the arguments; must
import nothing heavy) and ``run(args) -> int``. The module is imported only to build the parser;
its heavy dependencies (pandas, plotly, Ray) are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "methods": ("mtl_opt.cli", "list every registered method with its hyperparameters and defaults"),
    "compare": ("mtl_opt.experiments.compare_cli", "compare methods on synthetic Pareto problems with known fronts, or on a training workload (--workload)"),
    "ablate": ("mtl_opt.experiments.ablate_study", "CAME-Grad stage ablation over seeds, with paired confidence intervals"),
    "sweep": ("mtl_opt.experiments.sweep_study", "Ray Tune search over a method's hyperparameters on any problem"),
    "train": ("mtl_opt.experiments.train_cli", "train any training workload (multimnist, ...) with any method"),
    "rrg": ("mtl_opt.problems.rrg.cli", "radiology report generation: train, eval, conflict"),
    "bench": ("mtl_opt.experiments.bench", "time every method against the G Gᵀ + wᵀG floor (and TorchJD)"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mtl-opt methods``."""
    parser.add_argument("--format", choices=["table", "markdown", "properties"], default="table",
                        help="plain table (default), a Markdown table, or the Markdown table of "
                        "each method's kind, state and properties that the README shows")


KIND_LABELS = {"gramian": "Gramian weighting", "loss": "loss weighting", "general": "general"}
PROPERTY_LABELS = {
    "non_conflicting": "non-conflicting", "permutation_invariant": "permutation invariant",
    "linear_under_scaling": "linear under scaling",
    "stationary_at_pareto_stationary": "stationary at Pareto-stationary points",
}


def properties_table() -> list[str]:
    """The Markdown table of every method's declared kind, state and properties (the README's
    table under "Methods"; tests/test_method_properties.py checks both)."""
    import mtl_opt
    from mtl_opt.aggregator import PROPERTIES

    lines = [
        "| name | kind | state | " + " | ".join(PROPERTY_LABELS[p] for p in PROPERTIES) + " |",
        "|" + "---|" * (3 + len(PROPERTIES)),
    ]
    for info in mtl_opt.describe_aggregators():
        cls = info.cls
        marks = " | ".join("yes" if p in cls.properties else "" for p in PROPERTIES)
        lines.append(f"| `{info.name}` | {KIND_LABELS[cls.kind]} | {cls.state} | {marks} |")
    return lines


def run(args: argparse.Namespace) -> int:
    """``mtl-opt methods``: print the registered methods with their kind, state, properties."""
    import mtl_opt
    from mtl_opt.aggregator import PROPERTIES

    if args.format == "properties":
        print("\n".join(properties_table()))
        return 0
    rows = [
        (
            info.name,
            info.cls.__name__,
            KIND_LABELS[info.cls.kind],
            info.cls.state,
            ", ".join(PROPERTY_LABELS[p] for p in PROPERTIES if p in info.cls.properties) or "-",
            ", ".join(f"{k}={v!r}" for k, v in info.defaults.items()) or "-",
            info.summary,
        )
        for info in mtl_opt.describe_aggregators()
    ]
    header = ("name", "class", "kind", "state", "properties", "hyperparameters (defaults)",
              "summary")
    if args.format == "markdown":
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(f"`{c}`" if i < 2 else c for i, c in enumerate(row)) + " |")
        return 0
    n = len(header) - 1
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(n)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:n], widths)) + "  " + row[n])
    return 0


ALL = "*"


def build_parser(command: str | None = ALL) -> argparse.ArgumentParser:
    """The ``mtl-opt`` parser. Only ``command``'s module is imported (to add its arguments), every
    module with ``ALL``; the others are listed by name and help text, so ``mtl-opt --help``
    (``command=None``) imports no subcommand module."""
    parser = argparse.ArgumentParser(
        prog="mtl-opt",
        description="Multi-task gradient aggregation: list methods, compare them, ablate and "
        "sweep CAME-Grad, train the radiology report generation workload.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command in (name, ALL):
            module = importlib.import_module(module_name)
            module.configure(p)
            p.set_defaults(_run=module.run)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option, if known."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in SUBCOMMANDS else None


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
