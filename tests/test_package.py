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


def test_specs_split_on_top_level_commas_and_reject_repeats():
    import pytest

    from mtl_opt._spec import parse_spec

    assert parse_spec("came_grad:task_weights=[1,4],kappa=2") == (
        "came_grad", {"task_weights": [1, 4], "kappa": 2})
    assert parse_spec("zdt1") == ("zdt1", {})
    with pytest.raises(ValueError, match="given twice"):
        parse_spec("cagrad:c=1,c=2")
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("cagrad:c")
    with pytest.raises(ValueError, match="name"):
        parse_spec(":c=1")
