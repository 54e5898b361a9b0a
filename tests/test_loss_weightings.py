"""Loss weightings (uw, dwa, rlw, gls, famo, stch, imtl_l, si) and the one-backward path.

Each weighting is checked against a float64 reference of its published update, written from the
paper's objective as its authors' code (LibMTL, which the RLW authors maintain and whose DWA,
FAMO and STCH are adapted from the official repositories) states it: the weights are the
derivatives ``∂J/∂L_i`` of that objective (by autograd), and learnable weights are trained by
``torch.optim.Adam`` on the same objective, as in joint training. Several steps of a fixed loss
sequence cover the state and the learning rules.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import mtl_opt
from mtl_opt import LossWeighting
from mtl_opt.experiments.runner import run_method

LOSS_WEIGHTINGS = ["uw", "dwa", "rlw", "gls", "famo", "stch", "imtl_l", "si"]
JACOBIAN_FREE = ["ls"] + LOSS_WEIGHTINGS

# A fixed sequence of 8 steps of K = 3 positive losses (and the losses after each step, for FAMO).
_g = torch.Generator().manual_seed(7)
LOSSES = (torch.rand(8, 3, generator=_g, dtype=torch.float64) * 2 + 0.1).cumprod(0) ** 0.3
AFTER = LOSSES * (0.8 + 0.3 * torch.rand(8, 3, generator=_g, dtype=torch.float64))


def _dJ_dL(objective, L: torch.Tensor) -> torch.Tensor:
    """The weights of an objective J(L): ∂J/∂L (float64, autograd)."""
    L = L.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(objective(L), L)
    return g


# ------------------------------------------------------------------------------ references
def test_uw_matches_joint_training_of_the_log_variances_by_adam():
    # LibMTL: loss = Σ L_i / (2 e^{s_i}) + s_i / 2, s trained by the model's optimizer; it starts
    # s at −0.5 (here init_log_variance=-0.5 to match; the default is 0).
    method = mtl_opt.get_aggregator("uw", lr=0.05, init_log_variance=-0.5)
    s = torch.full((3,), -0.5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.05, foreach=False)
    for L in LOSSES:
        expected = _dJ_dL(lambda l: (l / (2 * s.detach().exp()) + s.detach() / 2).sum(), L)
        got = method.weights(L)
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
        opt.zero_grad()
        (L / (2 * s.exp()) + s / 2).sum().backward()
        opt.step()
        torch.testing.assert_close(method.log_variances[0], s.detach(), rtol=1e-14, atol=1e-15)


def test_imtl_l_matches_joint_training_of_the_log_scales_by_adam():
    # LibMTL's IMTL (its loss half): losses = e^{s} L − s, s from 0, trained by the optimizer.
    method = mtl_opt.get_aggregator("imtl_l", lr=0.05)
    s = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.05, foreach=False)
    for L in LOSSES:
        expected = _dJ_dL(lambda l: (s.detach().exp() * l - s.detach()).sum(), L)
        torch.testing.assert_close(method.weights(L), expected, rtol=1e-14, atol=0)
        opt.zero_grad()
        (s.exp() * L - s).sum().backward()
        opt.step()
        torch.testing.assert_close(method.log_scales[0], s.detach(), rtol=1e-14, atol=1e-15)


def test_famo_matches_the_authors_update_of_the_logits():
    # The authors' FAMO (and LibMTL's): loss = Σ log(D) z / c with c = Σ z/D detached, D = L + 1e-8
    # (min_losses = 0); update: δ = log D − log D', ξ.grad = ∂(softmax(ξ)·δ)/∂ξ, Adam(lr, L2 γ).
    method = mtl_opt.get_aggregator("famo", w_lr=0.1, gamma=0.01)
    xi = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=0.1, weight_decay=0.01, foreach=False)
    for L, L_after in zip(LOSSES, AFTER):
        z = torch.softmax(xi.detach(), -1)

        def objective(l):
            D = l + 1e-8
            c = (z / D).sum().detach()
            return (D.log() * z / c).sum()

        torch.testing.assert_close(method.weights(L), _dJ_dL(objective, L), rtol=1e-13, atol=0)
        method.update(L_after)
        delta = (L + 1e-8).log() - (L_after + 1e-8).log()
        (d,) = torch.autograd.grad(torch.softmax(xi, -1), xi, grad_outputs=delta)
        opt.zero_grad()
        xi.grad = d
        opt.step()
        torch.testing.assert_close(method.logits[0], xi.detach(), rtol=1e-13, atol=1e-15)


def test_dwa_uses_the_ratio_of_the_last_two_epoch_means():
    # LibMTL / the authors' mtan code: w = K softmax((L̄(e−1)/L̄(e−2)) / T) from epoch 2 on, ones
    # before; L̄ is the epoch's mean training loss. Epochs of 2 steps (epoch_length=2).
    method = mtl_opt.get_aggregator("dwa", temperature=2.0, epoch_length=2)
    told = mtl_opt.get_aggregator("dwa")  # the same epochs, told by end_epoch()
    means = []
    for t, L in enumerate(LOSSES):
        e = t // 2
        if e < 2:
            expected = torch.ones(3, dtype=torch.float64)
        else:
            r = means[e - 1] / means[e - 2]
            expected = 3 * torch.exp(r / 2.0) / torch.exp(r / 2.0).sum()
        torch.testing.assert_close(method.weights(L), expected, rtol=1e-14, atol=0)
        torch.testing.assert_close(told.weights(L), expected, rtol=1e-14, atol=0)
        if t % 2 == 1:
            told.end_epoch()
            means.append(LOSSES[t - 1: t + 1].mean(0))


def test_stch_warmup_nadir_and_smooth_tchebycheff():
    # LibMTL's STCH (from the authors' code): epochs < E train Σ log(L + 1e-20); epoch E the same
    # and averages L into the nadir n; later K μ log Σ exp((log(L/n + 1e-20) − max)/μ).
    mu, E = 0.5, 1
    method = mtl_opt.get_aggregator("stch", mu=mu, warmup_epochs=E, epoch_length=2)
    nadir = LOSSES[2:4].mean(0)
    for t, L in enumerate(LOSSES):
        e = t // 2
        if e <= E:
            objective = lambda l: torch.log(l + 1e-20).sum()  # noqa: E731
        else:
            def objective(l):
                f = torch.log(l / nadir + 1e-20)
                m = f.detach().max()
                return mu * torch.log(torch.exp((f - m) / mu).sum()) * 3
        torch.testing.assert_close(method.weights(L), _dJ_dL(objective, L), rtol=1e-13, atol=0)


@pytest.mark.parametrize("name,objective", [
    # LibMTL's GLS trains (Π L)^{1/K}; the weights it *returns* (L / (K Π L)) are not that
    # objective's gradient, so the reference is the gradient of the objective it trains.
    ("gls", lambda l: l.prod() ** (1 / l.numel())),
    # Nash-MTL's scale-invariant baseline: Σ log L.
    ("si", lambda l: torch.log(l).sum()),
])
def test_stateless_weightings_are_the_gradient_of_their_objective(name, objective):
    method = mtl_opt.get_aggregator(name)
    for L in LOSSES:
        torch.testing.assert_close(method.weights(L), _dJ_dL(objective, L), rtol=1e-13, atol=0)


@pytest.mark.parametrize("distribution", ["normal", "uniform", "dirichlet", "bernoulli"])
def test_rlw_draws_from_its_seeded_generator(distribution):
    # LibMTL: softmax of a Normal(0, 1) / Uniform(0, 1) / Dirichlet(1) draw; a Bernoulli(1/2)
    # draw as is, redrawn while all zero. Here from the method's own generator (LibMTL: global).
    method = mtl_opt.get_aggregator("rlw", distribution=distribution, seed=3)
    g = torch.Generator().manual_seed(3)
    for L in LOSSES:
        if distribution == "bernoulli":
            while True:
                expected = torch.bernoulli(torch.full((3,), 0.5, dtype=torch.float64), generator=g)
                if expected.any():
                    break
        else:
            if distribution == "normal":
                lam = torch.randn(3, generator=g, dtype=torch.float64)
            elif distribution == "uniform":
                lam = torch.rand(3, generator=g, dtype=torch.float64)
            else:
                e = -torch.log1p(-torch.rand(3, generator=g, dtype=torch.float64))
                lam = e / e.sum()
            expected = torch.softmax(lam, -1)
        assert torch.equal(method.weights(L), expected)


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_batch_weights_keep_one_state_per_run(name):
    kw = {"epoch_length": 2} if name in ("dwa", "stch") else {}
    if name == "stch":
        kw["warmup_epochs"] = 1
    runs = torch.stack([LOSSES, LOSSES.flip(1) * 1.5], dim=1)  # (T, B=2, K)
    batched = mtl_opt.get_aggregator(name, **kw)
    singles = [mtl_opt.get_aggregator(name, **kw) for _ in range(2)]
    if name == "rlw":  # one draw per step, shared by the batch
        batched, singles = [mtl_opt.get_aggregator(name, seed=0) for _ in range(3)][0], [
            mtl_opt.get_aggregator(name, seed=0), mtl_opt.get_aggregator(name, seed=0)]
    for t in range(runs.shape[0]):
        W = batched.batch_weights(runs[t])
        for b in range(2):
            torch.testing.assert_close(W[b], singles[b].weights(runs[t, b]), rtol=0, atol=0)
        if batched.wants_losses_after_step:
            batched.batch_update(runs[t] * 0.9)
            for b in range(2):
                singles[b].update(runs[t, b] * 0.9)


# ------------------------------------------------------------------------------ the engine
class _Net(nn.Module):
    def __init__(self, K: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(12, 1) for _ in range(K))
        self.scale = nn.Parameter(torch.ones(()))  # another parameter all losses reach

    def losses(self, x, y):
        z = self.trunk(x) * self.scale
        return [((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(self.heads)]


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


class _Counter:
    def __init__(self, monkeypatch):
        self.backward = self.grad = 0
        real_backward, real_grad = torch.autograd.backward, torch.autograd.grad

        def backward(*a, **k):
            self.backward += 1
            return real_backward(*a, **k)

        def grad(*a, **k):
            self.grad += 1
            return real_grad(*a, **k)

        monkeypatch.setattr(torch.autograd, "backward", backward)
        monkeypatch.setattr(torch.autograd, "grad", grad)


@pytest.mark.parametrize("name", JACOBIAN_FREE)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "stacked"])
def test_one_backward_gives_the_plain_weighted_sum_grad_bit_for_bit(name, as_tensor, monkeypatch):
    torch.manual_seed(0)
    net = _Net()
    ref = copy.deepcopy(net)
    method = mtl_opt.get_aggregator(name, **({"seed": 0} if name == "rlw" else {}))
    opt = mtl_opt.MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), method,
                                     shared_params=net.trunk, task_params=list(net.heads))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    counter = _Counter(monkeypatch)
    for step in range(4):
        x, y = _batch(step)
        losses = net.losses(x, y)
        opt.zero_grad()
        before = (counter.backward, counter.grad)
        info = opt.step(torch.stack(losses) if as_tensor else losses)
        assert (counter.backward - before[0], counter.grad - before[1]) == (1, 0)
        assert info.gramian is None and info.grad_norms is None and info.cosines is None
        w = info.weights.to(torch.float32)
        ref_opt.zero_grad()
        (w * torch.stack(ref.losses(x, y))).sum().backward()
        for (n, p), q in zip(net.named_parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad), (step, n)
        if step == 0:
            flat = torch.cat([p.grad.reshape(-1) for p in net.trunk.parameters()])
            assert torch.equal(info.direction, flat)
        ref_opt.step()
        if method.needs_jacobian is False and getattr(method, "wants_losses_after_step", False):
            with torch.no_grad():
                method.update(torch.stack(net.losses(x, y)))
                # (the reference takes the same weights from info: it needs no update)


def test_a_head_reached_by_another_loss_still_gets_only_its_own_task(monkeypatch):
    torch.manual_seed(0)
    net = _Net(K=2)
    x, y = _batch(0)
    z = net.trunk(x)
    a, b = net.heads
    losses = [((a(z).squeeze(-1) - y[:, 0]) ** 2).mean(),
              ((b(z).squeeze(-1) + a(z).squeeze(-1) - y[:, 1]) ** 2).mean()]  # loss 1 reaches a
    method = mtl_opt.get_aggregator("si")
    w = 1.0 / torch.stack(losses).detach().double()
    (ga,) = torch.autograd.grad(losses[0], a.weight, retain_graph=True)
    result = mtl_opt.mtl_backward(losses, net.trunk, method, task_params=[[a.weight, a.bias],
                                                                          [b.weight, b.bias]])
    torch.testing.assert_close(result.weights, w)
    torch.testing.assert_close(a.weight.grad, w[0].float() * ga)


def test_direction_is_refused_when_grad_was_accumulated():
    net = _Net()
    x, y = _batch(0)
    mtl_opt.mtl_backward(net.losses(x, y), net.trunk, mtl_opt.get_aggregator("gls"))
    again = mtl_opt.mtl_backward(net.losses(x, y), net.trunk, mtl_opt.get_aggregator("gls"))
    with pytest.raises(RuntimeError, match="already held gradients"):
        again.direction


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_state_dict_round_trip_through_a_file_is_bit_for_bit(name):
    torch.manual_seed(0)
    kw = {"seed": 0} if name == "rlw" else ({"epoch_length": 1, "warmup_epochs": 1} if name == "stch" else {})
    if name == "dwa":
        kw = {"epoch_length": 1}
    method = mtl_opt.get_aggregator(name, **kw)
    for t in range(4):
        method.weights(LOSSES[t])
        if method.wants_losses_after_step:
            method.update(AFTER[t])
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    other = mtl_opt.get_aggregator(name, **kw)
    other.load_state_dict(torch.load(buf, weights_only=True))
    for t in range(4, 8):
        assert torch.equal(method.weights(LOSSES[t]), other.weights(LOSSES[t]))
        if method.wants_losses_after_step:
            method.update(AFTER[t])
            other.update(AFTER[t])


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name", ["gls", "si", "dwa", "stch"])
def test_non_positive_losses_are_refused_where_a_log_or_ratio_is_taken(name):
    with pytest.raises(ValueError, match=r"must be > 0; got -0.5 for task 1"):
        mtl_opt.get_aggregator(name).weights(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match=r"must be > 0; got 0.0 for task 0"):
        mtl_opt.get_aggregator(name).weights(torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("name", ["famo", "uw", "imtl_l"])
def test_negative_losses_are_refused_by_methods_whose_objective_they_break(name):
    with pytest.raises(ValueError, match=r">= 0; got -0.5 for task 1"):
        mtl_opt.get_aggregator(name).weights(torch.tensor([1.0, -0.5]))


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS)
def test_bad_losses_get_one_clear_error(name):
    method = mtl_opt.get_aggregator(name)
    with pytest.raises(ValueError, match="must be finite, got nan for task 1"):
        method.weights(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="must be finite, got inf for task 0"):
        method.weights([float("inf"), 1.0])
    if method.state_keys and name not in ("rlw", "stch"):
        method.weights(torch.tensor([1.0, 2.0]))
        with pytest.raises(ValueError, match="holds state for 2 tasks but got 3"):
            method.weights(torch.tensor([1.0, 2.0, 3.0]))


def test_update_misuse_and_task_weights_are_refused():
    with pytest.raises(TypeError, match="does not learn from the losses after the step"):
        mtl_opt.get_aggregator("uw").update([1.0, 2.0])
    with pytest.raises(RuntimeError, match="needs a step first"):
        mtl_opt.get_aggregator("famo").update([1.0, 2.0])
    net = _Net()
    with pytest.raises(ValueError, match="no per-task weights"):
        mtl_opt.mtl_backward(net.losses(*_batch(0)), net.trunk, mtl_opt.get_aggregator("uw"),
                             task_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="epoch_length"):
        mtl_opt.get_aggregator("dwa", epoch_length=0)


def test_loss_weightings_are_loss_weightings():
    for name in LOSS_WEIGHTINGS:
        agg = mtl_opt.get_aggregator(name)
        assert isinstance(agg, LossWeighting) and agg.needs_jacobian is False
    assert mtl_opt.get_aggregator("ls").needs_jacobian is False
    assert mtl_opt.get_aggregator("mgda").needs_jacobian is True


# ------------------------------------------------------------------------------ the runner
@pytest.mark.parametrize("name", ["famo", "dwa", "stch", "uw", "rlw"])
def test_runner_batches_loss_weightings_like_separate_runs(name):
    starts = torch.tensor([[-8.5, 7.5], [9.0, -1.0]], dtype=torch.float64)
    spec = name + (":seed=1" if name == "rlw" else "")
    both = run_method("toy", spec, starts=starts, steps=60, record_every=20)
    for s in range(2):
        one = run_method("toy", spec, starts=starts[s:s + 1], steps=60, record_every=20)
        assert torch.equal(both.x[s], one.x[0])


def test_runner_gives_famo_the_losses_after_each_step():
    from mtl_opt.problems import problem_from_spec

    prob = problem_from_spec("toy")
    start = torch.tensor([[-8.5, 7.5]], dtype=torch.float64)
    got = run_method("toy", "famo:w_lr=0.5", starts=start, steps=5, record_every=5, optimizer="sgd", lr=0.01)
    # By hand: the same SGD steps with FAMO's weights and post-step updates on F − floor.
    famo = mtl_opt.get_aggregator("famo", w_lr=0.5)
    x = start.clone()
    floor = prob.loss_floor()
    for _ in range(5):
        F, J = prob.losses_and_jacobian(x)
        w = famo.batch_weights(F - floor)
        x = x - 0.01 * torch.einsum("bk,bkd->bd", w, J)
        famo.batch_update(prob.losses(x) - floor)
    torch.testing.assert_close(got.x, x, rtol=1e-12, atol=1e-12)
