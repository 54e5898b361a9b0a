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
