"""What the command line costs and prints: a light ``--help``, progress fit for log files."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtl_opt.cli import main


def _modules_after(code: str) -> list[str]:
    probe = (code + "; import sys; print(','.join(m for m in ('torch', 'pandas', 'plotly', 'ray') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    return [m for m in out.stdout.strip().split(",") if m]


def test_help_and_the_package_import_no_torch():
    assert _modules_after("import mtl_opt") == []
    code = ("import contextlib, io\nfrom mtl_opt.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass")
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_lazy_package_still_exposes_everything():
    import mtl_opt

    assert "came_grad" in mtl_opt.available_aggregators()
    assert mtl_opt.get_aggregator("cagrad").c == 0.4
    assert mtl_opt.methods.CAGrad is mtl_opt.aggregator_class("cagrad")
    assert set(mtl_opt.__all__) <= set(dir(mtl_opt))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mtl_opt.nope  # noqa: B018


def test_subcommand_help_still_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "--start-jitter" in capsys.readouterr().out


def test_progress_off_a_terminal_is_one_line_per_problem(tmp_path, capsys):
    argv = ["compare", "--problems", "toy", "zdt1", "--methods", "ls", "--steps", "40"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if "steps in" in line]
    assert [line.split(":")[0] for line in lines] == ["toy", "zdt1"]
    assert main([*argv, "--progress", "--out", str(tmp_path / "b")]) == 0
    assert "\r" in capsys.readouterr().err
