"""RRG as a training workload of the one trainer: the same training as ``mtl-opt rrg train``, bit
for bit; the same evaluation; options checked at the boundary."""

from __future__ import annotations

import pytest
import torch

from mtl_opt.experiments.trainer import TrainConfig, evaluate_split, prepare, train_steps
from mtl_opt.problems.rrg.train import RRGConfig, evaluate_rrg, prepare_run
from mtl_opt.problems.rrg.train import train_steps as rrg_train_steps
from mtl_opt.problems.workload import available_training_workloads, get_training_workload

DATA = dict(n_train=32, n_val=8, n_test=8)
SPEC = "rrg:n_train=32,n_val=8,n_test=8"


@pytest.mark.parametrize("method", ["came_grad", "ls", "pcgrad"])
def test_the_trainer_trains_rrg_as_rrg_train_did_bit_for_bit(method):
    old = prepare_run(RRGConfig(method=method, seed=3, steps=5, meteor=False, **DATA))
    rrg_train_steps(old, 5)
    new = prepare(TrainConfig(workload=SPEC, method=method, seed=3, steps=5))
    assert new.task_weights == [1.0, 4.0] and new.lr == old.cfg.resolved_lr() and new.batch_size == 16
    train_steps(new, 5)
    a, b = old.model.state_dict(), new.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_evaluate_is_rrg_eval():
    run = prepare(TrainConfig(workload=SPEC, method="ls", seed=0, steps=2))
    train_steps(run, 2)
    new = evaluate_split(run, "test")
    cfg = RRGConfig(**DATA, meteor=False)
    old = evaluate_rrg(run.model, run.model.report_tokenizer, run.data.test, cfg)["metrics"]
    for key in ("BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr", "CE_f1_example", "CE_f1_macro_pos_or_unc",
                "cls_accuracy", "cls_f1_positive", "eval_loss_report", "eval_loss_classification"):
        assert new[key] == pytest.approx(old[key], rel=1e-6, abs=1e-9), key
    assert {m.name for m in run.workload.metrics} <= set(new)


def test_eval_max_samples_scores_that_many_studies():
    run = prepare(TrainConfig(workload=SPEC + ",eval_max_samples=5", method="ls", seed=0, steps=1,
                              eval_batch_size=4))
    cfg = RRGConfig(**DATA, meteor=False, eval_max_samples=5)
    old = evaluate_rrg(run.model, run.model.report_tokenizer, run.data.test, cfg)["metrics"]
    assert evaluate_split(run, "test")["cls_accuracy"] == pytest.approx(old["cls_accuracy"])


def test_rrg_is_registered_with_its_tasks_metrics_and_weights():
    assert "rrg" in available_training_workloads()
    w = get_training_workload("rrg", contrastive=True, model_size="small")
    assert w.task_names == ("report", "classification", "contrastive")
    assert w.resolved_task_weights() == [1.0, 4.0, 1.0]
    assert w.metric("eval_loss_contrastive").higher_is_better is False
    assert w.metric("BLEU_4").higher_is_better is True
    assert w.defaults.steps == 200 and w.defaults.lr == 1e-3 and w.defaults.optimizer == "adamw"
    assert w.spec() == "rrg:contrastive=True,model_size='small'"


@pytest.mark.parametrize("options, message", [
    ({"n_train": -1}, "n_train must be >= 1"),
    ({"model_size": "huge"}, "unknown model size"),
    ({"data": "/no/such/folder"}, "/no/such/folder"),
    ({"synthetic": {"nope": 1}}, "unknown synthetic data option"),
    ({"steps": 3}, "unknown option"),
])
def test_bad_options_name_the_problem(options, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        get_training_workload("rrg", **options)


def test_a_trainer_run_writes_the_generated_reports_and_the_tokenizer(tmp_path):
    import csv
    import json

    from mtl_opt.experiments.trainer import TrainConfig, load_run_checkpoint, train
    from mtl_opt.problems.rrg.tokenizer import ReportTokenizer

    out = tmp_path / "run"
    result = train(TrainConfig(workload=SPEC, method="ls", steps=1, out=str(out)))
    assert {"samples.csv", "samples.md"} <= set(json.loads((out / "result.json").read_text())["test_outputs"])
    with (out / "samples.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == DATA["n_test"] and all(r["reference"] for r in rows)
    state = load_run_checkpoint(out / "checkpoint.pt")["workload_state"]["tokenizer"]
    run = prepare(TrainConfig(workload=SPEC, method="ls", steps=1))
    assert ReportTokenizer.from_state_dict(state).state_dict() == run.model.report_tokenizer.state_dict()
    assert result["test"]["cls_accuracy"] >= 0
