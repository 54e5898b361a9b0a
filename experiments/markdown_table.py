"""The one Markdown table writer: every table a command prints or writes goes through
:func:`to_markdown` (GitHub-flavoured pipe tables, no extra dependency, no pandas needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["markdown_cell", "to_markdown"]

_RULE = {None: "---", "left": ":---", "right": "---:", "center": ":---:"}


def markdown_cell(value: Any, digits: int = 4) -> str:
    """One cell: floats to ``digits`` significant digits, a missing value (``None``, NaN) blank,
    text with its pipes escaped and its line breaks turned into spaces."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}g}"
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy scalar
        return markdown_cell(value.item(), digits)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _columns_and_rows(table: Any, columns: Sequence[str] | None) -> tuple[list[str], list[Sequence[Any]]]:
    if hasattr(table, "itertuples") and hasattr(table, "columns"):  # a pandas DataFrame
        return [str(c) for c in table.columns], [tuple(r) for r in table.itertuples(index=False)]
    rows = list(table)
    if rows and isinstance(rows[0], Mapping):
        if columns is None:
            columns = []
            for row in rows:
                columns += [k for k in row if k not in columns]
        return [str(c) for c in columns], [[row.get(c) for c in columns] for row in rows]
    if columns is None:
        raise ValueError("to_markdown: rows that are not mappings need their column names")
    return [str(c) for c in columns], rows


def to_markdown(table: Any, *, columns: Sequence[str] | None = None, digits: int = 4,
                align: str | Sequence[str | None] | None = None) -> str:
    """``table`` as a Markdown table: a pandas DataFrame, a list of dicts (``columns``: which
    keys, in order; default every key in order of appearance), or a list of rows with their
    ``columns``. ``align``: ``"left"``, ``"right"``, ``"center"`` for every column, or one per
    column (``None``: unmarked). Header, separator and one line per row."""
    names, rows = _columns_and_rows(table, columns)
    aligns = list(align) if isinstance(align, (list, tuple)) else [align] * len(names)
    if len(aligns) != len(names):
        raise ValueError(f"to_markdown: {len(aligns)} alignments for {len(names)} columns")
    lines = ["| " + " | ".join(markdown_cell(n) for n in names) + " |",
             "| " + " | ".join(_RULE[a] for a in aligns) + " |"]
    for row in rows:
        if len(row) != len(names):
            raise ValueError(f"to_markdown: a row has {len(row)} cells for {len(names)} columns")
        lines.append("| " + " | ".join(markdown_cell(v, digits) for v in row) + " |")
    return "\n".join(lines)
