"""Every HTML page a study writes opens offline: plotly from a file beside it, no network URL.

This is the cheap check that runs everywhere; ``benchmarks/check_pages.py`` renders the same pages
in headless Chromium and checks that the plots drew."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("plotly")

from mtl_opt.cli import main
from mtl_opt.experiments import html_pages
from mtl_opt.experiments.sweep_study import _write_outputs

from test_sweep_figures import _trials

NETWORK = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


def assert_offline(folder: Path) -> list[Path]:
    pages = sorted(folder.glob("*.html"))
    assert pages, f"no page under {folder}"
    bundle = html_pages._bundle()
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not NETWORK.search(text), f"{page.name} references a network URL"
        assert "crossorigin" not in text, page.name
        if 'class="plotly-graph-div"' in text:
            scripts = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", text)
            assert scripts == ["plotly.min.js"], (page.name, scripts)
    local = folder / "plotly.min.js"
    assert local.stat().st_size == bundle.stat().st_size
    if local.stat().st_dev == bundle.stat().st_dev and os.access(bundle.parent, os.W_OK):
        assert os.path.samefile(local, bundle), "the bundle is hard-linked, not copied"
    return pages


def test_compare_pages_are_offline(tmp_path):
    assert main(["compare", "--problems", "toy", "dtlz2", "--methods", "ls", "mgda", "--steps", "20",
                 "--quiet", "--out", str(tmp_path / "c")]) == 0
    pages = assert_offline(tmp_path / "c")
    assert {p.name for p in pages} >= {"index.html", "trajectories_toy.html", "convergence.html"}


def test_ablate_pages_are_offline(tmp_path):
    assert main(["ablate", "--problem", "toy", "--steps", "20", "--seeds", "2x",
                 "--out", str(tmp_path / "a")]) == 0
    assert [p.name for p in assert_offline(tmp_path / "a")] == ["ablation.html"]


def test_bench_pages_are_offline(tmp_path):
    assert main(["bench", "--K", "2", "--d", "64", "--repeats", "2", "--warmup", "1", "--device", "cpu",
                 "--no-torchjd", "--out", str(tmp_path / "b")]) == 0
    assert {p.name for p in assert_offline(tmp_path / "b")} == {"ratio_to_floor.html", "time_ms.html"}


def test_sweep_pages_are_offline(tmp_path):
    trials = _trials()
    curves = pd.DataFrame({"trial_id": ["t0", "t0"], "step": [0, 10], "front_distance": [2.0, 1.0],
                           "kappa": [1.0, 1.0], "nu": [0.0, 0.0], "rho": [0.2, 0.2]})
    _write_outputs(tmp_path / "s", trials, curves, ["kappa", "nu", "rho"], "front_distance", "min",
                   None, False, "a hand-made table")
    pages = assert_offline(tmp_path / "s")
    assert {p.name for p in pages} >= {"heatmap.html", "heatmap_facets.html", "parallel.html"}


def test_figures_fill_the_width(tmp_path):
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1]))
    fig.update_layout(width=700, height=300)
    text = html_pages.write_figure(fig, tmp_path / "f.html").read_text()
    assert '"width":700' not in text.replace(" ", "") and "width:100%" in text.replace(" ", "")
    assert '"responsive":true' in text.replace(" ", "")
