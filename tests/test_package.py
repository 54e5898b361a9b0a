"""Packaging and import-weight checks."""

import subprocess
import sys

import mtl_opt


def test_core_import_is_light():
    code = (
        "import sys, mtl_opt; "
        "heavy = [m for m in ('ray', 'plotly', 'pandas') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == ""


def test_subpackages_import_from_any_directory(tmp_path):
    code = "import mtl_opt.methods, mtl_opt.problems, mtl_opt.experiments; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_cli_methods_lists_every_method(capsys):
    from mtl_opt.cli import main

    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
    for name in mtl_opt.available_aggregators():
        assert name in printed
