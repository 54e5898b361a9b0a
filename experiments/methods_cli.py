"""``mtl-opt methods``: every registered method with its kind, state, properties and defaults."""

from __future__ import annotations

import argparse

COMMAND = "methods"
COMMAND_HELP = "list every registered method with its hyperparameters and defaults"

KIND_LABELS = {"gramian": "Gramian weighting", "loss": "loss weighting", "general": "general"}
PROPERTY_LABELS = {
    "non_conflicting": "non-conflicting", "permutation_invariant": "permutation invariant",
    "linear_under_scaling": "linear under scaling",
    "stationary_at_pareto_stationary": "stationary at Pareto-stationary points",
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mtl-opt methods``."""
    parser.add_argument("--format", choices=["table", "markdown", "properties"], default="table",
                        help="plain table (default), a Markdown table, or the Markdown table of "
                        "each method's kind, state and properties that the README shows")


def properties_table() -> list[str]:
    """The Markdown table of every method's declared kind, state and properties (the README's
    table under "Methods"; tests/test_method_properties.py checks both)."""
    import mtl_opt
    from mtl_opt.aggregator import PROPERTIES
    from mtl_opt.experiments.markdown_table import to_markdown

    rows = [[f"`{info.name}`", KIND_LABELS[info.cls.kind], info.cls.state,
             *("yes" if p in info.cls.properties else "" for p in PROPERTIES)]
            for info in mtl_opt.describe_aggregators()]
    columns = ["name", "kind", "state", *(PROPERTY_LABELS[p] for p in PROPERTIES)]
    return to_markdown(rows, columns=columns).splitlines()


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
        from mtl_opt.experiments.markdown_table import to_markdown

        print(to_markdown([[f"`{c}`" if i < 2 else c for i, c in enumerate(row)] for row in rows],
                          columns=header))
        return 0
    n = len(header) - 1
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(n)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:n], widths)) + "  " + row[n])
    return 0
