"""A pandas table as a GitHub-flavoured Markdown table (no extra dependency)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["to_markdown"]


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.{digits}g}"
    text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Any, *, digits: int = 4) -> str:
    """Header, separator and one line per row; floats to ``digits`` significant digits."""
    columns = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, digits) for v in row) + " |")
    return "\n".join(lines)
