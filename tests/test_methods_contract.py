"""The aggregator contract, checked for every registered method (methods added later included).

Each method is built with its defaults (plus ``seed=0`` where it takes a seed); methods that use
task losses get positive losses. A few extra configurations of the built-in methods ride along.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import mtl_opt
from mtl_opt.registry import aggregator_class

# Extra configurations beyond the defaults (name, hyperparameters).
EXTRA_SPECS = [
    ("pcgrad", {"order": "fixed"}),
    ("mgda", {"normalization": "l2"}),
    ("mgda", {"normalization": "loss"}),
    ("mgda", {"normalization": "loss+"}),
    ("cagrad", {"c": 0.0}),
    ("cagrad", {"c": 1.5, "rescale": 2}),
    ("came_grad", {"task_weights": [1.0, 4.0, 2.0]}),
    ("came_grad", {"rectify": False, "inject": False, "fuse": False}),
    ("graddrop", {"leak": [0.2, 0.0, 1.0]}),
    ("db_mtl", {"beta_sigma": 0.5}),
    ("moco", {"normalization": "loss+"}),
    ("moco", {"normalization": "l2", "beta_sigma": 0.5, "gamma_sigma": 0.5}),
    ("pcd", {"tau": 0.5, "beta": 0.9}),
    ("gradnorm", {"update": "sgd", "lr": 0.001}),
]
SPECS = [(name, {}) for name in mtl_opt.available_aggregators()] + [
    s for s in EXTRA_SPECS if s[0] in mtl_opt.available_aggregators()
]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in SPECS]
K_TASKS = 3


def make(name: str, kw: dict) -> mtl_opt.GradientAggregator:
    """A fresh, reproducibly seeded instance."""
    kw = dict(kw)
    params = inspect.signature(aggregator_class(name).__init__).parameters
    if "seed" in params and "seed" not in kw:
        kw["seed"] = 0
    torch.manual_seed(1234)
    return mtl_opt.get_aggregator(name, **kw)


def call(agg, G, **extra):
    """Call ``agg`` with positive losses when the method uses them."""
    if agg.uses_losses and "losses" not in extra:
        extra["losses"] = torch.linspace(0.5, 2.0, G.shape[0], dtype=torch.float64)
    return agg(G, **extra)


def jacobian(K=K_TASKS, d=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, d, generator=g, dtype=torch.float64).to(dtype)


spec_params = pytest.mark.parametrize("name,kw", SPECS, ids=IDS)
# The Gramian weightings, whose public `weights(M)` takes a Gramian.
gramian_spec_params = pytest.mark.parametrize(
    "name,kw",
    [s for s in SPECS if issubclass(aggregator_class(s[0]), mtl_opt.GramianAggregator)],
    ids=[i for s, i in zip(SPECS, IDS) if issubclass(aggregator_class(s[0]), mtl_opt.GramianAggregator)],
)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@spec_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_shape_dtype_device_finite(name, kw, dtype, device):
    G = jacobian(dtype=dtype).to(device)
    out = call(make(name, kw), G)
    assert out.shape == (G.shape[1],)
    assert out.dtype == dtype and out.device == G.device
    assert torch.isfinite(out).all()


@spec_params
def test_deterministic_under_a_seed(name, kw):
    outs = []
    for _ in range(2):
        agg = make(name, kw)
        outs.append([call(agg, jacobian(K=K_TASKS, seed=s)) for s in range(3)])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@spec_params
def test_state_dict_round_trip_and_reset(name, kw):
    agg = make(name, kw)
    first = call(agg, jacobian(K=K_TASKS, seed=1))
    call(agg, jacobian(K=K_TASKS, seed=2))
    state = copy.deepcopy(agg.state_dict())
    expected = call(agg, jacobian(K=K_TASKS, seed=3))
    other = make(name, kw)
    other.load_state_dict(state)
    assert torch.equal(call(other, jacobian(K=K_TASKS, seed=3)), expected)
    agg.reset()
    assert torch.equal(call(agg, jacobian(K=K_TASKS, seed=1)), first)


@spec_params
def test_repr_shows_hyperparameters(name, kw):
    agg = make(name, kw)
    text = repr(agg)
    assert text.startswith(type(agg).__name__ + "(")
    for key in agg.hyperparameters():
        assert f"{key}=" in text
    for key, value in kw.items():
        assert f"{key}={value!r}" in text


# Configurations with fixed per-task values (task weights, leaks) only make sense at their own K.
PER_TASK_KEYS = ("task_weights", "leak")
BATCH_CASES = [
    (name, kw, K)
    for (name, kw) in SPECS
    for K in [1, 2, 3, 5]
    if all(key not in kw or len(kw[key]) == K for key in PER_TASK_KEYS)
]


@pytest.mark.parametrize(
    "name,kw,K", BATCH_CASES,
    ids=[n + "".join(f"-{k}={v}" for k, v in kw.items()) + f"-K{K}" for n, kw, K in BATCH_CASES],
)
def test_batch_equals_loop_of_single_calls(name, kw, K):
    g = torch.Generator().manual_seed(K)
    G = torch.randn(4, K, 6, generator=g, dtype=torch.float64)
    G[1, 0] = 0.0  # a zero row in one entry
    losses = torch.rand(4, K, generator=g, dtype=torch.float64) + 0.5
    batch_agg = make(name, kw)
    extra = {"losses": losses} if batch_agg.uses_losses else {}
    batched = batch_agg.aggregate_batch(G, **extra)
    for b in range(G.shape[0]):
        single_extra = {"losses": losses[b]} if batch_agg.uses_losses else {}
        single = make(name, kw)(G[b], **single_extra)
        torch.testing.assert_close(batched[b], single, rtol=1e-12, atol=1e-12)


@spec_params
def test_bad_input_raises_one_clear_error(name, kw):
    agg = make(name, kw)
    G = jacobian()
    bad = G.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"\[1\]"):
        call(agg, bad)
    with pytest.raises(ValueError, match="K = 0"):
        call(agg, torch.zeros(0, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        agg(torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="task"):
        call(agg, G, task_weights=[1.0] * (G.shape[0] + 1))
    bad_batch = torch.randn(3, G.shape[0], 5, dtype=torch.float64)
    bad_batch[2, 0, 1] = float("inf")
    extra = {"losses": torch.ones(3, G.shape[0], dtype=torch.float64)} if agg.uses_losses else {}
    with pytest.raises(ValueError, match="not finite"):
        agg.aggregate_batch(bad_batch, **extra)


LOSS_SPECS = [(name, kw) for (name, kw) in SPECS if make(name, kw).requires_losses]


def test_some_configurations_need_losses():
    assert LOSS_SPECS, "the contract must exercise at least one method that requires losses"


@pytest.mark.parametrize("name,kw", LOSS_SPECS,
                         ids=[n + "".join(f"-{k}={v}" for k, v in kw.items()) for n, kw in LOSS_SPECS])
def test_missing_losses_are_reported(name, kw):
    agg = make(name, kw)
    with pytest.raises(ValueError, match="losses"):
        agg(jacobian())


def _losses_for(agg, K, B=None):
    if not agg.uses_losses:
        return {}
    row = torch.linspace(0.5, 2.0, K, dtype=torch.float64)
    return {"losses": row if B is None else row.expand(B, K).clone()}


@gramian_spec_params
def test_weights_and_batch_weights_equal_the_beta_of_aggregate(name, kw):
    # `weights(M)` is the public method of every Gramian method: no attribute may shadow it.
    G = jacobian()
    M = G @ G.T
    agg = make(name, kw)
    beta = agg.aggregate(G, **_losses_for(agg, G.shape[0])).weights
    single = make(name, kw).weights(M, **_losses_for(agg, G.shape[0]))
    batch = make(name, kw).batch_weights(M[None], **_losses_for(agg, G.shape[0], B=1))
    torch.testing.assert_close(single, beta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batch[0], beta, rtol=1e-12, atol=1e-12)


@spec_params
def test_jacobian_that_requires_grad_is_differentiable_with_constant_weights(name, kw):
    G = jacobian().requires_grad_(True)
    agg = make(name, kw)
    res = agg.aggregate(G, **_losses_for(agg, G.shape[0]))
    (grad,) = torch.autograd.grad(res.direction.sum(), G)
    if res.weights is not None:  # d = βᵀG with β constant: ∂(Σ_k d_k)/∂G_ik = β_i
        torch.testing.assert_close(grad, res.weights[:, None].expand_as(G), rtol=1e-12, atol=1e-12)
    Gb = torch.stack([jacobian(seed=1), jacobian(seed=2)]).requires_grad_(True)
    batch_agg = make(name, kw)
    out = batch_agg.aggregate_batch(Gb, **_losses_for(batch_agg, Gb.shape[1], B=2))
    (grad_b,) = torch.autograd.grad(out.sum(), Gb)
    assert torch.isfinite(grad_b).all()
    if isinstance(batch_agg, mtl_opt.GramianAggregator):
        Gd = Gb.detach()
        betas = make(name, kw).batch_weights(
            Gd @ Gd.transpose(1, 2), **_losses_for(batch_agg, Gb.shape[1], B=2)
        )
        torch.testing.assert_close(grad_b, betas[:, :, None].expand_as(Gb), rtol=1e-12, atol=1e-12)
