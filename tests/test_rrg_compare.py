"""RRG training features and the comparison command: every method's step, resumable checkpoints,
per-epoch validation, the per-step conflict share, `rrg eval CKPT` and `rrg compare` end to end
(tiny model, 32-px synthetic images, one CPU core)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import mtl_opt
from mtl_opt.cli import main
from mtl_opt.problems.rrg.train import RRGConfig, prepare_run, train_rrg, train_steps

TINY = dict(n_train=16, n_val=8, n_test=8, batch_size=4, meteor=False, lr=3e-3)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", mtl_opt.available_aggregators())
def test_one_training_step_of_every_registered_method(method):
    setup = prepare_run(RRGConfig(method=method, **TINY))
    before = [p.detach().clone() for p in setup.model.shared_parameters()]
    rows = train_steps(setup, 1)
    assert len(rows) == 1 and rows[0]["step"] == 1
    for name in setup.model.task_names:
        assert math.isfinite(rows[0][f"loss_{name}"])
    assert -1.0 <= rows[0]["drift_cos"] <= 1.0
    assert rows[0]["conflict_share"] == float(rows[0]["drift_cos"] < 0)
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(setup.model.shared_parameters(), before))
    assert moved > 0, "the shared encoder did not move"
    assert setup.state.step == 1 and setup.state.batch_in_epoch == 1


class _Stop(Exception):
    pass


def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, capsys):
    """PCGrad (its own random generator), checkpoints every 3 steps in 4-step epochs, so the
    interruption falls mid-epoch; resumed through the command line."""
    kw = dict(method="pcgrad", steps=7, eval_every=3, log_every=2, **TINY)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    train_rrg(RRGConfig(out=str(a_dir), **kw))

    def stop_at_6(step, row):
        # Logged steps are 1, 2, 4, 6, 7; step 6 is logged before its checkpoint is written, so
        # the run stops with the checkpoint of step 3 and logged rows beyond it.
        if step == 6:
            raise _Stop

    with pytest.raises(_Stop):
        train_rrg(RRGConfig(out=str(b_dir), **kw), callback=stop_at_6)
    assert [r["step"] for r in _rows(b_dir / "metrics.csv")] == ["1", "2", "4", "6"]
    saved = torch.load(b_dir / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 3 and saved["train_state"]["batch_in_epoch"] == 3
    assert main(["rrg", "train", "--resume", str(b_dir), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(b_dir)

    ca = torch.load(a_dir / "checkpoint.pt", weights_only=True)
    cb = torch.load(b_dir / "checkpoint.pt", weights_only=True)
    assert cb["step"] == ca["step"] == 7
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    opt_a, opt_b = ca["optimizer"]["optimizer"]["state"], cb["optimizer"]["optimizer"]["state"]
    for i in opt_a:
        assert torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"])
    assert torch.equal(ca["optimizer"]["aggregator"]["generator_state"],
                       cb["optimizer"]["aggregator"]["generator_state"])
    # The logs of the resumed run are those of the uninterrupted one (rows after the checkpoint
    # that the interrupted run had written are replaced, not duplicated).
    for name, skip in (("metrics.csv", "time_s"), ("epochs.csv", "val_time_s")):
        ra, rb = _rows(a_dir / name), _rows(b_dir / name)
        assert [r["step"] for r in ra] == [r["step"] for r in rb]
        for x, y in zip(ra, rb):
            assert {k: v for k, v in x.items() if k != skip} == {k: v for k, v in y.items() if k != skip}
    ea = json.loads((a_dir / "eval.json").read_text())["metrics"]
    eb = json.loads((b_dir / "eval.json").read_text())["metrics"]
    assert ea == eb


def test_validation_every_epoch_and_the_running_conflict_share(tmp_path):
    out = tmp_path / "run"
    result = train_rrg(RRGConfig(method="came_grad", epochs=2, log_every=1, out=str(out), **TINY))
    epochs = _rows(out / "epochs.csv")
    assert [int(r["step"]) for r in epochs] == [4, 8]  # 16 studies in batches of 4
    assert [float(r["epoch"]) for r in epochs] == [1.0, 2.0]
    for key in ("train_loss_report", "train_loss_classification", "train_conflict_share",
                "val_loss_report", "val_BLEU_4", "val_CE_f1_example", "val_cls_accuracy"):
        assert key in epochs[0] and math.isfinite(float(epochs[0][key])), key
    # Logged at every step, the running share is the share of rows so far with a negative cosine
    # (the cosine and the sign come from the same per-step Gramian).
    steps = _rows(out / "metrics.csv")
    negatives = 0
    for i, r in enumerate(steps, start=1):
        negatives += float(r["drift_cos"]) < 0
        assert float(r["conflict_share"]) == pytest.approx(negatives / i)
    assert float(epochs[-1]["conflict_share_running"]) == pytest.approx(negatives / len(steps))
    assert result["eval"]["conflict_share"] == pytest.approx(negatives / len(steps))
    # The test report, with CE against the generator's true labels (synthetic data).
    ev = json.loads((out / "eval.json").read_text())["metrics"]
    for key in ("CE_f1_example", "CE_f1_macro_pos_or_unc", "CEtrue_f1_example", "CEtrue_f1_macro_pos_or_unc"):
        assert 0.0 <= ev[key] <= 1.0, key
    assert len(_rows(out / "samples.csv")) == 8


def test_eval_takes_the_checkpoint_positionally_and_writes_samples(tmp_path, capsys):
    run = tmp_path / "run"
    train_rrg(RRGConfig(method="ls", steps=2, out=str(run), **TINY))
    saved = json.loads((run / "eval.json").read_text())["metrics"]
    capsys.readouterr()
    assert main(["rrg", "eval", str(run / "checkpoint.pt"), "--no-meteor", "--device", "cpu",
                 "--json"]) == 0  # the full JSON on stdout (without --json: a summary line)
    printed = json.loads(capsys.readouterr().out)["metrics"]
    assert printed == pytest.approx(saved)
    samples = _rows(run / "samples-test.csv")
    assert len(samples) == 8 and set(samples[0]) == {"id", "reference", "generated"}
    assert samples[0]["reference"].strip()
    assert json.loads((run / "eval-test.json").read_text())["metrics"] == printed
    other = tmp_path / "elsewhere"
    assert main(["rrg", "eval", "--checkpoint", str(run), "--no-meteor", "--split", "val",
                 "--out", str(other)]) == 0
    assert (other / "eval-val.json").is_file() and len(_rows(other / "samples-val.csv")) == 8
    assert main(["rrg", "eval", str(run), "--checkpoint", str(tmp_path / "x"), "--no-meteor"]) == 2
    assert "two checkpoints" in capsys.readouterr().err


def test_compare_end_to_end_without_java(tmp_path, monkeypatch, capsys):
    """Two methods, two seeds, METEOR on but no Java on PATH: reported as unavailable."""
    empty = tmp_path / "no-java-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    out = tmp_path / "cmp"
    code = main(["rrg", "compare", "--methods", "ls,came_grad:kappa=1.5,nu=0.2", "--seeds", "0,1",
                 "--size", "tiny", "--steps", "3", "--n-train", "16", "--n-val", "4", "--n-test", "8",
                 "--batch-size", "8", "--eval-every", "0", "--out", str(out), "--quiet",
                 "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("config.json", "table.csv", "table.md", "runs.csv"):
        assert (out / name).is_file(), name
    for spec in ("ls", "came_grad_kappa=1.5_nu=0.2"):
        for seed in (0, 1):
            assert (out / "runs" / f"{spec}-seed{seed}" / "checkpoint.pt").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["methods"] == ["ls", "came_grad:kappa=1.5,nu=0.2"] and config["seeds"] == [0, 1]
    assert config["gain_over"] == "ls"
    table = _rows(out / "table.csv")
    assert [r["method"] for r in table] == ["ls", "came_grad:kappa=1.5,nu=0.2",
                                            "baseline: majority class",
                                            "baseline: copy most common report"]
    for key in ("BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr", "CE_pm_P", "CE_pm_R", "CE_pm_F1",
                "CE_cg_F1", "gain_CE_pm_F1", "gain_CE_cg_F1", "true_CE_pm_F1", "conflict_share",
                "BLEU_4_std"):
        assert key in table[0], key
    ls, came, majority, copy = table
    assert float(ls["gain_CE_pm_F1"]) == 0.0 and float(ls["gain_CE_cg_F1"]) == 0.0
    assert majority["BLEU_4"] == "" and majority["CE_pm_F1"] != ""
    assert 0.0 <= float(majority["cls_accuracy"]) <= 1.0 and majority["cls_F1"] != ""
    assert 0.0 <= float(ls["cls_accuracy"]) <= 1.0
    assert 0.0 < float(copy["BLEU_1"]) <= 1.0
    runs = _rows(out / "runs.csv")
    assert len(runs) == 2 * 2 + 2 * 2
    md = (out / "table.md").read_text()
    assert md in printed + "\n" or md.strip() in printed
    assert "n/a (no Java)" in md and "PromptMRG (example, positive)" in md
    assert "CAME-Grad (macro, positive or uncertain)" in md


def test_majority_labels_pick_the_most_frequent_state():
    import numpy as np

    from mtl_opt.experiments.rrg_compare import _majority_labels

    nan = float("nan")
    labels = np.array([[1, nan, -1], [1, 0, -1], [0, nan, 1]], dtype=float)
    out = _majority_labels(np.pad(labels, ((0, 0), (0, 11)), constant_values=nan))
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == -1.0 and np.isnan(out[3:]).all()


def test_majority_classifier_by_hand():
    import numpy as np

    from mtl_opt.experiments.rrg_compare import _majority_classifier

    nan = float("nan")
    pad = lambda a: np.pad(np.asarray(a, dtype=float), ((0, 0), (0, 12)), constant_values=nan)
    # Observation 0 is mostly positive in training, observation 1 mostly negative; the other 12
    # are blank everywhere (class 0), so the prediction is right on all their cells.
    train = pad([[1, 0], [1, 0], [0, 1]])
    test = pad([[1, 0], [0, 0], [1, -1], [nan, 0]])
    out = _majority_classifier(train, test)
    # Predicted positive on obs 0 for all 4 studies: tp 2, fp 2, fn 0 -> F1 = 4 / 6.
    assert out["cls_F1"] == pytest.approx(4 / 6)
    # Correct cells: obs 0 twice, obs 1 three times (negative), 4 x 12 blank ones, of 4 x 14.
    assert out["cls_accuracy"] == pytest.approx((2 + 3 + 48) / 56)


def test_method_specs_split_on_commas_between_methods_only():
    from mtl_opt.experiments.shared_args import parse_methods

    assert parse_methods(["ls,came_grad:kappa=2,nu=0.1,mgda"]) == ["ls", "came_grad:kappa=2,nu=0.1", "mgda"]
    assert parse_methods(["ls, pcgrad"]) == ["ls", "pcgrad"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "ls,ls"], "listed twice"),
    (["--methods", "ls,nope"], "unknown method"),
    (["--methods", "ls", "--seeds", "0,x"], "--seeds"),
])
def test_compare_rejects_bad_options_before_training(argv, message, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["rrg", "compare", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "runs").exists()


def test_resume_of_a_missing_run_fails_clearly(tmp_path, capsys):
    assert main(["rrg", "train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_package_exports_the_training_entry_points_lazily():
    import subprocess
    import sys

    code = ("import sys, mtl_opt.problems.rrg as r; "
            "light = 'mtl_opt.problems.rrg.train' not in sys.modules and "
            "'mtl_opt.problems.rrg.model' not in sys.modules; "
            "from mtl_opt.problems.rrg import RRGConfig, RRGModel, train_rrg; "
            "print(light, RRGConfig.__module__, RRGModel.__module__, train_rrg.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "mtl_opt.problems.rrg.train", "mtl_opt.problems.rrg.model",
                                  "train_rrg"]
