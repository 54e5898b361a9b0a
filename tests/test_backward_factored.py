"""mtl_backward with factored linear layers: the Gramian share and the update of a shared
linear weight from its inputs X and output gradients Δ, ``⟨Δ_iᵀX, Δ_jᵀX⟩ = Σ (Δ_iΔ_jᵀ) ⊙ (XXᵀ)``,
checked against the explicit Jacobian and against ``factor_linear=False`` (every Jacobian row)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import mtl_opt
import mtl_opt._layerwise as layerwise
from mtl_opt import BatchedJacobianFallbackWarning, mtl_backward

from _mtl_models import (
    RunningNormWeights,
    SignAgreement,
    SparseEmbeddingNet,
    explicit_jacobian,
    flat_grad,
    token_batch,
)

# Gramian weightings that read the Jacobian: their update βᵀG can be factored. Linear
# scalarization and the loss weightings take one backward pass of the weighted sum instead
# (tests/test_loss_weightings.py); element-wise methods (GradDrop, DB-MTL, MoCo) read the
# Jacobian's rows and always get them.
METHODS = [n for n in mtl_opt.available_aggregators()
           if issubclass(mtl_opt.registry.aggregator_class(n), mtl_opt.GramianAggregator)
           and mtl_opt.registry.aggregator_class(n).needs_jacobian]
ELEMENTWISE = [n for n in mtl_opt.available_aggregators()
               if not issubclass(mtl_opt.registry.aggregator_class(n), mtl_opt.GramianAggregator)
               and mtl_opt.registry.aggregator_class(n).needs_jacobian]


@pytest.fixture
def always_factor(monkeypatch):
    """Factor every qualifying layer, however small (the cost rule would keep the tiny test
    layers' Jacobian rows, which are cheaper there)."""
    monkeypatch.setattr(layerwise, "_FLOAT64_COST", 0.0)


def _init(module: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return module.to(dtype)


class MLP(nn.Module):
    """Linear, LayerNorm (kept as rows), a bias-free Linear, and three task heads."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(5, 9), nn.LayerNorm(9), nn.Tanh(), nn.Linear(9, 7, bias=False), nn.GELU(),
            nn.Linear(7, 6),
        )
        self.heads = nn.ModuleList([nn.Linear(6, 2) for _ in range(3)])
        _init(self, 0, dtype)
        self.dtype = dtype

    def losses(self, seed: int = 1) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(6, 5, generator=g, dtype=torch.float64).to(self.dtype)
        z = self.trunk(x)
        return [(h(z) - k).pow(2).mean() * (k + 1) for k, h in enumerate(self.heads)]

    n_factored = 3  # the three weights (biases and the LayerNorm keep their rows)


class Sequence(nn.Module):
    """Linear layers over (batch, time, features), one of them applied at two places."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.mix = nn.Linear(8, 8)  # used twice
        self.head_a = nn.Linear(8, 1)
        self.head_b = nn.Linear(8, 3)
        _init(self, 2, dtype)
        self.dtype = dtype

    def shared(self) -> list[Tensor]:
        return [*self.embed.parameters(), *self.mix.parameters()]

    def losses(self, seed: int = 3) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64).to(self.dtype)
        h = torch.tanh(self.mix(torch.tanh(self.mix(self.embed(x)))))
        return [self.head_a(h).pow(2).mean(), (self.head_b(h[:, -1]) - 1).pow(2).mean()]

    n_factored = 2  # embed.weight and mix.weight


def _run(model, shared, method, *, factor_linear=True, **kw):
    for p in model.parameters():
        p.grad = None
    if not isinstance(method, mtl_opt.GradientAggregator):
        torch.manual_seed(0)  # methods that draw their seed draw the same one for both paths
    agg = method if isinstance(method, mtl_opt.GradientAggregator) else mtl_opt.get_aggregator(method)
    result = mtl_backward(model.losses(), shared, agg, factor_linear=factor_linear, **kw)
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ELEMENTWISE)
def test_elementwise_methods_get_the_jacobian_rows(always_factor, method):
    model = MLP(torch.float64)
    shared = list(model.trunk.parameters())
    results = []
    for factor_linear in (False, True):
        results.append(_run(model, shared, method, factor_linear=factor_linear))
    (rows, rows_grads), (fact, fact_grads) = results
    assert rows.factored_params == 0 and fact.factored_params == 0
    for name, g in rows_grads.items():
        torch.testing.assert_close(fact_grads[name], g, rtol=1e-12, atol=1e-12)


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("make", [MLP, Sequence])
def test_factored_path_matches_the_jacobian_rows(always_factor, make, dtype, method):
    model = make(dtype)
    shared = list(model.trunk.parameters()) if make is MLP else model.shared()
    rows, rows_grads = _run(model, shared, method, factor_linear=False)
    fact, fact_grads = _run(model, shared, method)
    assert rows.factored_params == 0 and fact.factored_params == make.n_factored
    assert fact.batched

    # The Gramian against the explicit Jacobian (one autograd call per task, float64).
    J = explicit_jacobian(model.losses(), shared).double()
    torch.testing.assert_close(fact.gramian, J @ J.T, **_tol(dtype))
    torch.testing.assert_close(fact.gramian, rows.gramian, **_tol(dtype))
    torch.testing.assert_close(fact.weights, rows.weights, **_tol(dtype))
    assert fact_grads.keys() == rows_grads.keys() == {n for n, _ in model.named_parameters()}
    for name in rows_grads:
        assert fact_grads[name].dtype == dtype and fact_grads[name].shape == rows_grads[name].shape
        torch.testing.assert_close(fact_grads[name], rows_grads[name], **_tol(dtype), msg=name)
    torch.testing.assert_close(fact.direction, rows.direction, **_tol(dtype))
    # The update is βᵀG, with the weights the method returned.
    beta = fact.weights.to(dtype)
    torch.testing.assert_close(flat_grad(shared), beta @ J.to(dtype), **_tol(dtype))


def test_default_cost_rule_factors_wide_layers_and_keeps_long_sequences(monkeypatch):
    """Factored when 2·(N² in + K² N² out) ≤ K·N·in·out: a 128-wide layer over 4 rows is, a
    16-wide layer over 200 rows is not (its N × N products would cost more than its rows)."""
    torch.manual_seed(0)
    wide, narrow = nn.Linear(128, 128).double(), nn.Linear(16, 16).double()
    xw, xn = torch.randn(4, 128, dtype=torch.float64), torch.randn(200, 16, dtype=torch.float64)

    def losses():
        zw, zn = torch.tanh(wide(xw)), torch.tanh(narrow(xn))
        return [zw.pow(2).mean() + zn.mean(), zw.mean() + zn.pow(2).mean()]

    shared = [*wide.parameters(), *narrow.parameters()]
    result = mtl_backward(losses(), shared, mtl_opt.get_aggregator("mgda"))
    assert result.factored_params == 1  # the wide weight
    J = explicit_jacobian(losses(), shared)
    torch.testing.assert_close(result.gramian, J @ J.T, rtol=1e-10, atol=1e-12)


def test_parameters_used_any_other_way_keep_their_rows(always_factor):
    """A weight tied to an embedding, an addmm with alpha ≠ 1, a weight multiplied untransposed
    and a bias added outside the product are not factored; the gradients stay exact."""
    torch.manual_seed(0)
    tied = nn.Linear(6, 5).double()  # weight (5, 6): also an embedding table of 5 tokens
    scaled = nn.Linear(6, 6).double()
    plain = nn.Linear(6, 6).double()  # factored: the control
    raw = nn.Parameter(torch.randn(6, 6, dtype=torch.float64))  # used as x @ raw
    extra_bias = nn.Parameter(torch.randn(6, dtype=torch.float64))
    tokens = torch.tensor([0, 3, 4, 1])
    x = torch.randn(4, 6, dtype=torch.float64)

    def losses():
        h = torch.tanh(F.embedding(tokens, tied.weight) + x)
        h = torch.tanh(torch.addmm(scaled.bias, h, scaled.weight.t(), alpha=2.0))
        h = torch.tanh(plain(h) @ raw + extra_bias)
        logits = tied(h)
        return [logits.pow(2).mean(), (logits[:, 0] - 1).pow(2).mean()]

    shared = [*tied.parameters(), *scaled.parameters(), *plain.parameters(), raw, extra_bias]
    for method in METHODS:
        agg = mtl_opt.get_aggregator(method)
        result = mtl_backward(losses(), shared, agg)
        assert result.factored_params == 1, method  # plain.weight only
        got = flat_grad(shared)
        J = explicit_jacobian(losses(), shared)
        torch.testing.assert_close(result.gramian, J @ J.T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got, result.weights @ J, rtol=1e-10, atol=1e-12)
        for p in shared:
            p.grad = None


def test_multihead_attention_output_projection_is_factored(always_factor):
    """nn.MultiheadAttention projects self-attention inputs with its packed in_proj weight in one
    product and calls F.linear with out_proj: both weights are factored."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)

    def losses():
        y, _ = attn(x, x, x)
        return [y.pow(2).mean(), y[..., :3].sum(), torch.tanh(y).mean()]

    shared = list(attn.parameters())
    result = mtl_backward(losses(), attn, mtl_opt.get_aggregator("cagrad"))
    assert result.factored_params == 2
    J = explicit_jacobian(losses(), shared)
    torch.testing.assert_close(result.gramian, J @ J.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_grad(shared), result.weights @ J, rtol=1e-10, atol=1e-12)


def test_accumulates_into_existing_grad_and_advances_state_once(always_factor):
    model = MLP()
    shared = list(model.trunk.parameters())
    agg_rows, agg_fact = RunningNormWeights(), RunningNormWeights()
    _run(model, shared, agg_rows, factor_linear=False)
    mtl_backward(model.losses(), shared, agg_rows, factor_linear=False)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    _run(model, shared, agg_fact)
    result = mtl_backward(model.losses(), shared, agg_fact)
    assert result.factored_params == MLP.n_factored
    assert agg_fact._steps == agg_rows._steps == 2
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_non_finite_layer_gradient_names_the_task_rows(always_factor):
    """A finite loss whose gradient is NaN (√(u²) at u = 0): the same error on both paths."""
    model = MLP()
    shared = list(model.trunk.parameters())
    messages = []
    for factor_linear in (False, True):
        losses = model.losses()
        u = losses[1] - losses[1].detach()
        losses[1] = losses[1] + torch.sqrt(u * u)
        with pytest.raises(ValueError, match=r"the Jacobian is not finite: task row\(s\) \[.*1") as info:
            mtl_backward(losses, shared, mtl_opt.get_aggregator("mgda"), factor_linear=factor_linear)
        messages.append(str(info.value))
        assert all(p.grad is None for p in model.parameters())  # nothing written
    assert messages[0] == messages[1]


def test_overflowing_layer_gramian_is_reported(always_factor):
    layer = nn.Linear(3, 3).double()
    x = torch.full((2, 3), 1e160, dtype=torch.float64)
    y = layer(x)
    with pytest.raises(ValueError, match="overflows float64"):
        mtl_backward([y.sum(), y[:, 0].sum()], layer, mtl_opt.get_aggregator("mgda"))


def test_loop_fallback_and_non_gramian_methods_use_the_rows(always_factor):
    model = MLP()
    shared = list(model.trunk.parameters())
    loop, loop_grads = _run(model, shared, "mgda", parallel=False)
    fact, fact_grads = _run(model, shared, "mgda")
    assert loop.factored_params == 0 and not loop.batched
    assert fact.factored_params == MLP.n_factored
    for name in loop_grads:
        torch.testing.assert_close(fact_grads[name], loop_grads[name], rtol=1e-10, atol=1e-12)

    result, _ = _run(model, shared, SignAgreement())  # needs G itself, not its Gramian
    assert result.factored_params == 0

    # A graph the batched call cannot run (a custom backward that reads a value) falls back to
    # the loop, which has no factored layers.
    net = SparseEmbeddingNet(custom=True, dtype=torch.float64)
    tokens, y = token_batch(dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = mtl_backward(net.losses(tokens, y), net.shared(), mtl_opt.get_aggregator("mgda"))
    assert any(issubclass(w.category, BatchedJacobianFallbackWarning) for w in caught)
    assert result.factored_params == 0 and result.fallback_reason is not None


def test_frozen_inputs_and_unreached_layers(always_factor):
    """A first layer (its input needs no gradient, so autograd saves no mat2) is factored; a
    shared layer no loss reaches still raises, naming it."""
    first, unused = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    z = torch.tanh(first(x))
    result = mtl_backward([z.sum(), z.pow(2).sum()], first, mtl_opt.get_aggregator("mgda"))
    assert result.factored_params == 1
    z = torch.tanh(first(x))
    with pytest.raises(ValueError, match="not reached by any loss"):
        mtl_backward(
            [z.sum(), z.pow(2).sum()], [*first.parameters(), *unused.parameters()],
            mtl_opt.get_aggregator("mgda"),
        )


def test_factor_linear_must_be_a_bool():
    layer = nn.Linear(2, 2)
    y = layer(torch.ones(1, 2))
    with pytest.raises(TypeError, match="factor_linear must be a bool"):
        mtl_backward([y.sum(), y[0, 0]], layer, mtl_opt.get_aggregator("mgda"), factor_linear=1)


def test_multitask_optimizer_passes_factor_linear_on(always_factor):
    model = MLP()
    for factor_linear, expected in ((True, MLP.n_factored), (False, 0)):
        opt = mtl_opt.MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), mtl_opt.get_aggregator("mgda"),
            model.trunk, factor_linear=factor_linear,
        )
        opt.zero_grad()
        opt.step(model.losses())
        assert opt.last_result.factored_params == expected
    with pytest.raises(TypeError, match="factor_linear must be a bool"):
        mtl_opt.MultiTaskOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), mtl_opt.get_aggregator("mgda"),
            model.trunk, factor_linear="yes",
        )


def test_checkpointed_layers_and_autocast_casts_keep_rows(always_factor):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh()).double()
    x = torch.randn(5, 6, dtype=torch.float64)

    def losses():
        z = checkpoint(enc, x, use_reentrant=False)  # saved inputs are recomputed on unpacking
        return [z.pow(2).mean(), z[:, 0].sum(), torch.sin(z).mean()]

    # Reading X would recompute the checkpointed segment ahead of the backward pass.
    result = mtl_backward(losses(), enc, mtl_opt.get_aggregator("cagrad"))
    assert result.factored_params == 0
    J = explicit_jacobian(losses(), list(enc.parameters()))
    torch.testing.assert_close(result.gramian, J @ J.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_grad(enc.parameters()), result.weights @ J, rtol=1e-10, atol=1e-12)

    # Under autocast the weight reaches the product through a cast: it keeps its rows.
    layer = nn.Linear(8, 8)
    xf = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xf).float()
    result = mtl_backward([y.pow(2).mean(), y.mean()], layer, mtl_opt.get_aggregator("mgda"))
    assert result.factored_params == 0


def test_a_parameter_with_tensor_hooks_keeps_its_rows(always_factor):
    """Tensor hooks see the parameter's (batched) gradient, which a factored weight never gets."""
    layer = nn.Linear(4, 4).double()
    seen = []
    layer.weight.register_hook(lambda g: seen.append(tuple(g.shape)))
    y = torch.tanh(layer(torch.randn(3, 4, dtype=torch.float64)))
    result = mtl_backward([y.sum(), y.pow(2).sum()], layer, mtl_opt.get_aggregator("mgda"))
    assert result.factored_params == 0  # nor its bias: no Δ is taken at that layer
    assert seen  # the hook ran (inside vmap it sees one task's (4, 4) gradient)


def _two_layers(bias: bool = True):
    torch.manual_seed(0)
    return nn.Linear(6, 6, bias=bias).double(), nn.Linear(6, 6, bias=bias).double()


def test_a_hook_that_changes_a_factored_layers_output_gradient_raises(always_factor):
    """Autograd hands the factored path Δ before a hook on the layer's output runs; the bias
    rows (computed after it) expose the hook, and the call raises instead of ignoring it."""
    l1, l2 = _two_layers()
    x = torch.randn(4, 6, dtype=torch.float64)

    def losses(hook):
        y = l2(torch.tanh(l1(x)))
        y.register_hook(hook)
        return [y.pow(2).mean(), y[:, 0].sum(), torch.sin(y).mean()]

    shared = [*l1.parameters(), *l2.parameters()]
    with pytest.raises(RuntimeError, match=r"hook on the output of the linear layer with bias shared parameter #3"):
        mtl_backward(losses(lambda g: 3.0 * g), shared, mtl_opt.get_aggregator("mgda"))
    assert all(p.grad is None for p in shared)
    for p in shared:
        p.grad = None
    rows = mtl_backward(losses(lambda g: 3.0 * g), shared, mtl_opt.get_aggregator("mgda"),
                        factor_linear=False)
    J = explicit_jacobian(losses(lambda g: 3.0 * g), shared)
    torch.testing.assert_close(rows.gramian, J @ J.T, rtol=1e-10, atol=1e-12)

    # A hook that only reads the gradient (logging) changes nothing: factored as usual.
    for p in shared:
        p.grad = None
    seen = []
    result = mtl_backward(losses(lambda g: seen.append(1)), shared, mtl_opt.get_aggregator("mgda"))
    assert seen and result.factored_params == 2
    J = explicit_jacobian(losses(lambda g: None), shared)
    torch.testing.assert_close(result.gramian, J @ J.T, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_layers_with_no_rows_sparse_inputs_and_undefined_gradients(always_factor):
    l1, l2 = _two_layers()
    shared = [*l1.parameters(), *l2.parameters()]
    x = torch.randn(4, 6, dtype=torch.float64)

    # An expert that receives no rows this step (N = 0) keeps its (zero) rows.
    def empty_expert():
        h = torch.tanh(l1(x))
        return [h.pow(2).mean() + l2(h[:0]).sum(), h.sum()]

    # A sparse CSR input: X cannot be multiplied as a dense matrix here.
    def csr_input():
        h = torch.tanh(torch.mm(x.to_sparse_csr(), l1.weight.t()) + l1.bias)
        y = l2(h)
        return [y.pow(2).mean(), y.sum()]

    class NoGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    # A use of l2 whose output gradient is undefined (a backward that returns None).
    def undefined():
        h = torch.tanh(l1(x))
        y = l2(h) + NoGradient.apply(l2(2 * h))
        return [y.pow(2).mean(), y.sum()]

    for make in (empty_expert, csr_input, undefined):
        for p in shared:
            p.grad = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = mtl_backward(make(), shared, mtl_opt.get_aggregator("mgda"), parallel="auto")
        # The CSR input keeps l1's rows, whose batched call has no sparse rule: the loop runs.
        fell_back = any(issubclass(w.category, BatchedJacobianFallbackWarning) for w in caught)
        assert fell_back == (make is csr_input) and result.batched == (make is not csr_input)
        J = explicit_jacobian(make(), shared)
        torch.testing.assert_close(result.gramian, J @ J.T, rtol=1e-10, atol=1e-12, msg=make.__name__)
        torch.testing.assert_close(flat_grad(shared), result.weights @ J, rtol=1e-10, atol=1e-12)


def test_saved_tensor_hooks_are_not_run_ahead_of_the_backward_pass(always_factor):
    """A pack/unpack pair that allows one unpack (an offloading buffer): planning must not read
    X through it, so the layer keeps its rows and the backward pass unpacks once."""
    l1, l2 = _two_layers()
    x = torch.randn(4, 6, dtype=torch.float64)
    unpacked = []

    def pack(t):
        return [t]

    def unpack(box):
        if not box:
            raise RuntimeError("buffer already released")
        unpacked.append(1)
        return box.pop()

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = l2(torch.tanh(l1(x)))
    result = mtl_backward([y.pow(2).mean(), y.sum()], [*l1.parameters(), *l2.parameters()],
                          mtl_opt.get_aggregator("mgda"), parallel=True)
    assert result.factored_params == 0 and unpacked
