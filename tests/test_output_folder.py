"""One output-folder policy for every command: claimed atomically, never shared, never
overwritten; a file or an unwritable folder is refused with one line."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
from pathlib import Path

import pytest

from mtl_opt._output_folder import (
    CLAIM_FILE,
    OutputFolderError,
    claim_output_folder,
    default_folder_name,
    reclaim_output_folder,
)
from mtl_opt.cli import main


def _race_threads(target: Path, n: int = 8) -> tuple[list, list]:
    barrier = threading.Barrier(n)
    wins, refusals = [], []

    def claim() -> None:
        barrier.wait()
        try:
            wins.append(claim_output_folder(target, command="test"))
        except OutputFolderError as exc:
            refusals.append(str(exc))

    threads = [threading.Thread(target=claim) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins, refusals


@pytest.mark.parametrize("exists", [False, True])
def test_threads_racing_for_one_folder_exactly_one_wins(tmp_path, exists):
    for round_ in range(15):
        target = tmp_path / f"out{round_}"
        if exists:
            target.mkdir()  # an empty folder the user made: claimed through the claim file
        wins, refusals = _race_threads(target)
        assert len(wins) == 1 and len(refusals) == 7, (wins, refusals)
        assert all(str(target) in r for r in refusals)
        assert sorted(os.listdir(target)) == [CLAIM_FILE]
        for w in wins:
            w.release()


def _claim_in_process(target: str, barrier, results) -> None:
    barrier.wait()
    try:
        folder = claim_output_folder(target, command="test")
        results.put("won")
        folder.release()
    except OutputFolderError:
        results.put("refused")


def test_processes_racing_for_one_folder_exactly_one_wins(tmp_path):
    ctx = mp.get_context("fork")
    for round_ in range(3):
        target = str(tmp_path / f"out{round_}")
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_claim_in_process, args=(target, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes = sorted(results.get(timeout=10) for _ in procs)
        assert outcomes == ["refused"] * 3 + ["won"]


def test_non_empty_file_and_parent_file_are_refused(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "results.csv").write_text("x")
    with pytest.raises(OutputFolderError, match="exists and is not empty"):
        claim_output_folder(full, command="test")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        claim_output_folder(a_file, command="test")
    with pytest.raises(OutputFolderError, match="a parent of it is a file"):
        claim_output_folder(a_file / "sub", command="test")
    assert (full / "results.csv").read_text() == "x" and a_file.read_text() == "x"


def test_default_names_started_in_the_same_second_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = default_folder_name("sweep")
    folders = [claim_output_folder(name, command="test", unique=True) for _ in range(3)]
    paths = [f.path for f in folders]
    assert paths == [name, name.with_name(name.name + "-2"), name.with_name(name.name + "-3")]


def test_a_held_folder_cannot_be_resumed_twice_and_a_released_one_can(tmp_path):
    first = claim_output_folder(tmp_path / "run", command="test")
    with pytest.raises(OutputFolderError, match="in use by another run"):
        reclaim_output_folder(tmp_path / "run", command="resume")
    first.release()
    again = reclaim_output_folder(tmp_path / "run", command="resume")
    assert json.loads((tmp_path / "run" / CLAIM_FILE).read_text())["resumed"] is True
    again.release()


def test_an_abandoned_claim_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with claim_output_folder(tmp_path / "new", command="test"):
            raise RuntimeError("the run failed before writing")
    assert not (tmp_path / "new").exists()


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
