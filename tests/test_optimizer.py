"""MultiTaskOptimizer: training, checkpoints, context, schedulers, errors; the README quick start."""

from __future__ import annotations

import copy
import re
import runpy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mtl_opt
from mtl_opt import BatchedJacobianFallbackWarning, MultiTaskOptimizer, mtl_backward
from mtl_opt.methods import CAMEGrad, LinearScalarization, MGDA

from _mtl_models import (
    RecordingWeights,
    RunningNormWeights,
    SparseEmbeddingNet,
    TwoHeadNet,
    UnitNormSum,
    batch,
    explicit_jacobian,
    flat_grad,
    token_batch,
)

HERE = Path(__file__).resolve().parent


def make(aggregator, opt_cls=torch.optim.Adam, lr=0.02, seed=0, task_params=True):
    net = TwoHeadNet(seed=seed)
    opt = MultiTaskOptimizer(
        opt_cls(net.parameters(), lr=lr), aggregator, net.trunk,
        task_params=[net.head_a, net.head_b] if task_params else None,
    )
    return net, opt


@pytest.mark.parametrize(
    "aggregator",
    [UnitNormSum(), LinearScalarization(), RunningNormWeights(), CAMEGrad(task_weights=[1, 4]), MGDA()],
    ids=lambda a: type(a).__name__,
)
def test_steps_decrease_both_losses(aggregator):
    net, opt = make(aggregator, lr=0.01)
    x, y = batch(n=16)
    first = None
    for _ in range(60):
        opt.zero_grad()
        info = opt.step(net.losses(x, y))
        first = info.losses if first is None else first
    with torch.no_grad():
        final = torch.stack(net.losses(x, y)).double()
    assert (final < 0.7 * first).all(), (first, final)


def _run(net, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=g)
        y = torch.randn(8, 3, generator=g)
        opt.zero_grad()
        opt.step(net.losses(x, y), task_weights=[1.0, 2.0])


def test_state_dict_round_trip_resumes_identically():
    net, opt = make(RunningNormWeights(decay=0.3))
    _run(net, opt, 3, seed=0)
    model_state = copy.deepcopy(net.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    assert saved["aggregator"]["steps"] == 3 and saved["optimizer"]["state"]

    _run(net, opt, 2, seed=1)
    reference = [p.detach().clone() for p in net.parameters()]

    net2, opt2 = make(RunningNormWeights(decay=0.3), seed=5)  # different init, fresh state
    net2.load_state_dict(model_state)
    opt2.load_state_dict(saved)
    _run(net2, opt2, 2, seed=1)
    for a, b in zip(reference, net2.parameters()):
        assert torch.equal(a, b)

    # Without the aggregator's state the next steps differ: the state really matters.
    net3, opt3 = make(RunningNormWeights(decay=0.3))
    net3.load_state_dict(model_state)
    opt3.optimizer.load_state_dict(saved["optimizer"])
    _run(net3, opt3, 2, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(reference, net3.parameters()))


def test_load_state_dict_rejects_other_aggregator_and_plain_dicts():
    _, opt = make(UnitNormSum())
    _, other = make(RunningNormWeights())
    with pytest.raises(ValueError, match="saved with aggregator RunningNormWeights"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="not a MultiTaskOptimizer state dict"):
        opt.load_state_dict(opt.optimizer.state_dict())


def test_task_weights_and_losses_reach_the_aggregator():
    agg = RecordingWeights()
    net, opt = make(agg)
    x, y = batch()
    losses = net.losses(x, y)
    opt.zero_grad()
    info = opt.step(losses, task_weights=[1, 4])
    assert agg.calls[-1]["task_weights"].tolist() == [1.0, 4.0]
    torch.testing.assert_close(agg.calls[-1]["losses"], torch.stack(losses).detach().double())
    assert info.loss_weights.tolist() == [1.0, 4.0]  # the heads got 1·∇L_a and 4·∇L_b


def test_step_matches_mtl_backward_then_optimizer_step():
    """step(losses) is exactly mtl_backward followed by the wrapped optimizer's step."""
    x, y = batch()
    net, opt = make(CAMEGrad(), opt_cls=torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in net.trunk.parameters()]
    losses = net.losses(x, y)
    G = explicit_jacobian(losses, list(net.trunk.parameters()))
    direction = CAMEGrad()(G, task_weights=[1.0, 4.0])
    opt.zero_grad()
    opt.step(losses, task_weights=[1, 4])
    after = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, net.trunk.parameters())])
    torch.testing.assert_close(after, 0.1 * direction, rtol=1e-4, atol=1e-6)


def test_backward_then_step_allows_gradient_clipping():
    net, opt = make(UnitNormSum(), opt_cls=torch.optim.SGD, lr=1.0)
    x, y = batch()
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    opt.backward(net.losses(x, y))
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1e-3)
    assert opt.step() is None
    moved = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, net.parameters())])
    torch.testing.assert_close(moved.norm(), torch.tensor(1e-3), rtol=1e-3, atol=0.0)
    with pytest.raises(RuntimeError, match="backward\\(losses\\) first"):
        opt.step()


def test_features_step_uses_representation_level_weights():
    net, opt = make(UnitNormSum(), opt_cls=torch.optim.SGD, lr=0.1)
    x, y = batch()
    z = net.features(x)
    losses = net.losses_from(z, y)
    beta = 1.0 / explicit_jacobian(losses, [z]).norm(dim=1)
    opt.zero_grad()
    info = opt.step(losses, features=z)
    assert info.level == "features"
    torch.testing.assert_close(info.weights, beta.double(), rtol=1e-5, atol=1e-7)


def test_scheduler_attaches_to_the_wrapped_optimizer():
    net, opt = make(UnitNormSum(), opt_cls=torch.optim.SGD, lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.1)
    assert opt.param_groups is opt.optimizer.param_groups
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        opt.zero_grad()
        opt.step(net.losses(x, y))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_parameters_missing_from_the_optimizer_raise():
    net = TwoHeadNet()
    with pytest.raises(ValueError, match=r"2 parameter\(s\).*'0.weight'"):
        MultiTaskOptimizer(torch.optim.SGD(list(net.trunk.parameters())[2:], lr=0.1), UnitNormSum(), net.trunk)
    with pytest.raises(ValueError, match="task 1 parameter"):
        MultiTaskOptimizer(torch.optim.SGD([*net.trunk.parameters(), *net.head_a.parameters()], lr=0.1),
                           UnitNormSum(), net.trunk, task_params=[net.head_a, net.head_b])
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        MultiTaskOptimizer(object(), UnitNormSum(), net.trunk)
    with pytest.raises(TypeError, match="GradientAggregator"):
        MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), "came_grad", net.trunk)
    with pytest.raises(ValueError, match="given twice"):
        MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), UnitNormSum(), net.trunk,
                           task_params=[net.head_a, [*net.head_b.parameters(), net.trunk[0].bias]])
    _, opt = make(UnitNormSum())
    with pytest.raises(ValueError, match="need the losses"):
        opt.step(task_weights=[1, 4])


def test_generator_shared_params_are_kept():
    net = TwoHeadNet()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), UnitNormSum(), net.trunk.parameters())
    x, y = batch()
    for _ in range(2):  # a one-shot generator would be empty on the second step
        opt.zero_grad()
        opt.step(net.losses(x, y))
    assert all(p.grad is not None for p in net.trunk.parameters())


def test_fallback_is_remembered_after_the_first_failure():
    net = SparseEmbeddingNet()
    opt = MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), UnitNormSum(), net.shared())
    tokens, y = token_batch()
    with pytest.warns(BatchedJacobianFallbackWarning):
        first = opt.step(net.losses(tokens, y))
    assert first.fallback_reason is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchedJacobianFallbackWarning)
        second = opt.step(net.losses(tokens, y))
    assert second.batched is False and second.fallback_reason is None


def test_repr_names_the_parts():
    _, opt = make(CAMEGrad(task_weights=[1, 4]))
    text = repr(opt)
    assert "CAMEGrad(rho=0.5, kappa=1.5, nu=0.2, task_weights=[1.0, 4.0]" in text
    assert "Adam (" in text and "task_params=2 groups" in text and "6 tensors" in text


def test_came_grad_heads_get_omega_weighted_gradients():
    """With CAME-Grad, task heads receive ω_i ∇L_i (ω from the method or from the call)."""
    net = TwoHeadNet(dtype=torch.float64)
    x, y = batch(dtype=torch.float64)
    losses = net.losses(x, y)
    hb = list(net.head_b.parameters())
    expected = torch.autograd.grad(losses[1], hb, retain_graph=True)
    mtl_backward(losses, net.trunk, CAMEGrad(task_weights=[1, 4]), task_params=[net.head_a, net.head_b])
    for p, e in zip(hb, expected):
        torch.testing.assert_close(p.grad, 4 * e)
    G = explicit_jacobian(net.losses(x, y), list(net.trunk.parameters()))
    torch.testing.assert_close(flat_grad(net.trunk.parameters()), CAMEGrad(task_weights=[1, 4])(G))


# --------------------------------------------------------------------------------------------
# The README quick start runs as written
# --------------------------------------------------------------------------------------------
QUICKSTART = HERE / "readme_quickstart.py"


def test_readme_quickstart_trains_both_tasks(monkeypatch, capsys):
    code = QUICKSTART.read_text()
    assert len([line for line in code.splitlines() if line.strip()]) <= 14
    seen = []
    real_step = MultiTaskOptimizer.step

    def recording_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(MultiTaskOptimizer, "step", recording_step)
    torch.manual_seed(0)
    runpy.run_path(str(QUICKSTART), run_name="__main__")
    assert len(seen) == 200 and all(r.batched for r in seen)
    assert isinstance(seen[0].aggregation.weights, torch.Tensor)
    assert (seen[-1].losses < 0.5 * seen[0].losses).all(), (seen[0].losses, seen[-1].losses)
    assert "MTLBackwardResult" in capsys.readouterr().out


def test_readme_shows_the_tested_quickstart():
    """The README's quick start is this file: the Python block that follows the marker
    ``<!-- tested: tests/readme_quickstart.py -->`` must equal it, character for character."""
    readme = (HERE.parent / "README.md").read_text()
    marker = "<!-- tested: tests/readme_quickstart.py -->"
    blocks = re.findall(re.escape(marker) + r"\s*```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md must show the quick start after the marker " + marker
    assert readme.count(marker) == len(blocks), "every marker must be followed by a python block"
    for block in blocks:
        assert block == QUICKSTART.read_text()


def test_rejected_aggregator_state_leaves_the_optimizer_untouched():
    net, opt = make(RunningNormWeights(decay=0.3))
    _run(net, opt, 2, seed=0)
    before = copy.deepcopy(opt.state_dict())
    _, other = make(RunningNormWeights(decay=0.3), lr=0.5)  # fresh Adam state, another lr
    state = copy.deepcopy(other.state_dict())
    state["aggregator"] = {"bogus": 1}  # rejected by the aggregator (KeyError)
    with pytest.raises(KeyError):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert after["optimizer"]["param_groups"][0]["lr"] == 0.02
    assert after["aggregator"]["steps"] == before["aggregator"]["steps"] == 2
    assert torch.equal(after["aggregator"]["ema"], before["aggregator"]["ema"])
    for key, value in before["optimizer"]["state"].items():
        for name, t in value.items():
            assert torch.equal(torch.as_tensor(after["optimizer"]["state"][key][name]), torch.as_tensor(t))


def test_features_steps_take_per_task_passes_after_a_batched_parameter_step():
    """parallel="auto" settles on the batched call at the parameters; a later step at the
    features still takes one backward pass per task through the heads (not the batched call,
    which runs every head K times)."""
    net, opt = make(UnitNormSum(), opt_cls=torch.optim.SGD, lr=0.1)
    x, y = batch()
    opt.zero_grad()
    assert opt.step(net.losses(x, y)).batched is True
    z = net.features(x)
    opt.zero_grad()
    info = opt.step(net.losses_from(z, y), features=z)
    assert info.level == "features" and info.batched is False and info.fallback_reason is None
    z = net.features(x)
    opt.zero_grad()
    assert opt.step(net.losses(x, y)).batched is True
