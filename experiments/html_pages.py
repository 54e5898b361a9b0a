"""HTML pages that open offline: one plotly bundle per output folder, shared on disk.

Every study page loads ``plotly.min.js`` from its own folder (``<script src="plotly.min.js">``,
no network URL, no ``crossorigin`` attribute, which would block the file under ``file://``). That
file is a hard link to the bundle of the installed plotly package, so a hundred output folders hold
one 4.8 MB copy on disk, and each folder still opens, zips and mails on its own. Where a hard link
is impossible (another file system, a read-only package), the bundle is copied.

Figures are written responsive: the plot fills the window's width (a layout width set by a figure
builder is dropped) and keeps its height.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["PLOTLY_JS", "ensure_plotly_js", "write_figure"]

PLOTLY_JS = "plotly.min.js"


def _bundle() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not path.is_file():  # pragma: no cover - a broken plotly install
        raise FileNotFoundError(f"plotly's bundle {path} is missing; reinstall plotly")
    return path


def ensure_plotly_js(folder: str | Path) -> Path:
    """``folder/plotly.min.js``: a hard link to the installed plotly bundle (else a copy)."""
    dest = Path(folder) / PLOTLY_JS
    source = _bundle()
    if dest.is_file() and dest.stat().st_size == source.stat().st_size:
        return dest
    tmp = dest.with_name(f".{PLOTLY_JS}.{os.getpid()}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, dest)  # atomic: a concurrent reader never sees half a file
    return dest


def write_figure(fig: Any, path: str | Path, *, height: int | None = None) -> Path:
    """Write ``fig`` as a full HTML page that loads plotly from its folder; returns the path."""
    path = Path(path)
    ensure_plotly_js(path.parent)
    fig.update_layout(width=None, autosize=True)
    if height is not None:
        fig.update_layout(height=height)
    fig.write_html(
        path, include_plotlyjs=PLOTLY_JS, full_html=True, default_width="100%",
        config={"responsive": True, "displaylogo": False},
    )
    return path
