"""MultiTaskOptimizer as a torch.optim.Optimizer: schedulers, hooks, copies, clipping, closures,
GradScaler; and the README's recipes (each a file run here as written)."""

from __future__ import annotations

import copy
import re
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

import mtl_opt
from mtl_opt import MultiTaskOptimizer
from mtl_opt.methods import CAMEGrad, NashMTL

from _mtl_models import TwoHeadNet, batch

HERE = Path(__file__).resolve().parent


def make(aggregator, opt_cls=torch.optim.SGD, lr=0.1, seed=0):
    net = TwoHeadNet(seed=seed)
    opt = MultiTaskOptimizer(opt_cls(net.parameters(), lr=lr), aggregator, net.trunk,
                             task_params=[net.head_a, net.head_b])
    return net, opt


def params(net):
    return [p.detach().clone() for p in net.parameters()]


# --------------------------------------------------------------------------------------------
# An optimizer to the ecosystem
# --------------------------------------------------------------------------------------------
def test_is_an_optimizer_sharing_the_wrapped_ones_structures():
    net, opt = make(CAMEGrad())
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    assert opt.defaults is opt.optimizer.defaults
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra]})
    assert opt.optimizer.param_groups[-1]["params"] == [extra]


def test_step_lr_attached_to_the_wrapper_steps_the_wrapped_learning_rate():
    net, opt = make(CAMEGrad(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch(0)
    for epoch in range(3):
        opt.zero_grad()
        opt.step(net.losses(x, y))
        sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    # and the wrapped optimizer uses it: an SGD step moves by lr * grad
    before = params(net)
    opt.zero_grad()
    opt.step(net.losses(x, y))
    p0 = next(net.parameters())
    torch.testing.assert_close(p0.detach(), before[0] - 0.0125 * p0.grad)


def test_hooks_registered_on_the_wrapper_run_on_its_steps_and_state_dicts():
    net, opt = make(CAMEGrad())
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("state_dict") or sd)
    x, y = batch(0)
    opt.step(net.losses(x, y))
    state = opt.state_dict()
    assert seen == ["pre", "post", "state_dict"]
    assert set(state) == {"optimizer", "aggregator", "aggregator_class"}  # the format is kept


def test_deepcopy_copies_the_whole_wrapper():
    net, opt = make(NashMTL())
    x, y = batch(0)
    opt.step(net.losses(x, y))
    twin = copy.deepcopy((net, opt))
    for n, o in ((net, opt), twin):
        for s in range(3):
            o.zero_grad()
            o.step(n.losses(*batch(s)))
    for a, b in zip(net.parameters(), twin[0].parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Clipping after aggregation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["norm", "value"])
def test_clipping_acts_on_the_aggregated_direction_and_the_head_gradients(how):
    x, y = batch(1)
    y = 50 * y  # large gradients, so that clipping bites
    net, opt = make(CAMEGrad(task_weights=[1, 4]), lr=1.0)
    ref_net, ref_opt = make(CAMEGrad(task_weights=[1, 4]), lr=1.0)
    kwargs = {"clip_norm": 0.5} if how == "norm" else {"clip_value": 0.01}
    opt.step(net.losses(x, y), **kwargs)
    ref_opt.backward(ref_net.losses(x, y))
    unclipped = torch.nn.utils.get_total_norm([p.grad for p in ref_net.parameters()])
    if how == "norm":
        torch.nn.utils.clip_grad_norm_(ref_net.parameters(), 0.5)
    else:
        torch.nn.utils.clip_grad_value_(ref_net.parameters(), 0.01)
    ref_opt.step()
    assert unclipped > 1.0
    torch.testing.assert_close(opt.last_grad_norm, unclipped)
    for a, b in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b)
    heads = [p.grad for p in net.head_b.parameters()]
    if how == "value":
        assert max(float(g.abs().max()) for g in heads) == pytest.approx(0.01)
    else:
        total = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])
        assert float(total) == pytest.approx(0.5, rel=1e-5)


def test_clipping_options_are_checked():
    net, opt = make(CAMEGrad())
    x, y = batch(0)
    with pytest.raises(ValueError, match="clip_norm or clip_value, not both"):
        opt.step(net.losses(x, y), clip_norm=1.0, clip_value=0.1)
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="clip_value must be a finite number > 0"):
            opt.step(net.losses(x, y), clip_value=bad)


def test_closure_returning_the_losses_is_the_losses():
    x, y = batch(2)
    net, opt = make(CAMEGrad())
    ref_net, ref_opt = make(CAMEGrad())
    info = opt.step(closure=lambda: net.losses(x, y))
    ref_opt.step(ref_net.losses(x, y))
    assert info is not None and info.batched
    for a, b in zip(net.parameters(), ref_net.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not both"):
        opt.step(net.losses(x, y), closure=lambda: net.losses(x, y))


# --------------------------------------------------------------------------------------------
# float16 GradScaler: weights from the unscaled problem, overflow steps skipped
# --------------------------------------------------------------------------------------------
def test_grad_scaler_gives_the_unscaled_update_even_for_nash_mtl():
    """Nash-MTL's direction does not scale with the losses (α ∝ 1/s): naively unscaling the
    direction of the scaled losses would shrink the update s-fold."""
    net, opt = make(NashMTL(), lr=0.05)
    ref_net, ref_opt = make(NashMTL(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for s in range(3):
        x, y = batch(s)
        opt.zero_grad()
        info = opt.backward(net.losses(x, y), grad_scaler=scaler)
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        ref_info = ref_opt.step(ref_net.losses(x, y))
        torch.testing.assert_close(info.weights, ref_info.weights)
    assert scaler.get_scale() == 1024.0
    for a, b in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b)


def test_grad_scaler_overflow_skips_the_step_and_lowers_the_scale():
    net, opt = make(CAMEGrad(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1e38)
    x, y = batch(0)
    before = params(net)
    opt.zero_grad()
    assert opt.backward(net.losses(x, 1e3 * y), grad_scaler=scaler) is None  # overflows
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == pytest.approx(0.5e38)
    for a, b in zip(net.parameters(), before):
        assert torch.equal(a, b)
    # without a scaler, the same non-finite losses are an error, never a skipped step
    with pytest.raises(ValueError, match="finite"):
        opt.backward([torch.tensor(float("inf"), requires_grad=True) * p.sum()
                      for p in list(net.trunk.parameters())[:2]])


def test_grad_scaler_needs_a_gradscaler():
    net, opt = make(CAMEGrad())
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        opt.backward(net.losses(*batch(0)), grad_scaler=1024.0)


# --------------------------------------------------------------------------------------------
# The README's recipes run as written
# --------------------------------------------------------------------------------------------
def _run_recipe(name, monkeypatch):
    """Run tests/readme_recipe_NAME.py; return its globals, each optimizer step's gradients and
    each backward pass's diagnostics."""
    steps, backwards = [], []
    real_step, real_backward = MultiTaskOptimizer.step, MultiTaskOptimizer.backward

    def recording_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        steps.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return result

    def recording_backward(self, *args, **kwargs):
        result = real_backward(self, *args, **kwargs)
        backwards.append(result)
        return result

    monkeypatch.setattr(MultiTaskOptimizer, "step", recording_step)
    monkeypatch.setattr(MultiTaskOptimizer, "backward", recording_backward)
    torch.manual_seed(0)
    env = runpy.run_path(str(HERE / f"readme_recipe_{name}.py"), run_name="__main__")
    return env, steps, backwards


def test_recipe_lr_schedule(monkeypatch):
    env, steps, _ = _run_recipe("lr_schedule", monkeypatch)
    assert len(steps) == 30
    assert env["sched"].get_last_lr() == [pytest.approx(1e-2 / 8)]
    assert env["opt"].optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)


def test_recipe_clipping(monkeypatch):
    env, steps, _ = _run_recipe("clipping", monkeypatch)
    assert len(steps) == 50 and float(env["opt"].last_grad_norm) > 0.1
    largest = [max(float(g.abs().max()) for g in grads) for grads in steps]
    assert max(largest) == pytest.approx(0.1)  # clipped (float32's 0.1), and it bit


def test_recipe_bf16_autocast(monkeypatch):
    env, steps, infos = _run_recipe("bf16", monkeypatch)
    assert len(steps) == 100 and (infos[-1].losses < 0.5 * infos[0].losses).all()


def test_recipe_fp16_grad_scaler(monkeypatch):
    env, steps, infos = _run_recipe("fp16_scaler", monkeypatch)
    assert len(steps) == 100  # scaler.step called opt.step() after every backward: no overflow
    assert env["scaler"].get_scale() == 65536.0
    # the diagnostics hold the scaled losses: the same factor at the start and the end
    assert (infos[-1].losses < 0.5 * infos[0].losses).all()


def test_recipe_lightning_manual_optimisation(monkeypatch):
    env, steps, infos = _run_recipe("lightning", monkeypatch)
    assert env["trainer"].global_step == 20 and len(steps) == 20 and len(infos) == 20
    assert infos[-1].losses[0] < infos[0].losses[0]
    total = [float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in gs]))) for gs in steps]
    assert max(total) == pytest.approx(1.0, rel=1e-5)  # clip_norm=1.0 reached the step


def test_readme_shows_every_tested_file():
    """Every ``<!-- tested: tests/NAME.py -->`` marker in the README is followed by a python
    block equal to that file, and every readme_*.py file is shown."""
    readme = (HERE.parent / "README.md").read_text()
    shown = re.findall(r"<!-- tested: tests/(\S+\.py) -->\s*```python\n(.*?)```", readme, flags=re.S)
    assert readme.count("<!-- tested: ") == len(shown)
    for name, block in shown:
        assert block == (HERE / name).read_text(), name
    assert {name for name, _ in shown} == {p.name for p in HERE.glob("readme_*.py")}
