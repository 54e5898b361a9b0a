"""Every command that writes a folder refuses a used folder, a file and an unwritable folder
with one line (exit 2) before any work, and never overwrites what is there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mtl_opt.cli import main


def _unwritable_folder(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "out"
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no folder is unwritable for root here")
    return Path("/sys/kernel/mtl-opt-out")  # sysfs: not even root creates folders there


COMMANDS = {
    "compare": ["compare", "--problems", "toy", "--methods", "ls", "--steps", "2", "--quiet", "--no-figures"],
    "ablate": ["ablate", "--steps", "2", "--seeds", "2x"],
    "sweep": ["sweep", "--space", "kappa=grid:1", "--steps", "2"],
    "bench": ["bench", "--methods", "ls", "--K", "2", "--d", "10", "--device", "cpu", "--repeats", "1",
              "--warmup", "0", "--no-torchjd", "--no-memory", "--no-many"],
    "rrg train": ["rrg", "train", "--steps", "1"],
    "train": ["train", "--workload", "multimnist:n_train=8,n_val=4,n_test=4", "--steps", "1", "--quiet"],
    "compare --workload": ["compare", "--workload", "multimnist:n_train=8,n_val=4,n_test=4", "--methods", "ls",
                           "--steps", "1", "--quiet", "--no-figures"],
    "rrg compare": ["rrg", "compare", "--methods", "ls", "--steps", "1"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_used_folder_a_file_and_an_unwritable_one(tmp_path, capsys, command):
    args = COMMANDS[command]
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("earlier results")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out, message in ((used, "exists and is not empty"), (a_file, "is a file"),
                         (_unwritable_folder(tmp_path), "cannot create output folder")):
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and str(out) in err[0], err
        assert "Traceback" not in err[0]
    assert sorted(os.listdir(used)) == ["keep.txt"] and used.joinpath("keep.txt").read_text() == "earlier results"
    assert a_file.read_text() == "not a folder"


def test_rrg_eval_refuses_to_overwrite_a_metrics_file(tmp_path, capsys):
    target = tmp_path / "eval.json"
    target.write_text("{}")
    run = tmp_path / "run"
    assert main(["rrg", "train", "--steps", "1", "--n-train", "8", "--n-val", "4", "--n-test", "4",
                 "--out", str(run), "--quiet", "--no-meteor", "--samples", "0"]) == 0
    capsys.readouterr()
    assert main(["rrg", "eval", str(run), "--out", str(target), "--no-meteor"]) == 2
    assert "exists" in capsys.readouterr().err
    assert target.read_text() == "{}"
