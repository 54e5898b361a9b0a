"""RRG checkpoints: loaded without running code (weights_only), damaged files and resumes with
conflicting options refused in one line naming the file or the options, and every command's
options checked before anything is written (tiny model, 32-px synthetic images)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from mtl_opt.cli import main
from mtl_opt.problems.rrg.train import RRGConfig, load_run, train_rrg

TINY = dict(n_train=8, n_val=4, n_test=4, batch_size=4, meteor=False, lr=3e-3, eval_max_samples=4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished two-step run (PCGrad: its aggregator has state) with its checkpoint."""
    out = tmp_path_factory.mktemp("rrg") / "run"
    train_rrg(RRGConfig(method="pcgrad", steps=2, eval_every=0, out=str(out), **TINY))
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_checkpoints_hold_only_tensors_and_plain_data(run_dir):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    rng = ckpt["rng"]["numpy"]
    assert rng["bit_generator"] == "MT19937" and rng["key"].shape == (624,)
    assert isinstance(ckpt["config"], dict) and ckpt["config"]["method"] == "pcgrad"


# -- defect: loading a checkpoint ran code from it ------------------------------------------------


class _Payload:
    """Pickles as a call that creates ``marker``: what a crafted checkpoint would run on load."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "exec":
            return exec, (f"open({self.marker!r}, 'w').close()",)
        return os.system, (f"touch {self.marker}",)


def _malicious(run_dir: Path, tmp_path: Path, how: str) -> tuple[Path, Path]:
    """A copy of a real run whose checkpoint's config holds the payload (deep inside)."""
    folder = _copy(run_dir, tmp_path)
    marker = tmp_path / "payload-ran"
    # The fixture's own file (trusted); a full load also reads checkpoints of any earlier format.
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=False)
    ckpt["config"]["synthetic"] = {"undercall": _Payload(marker, how)}
    torch.save(ckpt, folder / "checkpoint.pt")
    return folder, marker


@pytest.mark.parametrize("how", ["exec", "os.system"])
@pytest.mark.parametrize("entry", ["rrg eval", "rrg train --resume", "load_run", "train_rrg(resume=)"])
def test_a_malicious_checkpoint_runs_nothing_and_is_refused_naming_the_file(entry, how, run_dir, tmp_path,
                                                                           capsys):
    folder, marker = _malicious(run_dir, tmp_path, how)
    path = folder / "checkpoint.pt"
    # The crafted file is live: an unrestricted load runs the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    before = sorted(p.name for p in folder.iterdir())
    refused = rf"checkpoint {re.escape(str(path))} refused: it asks to import (exec|posix\.system);"
    if entry.startswith("rrg"):
        argv = (["rrg", "eval", str(folder), "--device", "cpu", "--no-meteor"] if entry == "rrg eval"
                else ["rrg", "train", "--resume", str(folder), "--device", "cpu", "--quiet"])
        rc = main(argv)
        assert not marker.exists(), "the checkpoint's payload ran"
        assert rc == 2 and re.search(refused, _one_line_error(capsys))
    else:
        try:
            load_run(folder) if entry == "load_run" else train_rrg(resume=folder)
        except Exception as exc:  # noqa: BLE001 - asserted below, after the marker
            raised: Exception | None = exc
        else:
            raised = None
        assert not marker.exists(), "the checkpoint's payload ran"
        assert isinstance(raised, ValueError) and re.search(refused, str(raised)), raised
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written either


# -- defect: damaged checkpoints gave raw pickle / zip tracebacks --------------------------------


def _damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"these are not the bytes of a checkpoint\n" * 4)
    elif kind == "text":
        path.write_text('{"format": "mtl_opt.rrg/1"}')
    elif kind == "a tensor":
        torch.save(torch.ones(3), path)
    else:
        ckpt = torch.load(path, weights_only=False)  # the fixture's own file (trusted)
        if kind == "no model":
            del ckpt["model"]
        else:  # "wrong weights": a tensor of another shape
            name = next(iter(ckpt["model"]))
            ckpt["model"][name] = torch.zeros(1)
        torch.save(ckpt, path)


@pytest.mark.parametrize("entry", ["rrg eval", "rrg train --resume", "load_run"])
@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "text", "a tensor", "no model",
                                  "wrong weights"])
def test_a_damaged_checkpoint_gives_one_line_naming_the_file(kind, entry, run_dir, tmp_path, capsys):
    folder = _copy(run_dir, tmp_path)
    path = folder / "checkpoint.pt"
    _damage(path, kind)
    named = re.escape(str(path))
    if entry == "load_run":
        with pytest.raises(ValueError, match=named):
            load_run(path)
        return
    argv = (["rrg", "eval", str(path), "--device", "cpu", "--no-meteor"] if entry == "rrg eval"
            else ["rrg", "train", "--resume", str(path), "--device", "cpu", "--quiet"])
    assert main(argv) == 2
    assert re.search(named, _one_line_error(capsys))


# -- defect: `rrg train --resume` ignored options that differ from the run's ---------------------


def test_resume_refuses_options_that_differ_from_the_run_naming_both_values(run_dir, tmp_path, capsys):
    folder = _copy(run_dir, tmp_path)
    ckpt_bytes = (folder / "checkpoint.pt").read_bytes()
    argv = ["rrg", "train", "--resume", str(folder), "--device", "cpu", "--quiet"]
    assert main([*argv, "--steps", "5", "--method", "ls", "--size", "tiny", "--no-meteor",
                 "--batch-size", "4"]) == 2
    err = _one_line_error(capsys)
    assert "2 given option(s) differ" in err
    assert "--steps gives steps=5, the run has steps=2" in err
    assert "--method gives method='ls', the run has method='pcgrad'" in err
    assert "--size" not in err and "--batch-size" not in err  # given, but equal to the run's
    # A value equal to the option's default is still given (the run has batch size 4).
    assert main([*argv, "--batch-size", "16"]) == 2
    assert "--batch-size gives batch_size=16, the run has batch_size=4" in _one_line_error(capsys)
    assert main([*argv, "--out", str(tmp_path / "elsewhere")]) == 2
    assert "the run's folder is" in _one_line_error(capsys)
    assert (folder / "checkpoint.pt").read_bytes() == ckpt_bytes
    # Options equal to the run's, --device and --quiet are fine: the finished run re-evaluates.
    assert main([*argv, "--steps", "2", "--method", "pcgrad", "--out", str(folder), "--no-meteor"]) == 0
    assert capsys.readouterr().out.strip() == str(folder)


def test_resume_through_python_names_each_differing_field_and_both_values(run_dir):
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in method: given 'ls', saved "
                                         r"'pcgrad'; steps: given 5, saved 2$"):
        train_rrg(RRGConfig(method="ls", steps=5, eval_every=0, **TINY), resume=run_dir)


# -- defect: bad options left files behind -------------------------------------------------------

#: Small runs, so that a command that wrongly starts work ends soon.
SMALL = ["--steps", "1", "--n-train", "4", "--n-val", "2", "--n-test", "2", "--batch-size", "2",
         "--no-meteor", "--eval-max-samples", "2", "--device", "cpu"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "ls", "--seeds", "-1"], r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    (["--methods", "ls,pcgrad", "--seeds", "0,4294967296"], "seed must be an integer"),
    (["--methods", "ls", "--num-workers", "-1"], "num_workers must be >= 0"),
])
def test_compare_refuses_bad_options_before_writing_anything(argv, message, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["rrg", "compare", *argv, *SMALL, "--out", str(out)]) == 2
    assert re.search(message, _one_line_error(capsys))
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-3"], "seed must be an integer"),
    (["--max-gen-length", "0"], "max_gen_length must be >= 1"),
    (["--samples", "-1"], "n_report_samples must be >= 0"),
])
def test_train_refuses_bad_options_before_writing_anything(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["rrg", "train", *SMALL, *argv, "--out", str(out)]) == 2
    assert message in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--beam-size", "0"], "beam_size must be >= 1"),
    (["--eval-max-samples", "0"], "eval_max_samples must be >= 1"),
    (["--samples", "-2"], "n_report_samples must be >= 0"),
])
def test_eval_refuses_bad_options_before_writing_anything(argv, message, run_dir, tmp_path, capsys):
    folder = _copy(run_dir, tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    assert main(["rrg", "eval", str(folder), "--device", "cpu", "--no-meteor", *argv]) == 2
    assert message in _one_line_error(capsys)
    assert sorted(p.name for p in folder.iterdir()) == before
