"""The shared arguments (``--methods``, ``--seeds``, ``--out``) are written once and parse
identically in every subcommand; the subcommands are discovered; one table writer, one
environment stamp."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtl_opt.cli import build_parser, discover_subcommands, main
from mtl_opt.experiments.shared_args import claim_out, parse_methods, parse_seeds

SHARED = {"--seeds": "seeds", "--methods": "methods", "--out": "out", "--workload": "workload"}
#: ``rrg eval --out`` also takes a .json file for the metrics alone (documented in the README);
#: ``train`` and ``compare`` take ``--workload`` as their own (a default workload; a mode switch).
NOT_SHARED = {("rrg", "eval", "--out"), ("train", "--workload"), ("compare", "--workload")}


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (sub)command parser that takes options of its own, with its command path."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, (*path, name))


LEAVES = dict(_leaves(build_parser()))


def _with(path: tuple[str, ...], option: str) -> list[tuple[str, ...]]:
    return sorted(p for p, leaf in LEAVES.items()
                  if option in leaf._option_string_actions and (*p, option) not in NOT_SHARED)


def test_every_command_that_has_a_shared_option_has_the_shared_one():
    for path, leaf in LEAVES.items():
        for option, name in SHARED.items():
            action = leaf._option_string_actions.get(option)
            if action is None or (*path, option) in NOT_SHARED:
                continue
            assert getattr(action, "shared_argument", None) == name, (path, option)
    # the commands this issue names take them
    assert {("compare",), ("ablate",), ("sweep",), ("rrg", "compare")} <= set(_with((), "--seeds"))
    assert {("compare",), ("bench",), ("rrg", "compare")} <= set(_with((), "--methods"))
    assert {("compare",), ("ablate",), ("sweep",), ("bench",), ("train",), ("eval",), ("rrg", "train"),
            ("rrg", "compare")} <= set(_with((), "--out"))
    assert {("ablate",), ("sweep",)} <= set(_with((), "--workload"))


def _parse(path: tuple[str, ...], extra: list[str]) -> argparse.Namespace:
    leaf = LEAVES[path]
    required = ["--methods", "ls"] if leaf._option_string_actions.get("--methods") is not None \
        and leaf._option_string_actions["--methods"].required and "--methods" not in extra else []
    positional = ["RUN" for a in leaf._actions if not a.option_strings and a.nargs is None
                  and not isinstance(a, argparse._SubParsersAction)]
    return leaf.parse_args([*positional, *extra, *required])


@pytest.mark.parametrize("path", _with((), "--seeds"), ids=" ".join)
def test_seeds_parse_identically(path):
    for text, seeds in (("3x", (0, 1, 2)), ("0,4,7", (0, 4, 7)), ("5", (5,)), (" 2 , 9 ", (2, 9))):
        assert parse_seeds(_parse(path, ["--seeds", text]).seeds) == seeds
    for bad in ("a,b", "0x", "1,1", ""):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(_parse(path, ["--seeds", bad]).seeds)


@pytest.mark.parametrize("path", _with((), "--methods"), ids=" ".join)
def test_methods_parse_identically(path):
    # the two spellings of before (spaces in compare, commas in rrg compare), and both mixed
    for argv in (["ls", "came_grad:kappa=2,nu=0.1", "mgda"], ["ls,came_grad:kappa=2,nu=0.1,mgda"],
                 ["ls,came_grad:kappa=2,nu=0.1", "mgda"]):
        assert parse_methods(_parse(path, ["--methods", *argv]).methods) == \
            ["ls", "came_grad:kappa=2,nu=0.1", "mgda"]
    assert parse_methods(_parse(path, ["--methods", "came_grad:task_weights=[1,4],kappa=2,ls"]).methods) == \
        ["came_grad:task_weights=[1,4],kappa=2", "ls"]
    for argv, message in ((["ls,ls"], "listed twice"), (["ls", "ls"], "listed twice"),
                          (["ls,,mgda"], "empty method spec"), (["ls,c=1"], "continues no method spec")):
        with pytest.raises(ValueError, match=message):
            parse_methods(_parse(path, ["--methods", *argv]).methods)


@pytest.mark.parametrize("path", _with((), "--out"), ids=" ".join)
def test_out_is_one_policy(path, tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    args = _parse(path, ["--out", str(used)])
    with pytest.raises(ValueError, match="exists and is not empty"):
        claim_out(args.out, prefix="x", command=" ".join(path))
    fresh = _parse(path, ["--out", str(tmp_path / "fresh")])
    with claim_out(fresh.out, prefix="x", command=" ".join(path)) as folder:
        assert folder.path == tmp_path / "fresh"
        with pytest.raises(ValueError, match="holds another run's outputs|in use"):
            claim_out(fresh.out, prefix="x", command="second")


def test_bad_seeds_and_methods_are_one_line_in_every_command(tmp_path, capsys):
    for argv in (["compare", "--seeds", "1,1"], ["ablate", "--seeds", "a"],
                 ["rrg", "compare", "--methods", "ls", "--seeds", "0,x"],
                 ["compare", "--methods", "ls,ls"], ["bench", "--methods", "ls,ls"],
                 ["rrg", "compare", "--methods", "ls", "ls"]):
        out = tmp_path / "_".join(argv).replace(",", "-")
        assert main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("--seeds" in err[0] or "--methods" in err[0]), (argv, err)
        assert not out.exists()


def test_subcommands_are_discovered_from_their_declarations():
    found = discover_subcommands()
    assert {"methods", "compare", "ablate", "sweep", "bench", "rrg", "train", "eval"} <= set(found)
    for name, command in found.items():
        module = __import__(command.module, fromlist=["run"])
        assert module.COMMAND == name and module.COMMAND_HELP == command.help
        assert callable(module.configure) and callable(module.run)
    # the core CLI names no study
    core = (Path(__file__).resolve().parents[1] / "mtl_opt" / "cli.py").read_text(encoding="utf-8")
    for module in ("compare_cli", "ablate_study", "sweep_study", "bench", "rrg_cli", "methods_cli",
                   "train_cli", "eval_cli"):
        assert module not in core


def test_help_lists_every_subcommand_without_importing_torch():
    code = ("import contextlib, io, sys\nfrom mtl_opt.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    try:\n        main(['--help'])\n"
            "    except SystemExit:\n        pass\nprint('torch' in sys.modules)\nprint(buf.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    first, *rest = out.stdout.splitlines()
    assert first == "False"
    for name in discover_subcommands():
        assert any(line.strip().startswith(name) for line in rest), name


def test_one_table_writer():
    import pandas as pd

    from mtl_opt.experiments.markdown_table import to_markdown

    df = pd.DataFrame({"a": [1.23456, float("nan")], "b": ["x|y", "line\nbreak"]})
    expected = "| a | b |\n| --- | --- |\n| 1.235 | x\\|y |\n|  | line break |"
    assert to_markdown(df) == expected
    assert to_markdown([{"a": 1.23456, "b": "x|y"}, {"a": None, "b": "line\nbreak"}]) == expected
    assert to_markdown([[1.23456, "x|y"], [None, "line\nbreak"]], columns=["a", "b"]) == expected
    assert to_markdown([[1, 2]], columns=["a", "b"], align=[None, "right"]).splitlines()[1] == "| --- | ---: |"
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        to_markdown([[1, 2]], columns=["a", "b", "c"])


def test_one_environment_stamp_in_every_study_config(tmp_path):
    import torch

    from mtl_opt.experiments.environment import environment_stamp

    stamp = environment_stamp()
    assert stamp["torch"] == torch.__version__ and stamp["mtl_opt"] and stamp["python"]
    assert main(["compare", "--problems", "toy", "--methods", "ls", "--steps", "2", "--quiet",
                 "--no-figures", "--out", str(tmp_path / "c")]) == 0
    assert main(["ablate", "--steps", "2", "--seeds", "2x", "--variants", "linear,full",
                 "--out", str(tmp_path / "a")]) == 0
    for folder in ("c", "a"):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert set(config["environment"]) == set(stamp), folder


@pytest.mark.parametrize("path", _with((), "--workload"), ids=" ".join)
def test_workload_parses_identically(path):
    from mtl_opt.experiments.shared_args import study_target
    from mtl_opt.experiments.workloads import TrainedWorkload

    target = study_target(_parse(path, ["--workload", "rrg:n_train=8"]))
    assert isinstance(target, TrainedWorkload) and target.spec == "rrg:n_train=8"
    assert study_target(_parse(path, ["--problem", "zdt1"])) == "zdt1"
    with pytest.raises(ValueError, match="not both"):
        study_target(_parse(path, ["--problem", "zdt1", "--workload", "rrg"]))


def test_another_package_adds_a_subcommand_through_an_entry_point(tmp_path):
    """A distribution on the path whose entry points name a module in the ``mtl_opt.commands``
    group adds that module's subcommand (listed by ``--help``, run by name)."""
    (tmp_path / "hello_command.py").write_text(
        'COMMAND = "hello"\nCOMMAND_HELP = "say hello from another package"\n\n'
        "def configure(parser):\n    parser.add_argument('--name', default='world')\n\n"
        "def run(args):\n    print(f'hello {args.name}')\n    return 0\n")
    info = tmp_path / "hello_command-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hello-command\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mtl_opt.commands]\nhello = hello_command\n")
    code = ("import sys; from mtl_opt.cli import main, discover_subcommands; "
            "print(discover_subcommands()['hello'].help); sys.exit(main(['hello', '--name', 'there']))")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["say hello from another package", "hello there"]
    (info / "entry_points.txt").write_text("[mtl_opt.commands]\nhello = no_such_module\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode != 0 and "no_such_module" in out.stderr and "names no module" in out.stderr
    # a library subcommand reads no entry point: another package's broken one does not stop it
    library = "import sys; from mtl_opt.cli import main; sys.exit(main(['methods', '--format', 'properties']))"
    out = subprocess.run([sys.executable, "-c", library], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0 and "| `ls` |" in out.stdout, out.stderr
