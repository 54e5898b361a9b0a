"""The batched Jacobian with each task's head differentiated once, unbatched
(:mod:`mtl_opt._task_split`): same gradients as one backward pass per task, hooks where they were."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import mtl_opt
from mtl_opt import mtl_backward

from _mtl_models import _ClampWithItem, explicit_jacobian, flat_grad


class ConvTwoHeads(nn.Module):
    """A conv + norm encoder, a deep head for task 0, a small head for task 1, a parameter of the
    encoder group that only task 0 reads, and an extra parameter outside every group."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.GroupNorm(2, 4), nn.GELU(),
            nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), nn.Flatten(), nn.LayerNorm(54),
        )
        self.only_task0 = nn.Parameter(torch.randn(54))  # shared, but read by head 0 alone
        self.head0 = nn.Sequential(nn.Linear(54, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                   nn.Linear(16, 3))
        self.head1 = nn.Linear(54, 2)
        self.extra = nn.Parameter(torch.randn(2))  # in no group: receives Σ h_i ∇L_i
        self.double()
        self.x = torch.randn(5, 2, 6, 6, dtype=torch.float64)

    def shared(self) -> list[Tensor]:
        return [*self.encoder.parameters(), self.only_task0]

    def losses(self, frontier_hook=None) -> list[Tensor]:
        z = self.encoder(self.x)
        if frontier_hook is not None:
            z.register_hook(frontier_hook)
        # A backward that reads a value (.item()): vmap cannot batch it, so a batched pass
        # through this head would fail.
        a = _ClampWithItem.apply(self.head0[:2](z * self.only_task0))
        return [self.head0[2:](a).pow(2).mean(), (self.head1(z) + self.extra).sin().sum()]


def _grads(model: ConvTwoHeads, **kw) -> tuple[mtl_opt.MTLBackwardResult, dict[str, Tensor]]:
    for p in model.parameters():
        p.grad = None
    hook = kw.pop("frontier_hook", None)
    result = mtl_backward(model.losses(hook), model.shared(), mtl_opt.get_aggregator("mgda"),
                          task_params=[model.head0, model.head1], task_weights=None, **kw)
    return result, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_heads_run_once_unbatched_and_gradients_match_the_per_task_loop():
    """The head holds an operation vmap cannot batch: the batched path works all the same (the
    head runs unbatched, once), with the per-task loop's gradients."""
    model = ConvTwoHeads()
    loop, loop_grads = _grads(model, parallel=False)
    split, split_grads = _grads(model, parallel=True)
    assert split.batched and not loop.batched
    J = explicit_jacobian(model.losses(), model.shared())
    torch.testing.assert_close(split.gramian, J @ J.T, rtol=1e-10, atol=1e-12)
    for name, g in loop_grads.items():
        torch.testing.assert_close(split_grads[name], g, rtol=1e-10, atol=1e-12, msg=name)
    # The parameter only task 0 reads: its row for task 1 is zero, as in J.
    assert J[1, -54:].abs().max() == 0 and J[0, -54:].abs().max() > 0
    torch.testing.assert_close(flat_grad(model.shared()), split.weights @ J, rtol=1e-10, atol=1e-12)


def test_the_split_computes_the_batched_call():
    """split_task_rows against the K-row gradients the batched call would give (here from one
    autograd call per task: the head cannot be batched)."""
    from mtl_opt._task_split import split_task_rows

    model = ConvTwoHeads()
    inputs = [*model.shared(), *model.head0.parameters(), *model.head1.parameters(), model.extra]
    losses = model.losses()
    per_task = [torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True) for loss in losses]
    expected = [torch.stack([g if g is not None else torch.zeros_like(p) for g in gs])
                for gs, p in zip(zip(*per_task), inputs)]
    got = split_task_rows(torch.stack(losses), inputs, retain_graph=False)
    assert got is not None
    for j, (e, g, task) in enumerate(zip(expected, got.rows, got.single)):
        if task is not None:  # one task's own gradient: the other rows are zero
            assert e[1 - task].abs().max() == 0, j
            e = e[task]
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=str(j))
    assert got.single[len(model.shared()) - 1] == 0  # only_task0 lies in task 0's head
    assert set(got.single[len(model.shared()):]) == {0, 1}  # the heads and `extra`


def test_a_hook_on_the_shared_representation_is_applied_once():
    model = ConvTwoHeads()
    calls = []

    def triple(g):
        calls.append(1)
        return 3.0 * g

    loop, loop_grads = _grads(model, parallel=False, frontier_hook=triple)
    calls.clear()
    split, split_grads = _grads(model, parallel=True, frontier_hook=triple)
    # Each head's pass reads the frontier (the hook's result is discarded there); the batched
    # pass through the encoder applies it once to the K rows (applied twice, the gradients
    # would be 3× too large).
    assert len(calls) == 3
    for name, g in loop_grads.items():
        torch.testing.assert_close(split_grads[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_losses_from_one_node_take_the_plain_batched_call():
    """Two losses from one unbind have no task-only root: the plain batched call, same result."""
    from mtl_opt._task_split import split_task_rows

    torch.manual_seed(0)
    enc, head = nn.Linear(4, 4).double(), nn.Linear(4, 2).double()
    x = torch.randn(3, 4, dtype=torch.float64)

    def losses():
        return list(head(torch.tanh(enc(x))).pow(2).mean(0).unbind())

    assert split_task_rows(torch.stack(losses()), list(enc.parameters()), False) is None
    result = mtl_backward(losses(), enc, mtl_opt.get_aggregator("mgda"), parallel=True)
    J = explicit_jacobian(losses(), list(enc.parameters()))
    torch.testing.assert_close(result.gramian, J @ J.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_grad(enc.parameters()), result.weights @ J, rtol=1e-10, atol=1e-12)


def test_the_graph_is_freed_without_retain_graph():
    model = ConvTwoHeads()
    losses = model.losses()
    mtl_backward(losses, model.shared(), mtl_opt.get_aggregator("mgda"), parallel=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        mtl_backward(losses, model.shared(), mtl_opt.get_aggregator("mgda"), parallel=True)
