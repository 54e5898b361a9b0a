"""The one trainer (mtl_opt.experiments.trainer) on the Multi-MNIST workload at tiny sizes:
every registered method takes a step, a resumed run ends bit for bit where an uninterrupted one
does, checkpoints load without running code, and bad options fail before any work."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("mlxtend")

import mtl_opt
from mtl_opt.experiments.trainer import (
    TrainConfig,
    load_run_checkpoint,
    prepare,
    train,
    train_steps,
)

TINY = "multimnist:n_train=96,n_val=32,n_test=32"


def _cfg(**kw) -> TrainConfig:
    base = dict(workload=TINY, method="ls", batch_size=32, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", mtl_opt.available_aggregators())
def test_every_registered_method_takes_a_finite_step_on_multimnist(method):
    run = prepare(_cfg(method=method, steps=2))
    before = _params(run.model)
    rows = train_steps(run, 2)
    after = _params(run.model)
    assert run.state.step == 2 and len(rows) == 2
    assert all(torch.isfinite(v).all() for v in after.values())
    encoder = [k for k in after if k.startswith("encoder.")]
    assert any(not torch.equal(before[k], after[k]) for k in encoder), "the shared encoder did not move"
    for row in rows:
        assert row["loss_left"] > 0 and row["loss_right"] > 0


def test_diffusion_is_one_for_linear_scalarization_and_the_cosine_matches_the_gradients():
    run = prepare(_cfg(method="ls", steps=3))
    rows = train_steps(run, 3)
    for row in rows:
        assert row["diffusion"] == pytest.approx(1.0, rel=1e-5)  # the update is Σ g_i itself
        assert -1 <= row["cos"] <= 1 and row["conflict"] == int(row["cos"] < 0)
    assert run.state.tally.n == 3


def test_a_single_task_run_trains_only_its_own_head():
    run = prepare(_cfg(task="right", steps=2))
    before = _params(run.model)
    train_steps(run, 2)
    after = _params(run.model)
    left = [k for k in after if k.startswith("heads.0.")]
    right = [k for k in after if k.startswith("heads.1.")]
    assert all(torch.equal(before[k], after[k]) for k in left)
    assert any(not torch.equal(before[k], after[k]) for k in right)
    assert run.task_names == ["right"] and run.state.tally.n == 0  # one task: no conflict figures


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in csv.DictReader(f)]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["pcgrad", "famo", "dwa", "nash_mtl", "came_grad"])
def test_a_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does(method, tmp_path):
    # 96 pairs in batches of 32: three steps per epoch; 8 steps cross two epoch ends, and the
    # interruption at step 5 falls after the checkpoint of step 4 (eval_every=2), mid-epoch.
    cfg = dict(method=method, steps=8, eval_every=2)
    whole = train(_cfg(out=str(tmp_path / "whole"), **cfg))

    def stop_at_5(step, row):
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        train(_cfg(out=str(tmp_path / "cut"), **cfg), callback=stop_at_5)
    assert load_run_checkpoint(tmp_path / "cut" / "checkpoint.pt")["train_state"]["step"] == 4
    resumed = train(resume=tmp_path / "cut")
    a = load_run_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = load_run_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed["test"] == whole["test"]
    assert resumed["conflict_share"] == whole["conflict_share"]
    # the logs of the resumed run are those of the uninterrupted one, times aside
    for name in ("steps.csv", "epochs.csv"):
        assert _rows(tmp_path / "whole" / name) == _rows(tmp_path / "cut" / name), name
    assert json.loads((tmp_path / "cut" / "result.json").read_text())["steps"] == 8


def test_the_run_folder_holds_config_logs_checkpoint_and_result(tmp_path):
    out = tmp_path / "run"
    result = train(_cfg(method="mgda", steps=4, out=str(out)))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "steps.csv", "epochs.csv", "checkpoint.pt", "result.json"} <= names
    assert set(result["test"]) >= {"acc_left", "acc_right"}
    assert 0.0 <= result["conflict_share"] <= 1.0 and result["conflict_steps"] == 4
    assert -1.0 <= result["cos_mean"] <= 1.0
    ckpt = load_run_checkpoint(out / "checkpoint.pt")
    assert ckpt["workload_state"] == {} and ckpt["workload"]["spec"].startswith("multimnist:")
    epochs = (out / "epochs.csv").read_text().splitlines()
    assert epochs[0].startswith("step,epoch,train_loss_left") and "val_acc_left" in epochs[0]
    assert len(epochs) == 1 + 2  # validation after each of the two epochs (3 steps, then 1)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    train(_cfg(steps=1, out=str(out)))
    with pytest.raises(ValueError, match="output folder .* holds another run"):
        train(_cfg(steps=1, out=str(out)))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_runs_nothing_and_is_refused_naming_the_file(tmp_path):
    out = tmp_path / "run"
    train(_cfg(steps=1, out=str(out)))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)  # the test's own file
    marker = tmp_path / "payload-ran"
    ckpt["config"]["method"] = _Payload(marker)
    torch.save(ckpt, out / "checkpoint.pt")
    torch.load(out / "checkpoint.pt", weights_only=False)  # the file is live
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(out / 'checkpoint.pt'))} refused"):
        train(resume=out)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "a tensor", "no model", "wrong weights"])
def test_a_damaged_checkpoint_gives_one_error_naming_the_file(damage, tmp_path):
    out = tmp_path / "run"
    train(_cfg(steps=1, out=str(out)))
    path = out / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint\n" * 5)
    elif damage == "a tensor":
        torch.save(torch.ones(2), path)
    else:
        ckpt = torch.load(path, weights_only=True)
        if damage == "no model":
            del ckpt["model"]
        else:
            ckpt["model"][next(iter(ckpt["model"]))] = torch.zeros(1)
        torch.save(ckpt, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        train(resume=out)


def test_resume_refuses_a_config_that_differs_naming_both_values(tmp_path):
    out = tmp_path / "run"
    train(_cfg(steps=1, out=str(out)))
    with pytest.raises(ValueError, match=r"method: given 'mgda', saved 'ls'"):
        train(_cfg(steps=1, method="mgda"), resume=out)


@pytest.mark.parametrize("kw, message", [
    (dict(workload="mnist3"), "unknown workload 'mnist3'"),
    (dict(workload="multimnist:n_trian=5"), r"unknown option\(s\) \['n_trian'\] for workload 'multimnist'"),
    (dict(method="nope"), "nope"),
    (dict(task="middle"), "task 'middle' is not a task of workload 'multimnist'"),
    (dict(steps=3, epochs=1), "steps or epochs, not both"),
    (dict(task_weights=[1.0]), "task_weights has 1 entries for the 2 tasks"),
    (dict(optimizer="lbfgs"), "unknown optimizer 'lbfgs'"),
    (dict(amp=True), "amp needs a CUDA device"),
])
def test_bad_options_fail_before_any_work(kw, message, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(_cfg(out=str(out), **kw))
    assert not out.exists()


# -- a workload of the test's own, through the registry: dropout draws from torch's global generator


class _Noisy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(16, 1) for _ in range(2))

    def forward(self, x):
        z = self.encoder(x)
        return z, [h(z).squeeze(-1) for h in self.heads]

    def shared_parameters(self):
        return list(self.encoder.parameters())

    def task_parameters(self):
        return [list(h.parameters()) for h in self.heads]


from mtl_opt.problems.workload import (  # noqa: E402
    TaskLosses,
    TaskMetric,
    TrainingDefaults,
    TrainingWorkload,
    WorkloadData,
    register_training_workload,
)


class NoisyRegression(TrainingWorkload):
    """Two regression tasks on 40 seeded points, a dropout encoder (lower MSE is better)."""

    name = "noisy_regression"
    task_names = ("a", "b")
    metrics = (TaskMetric("mse_a", "a", False), TaskMetric("mse_b", "b", False))
    defaults = TrainingDefaults(epochs=2, batch_size=8, lr=1e-2)

    def data(self, seed):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 6, generator=g)
        ys = (x[:, 0] - x[:, 1], x[:, 0] + x[:, 2])
        ds = torch.utils.data.TensorDataset(x, *ys)
        return WorkloadData(ds, torch.utils.data.Subset(ds, range(8)), torch.utils.data.Subset(ds, range(8, 16)))

    def build_model(self, data):
        return _Noisy()

    def task_losses(self, model, batch, *, features=False):
        x, ya, yb = batch
        z, (pa, pb) = model(x)
        return TaskLosses([((pa - ya) ** 2).mean(), ((pb - yb) ** 2).mean()], z if features else None)

    def write_test_outputs(self, folder):
        (folder / "predictions.txt").write_text("written after the test\n")
        return ["predictions.txt"]

    def evaluate(self, model, batches):
        err, n = torch.zeros(2), 0
        for x, ya, yb in batches:
            _, (pa, pb) = model(x)
            err += torch.stack([((pa - ya) ** 2).sum(), ((pb - yb) ** 2).sum()])
            n += len(x)
        return {"mse_a": float(err[0] / n), "mse_b": float(err[1] / n)}


register_training_workload("noisy_regression", NoisyRegression, replace=True)


@pytest.mark.parametrize("method, aggregate_at", [("mgda", "parameters"), ("ls", "representation")])
def test_a_resumed_run_with_dropout_draws_what_an_uninterrupted_one_draws(method, aggregate_at, tmp_path):
    # 40 points in batches of 8 (the Subset splits go through a DataLoader): 5 steps per epoch
    cfg = TrainConfig(workload="noisy_regression", method=method, aggregate_at=aggregate_at,
                      steps=9, eval_every=3, log_every=1)
    whole = train(dataclasses.replace(cfg, out=str(tmp_path / "whole")))

    def stop_at_5(step, row):
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        train(dataclasses.replace(cfg, out=str(tmp_path / "cut")), callback=stop_at_5)
    resumed = train(resume=tmp_path / "cut")
    a = load_run_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_run_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"] == whole["test"] and set(whole["test"]) == {"mse_a", "mse_b"}
    assert whole["test_outputs"] == ["predictions.txt"] and (tmp_path / "whole" / "predictions.txt").is_file()
    assert _rows(tmp_path / "whole" / "steps.csv") == _rows(tmp_path / "cut" / "steps.csv")
