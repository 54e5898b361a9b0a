"""mtl_backward: Jacobian, aggregation, routing of gradients, fallback and input checks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mtl_opt
from mtl_opt import BatchedJacobianFallbackWarning, mtl_backward
from mtl_opt.methods import CAMEGrad, LinearScalarization, MGDA, PCGrad

from _mtl_models import (
    FixedWeights,
    RecordingWeights,
    SignAgreement,
    SparseEmbeddingNet,
    TwoHeadNet,
    UnitNormSum,
    batch,
    explicit_jacobian,
    flat_grad,
    token_batch,
)

DTYPES = [torch.float32, torch.float64]


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------
# Linear scalarization is the weighted-sum backward, for every parameter
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parallel", ["auto", False])
def test_ls_equals_weighted_sum_backward_for_every_parameter(dtype, parallel):
    w = [0.7, 2.5]
    net, (x, y) = TwoHeadNet(dtype=dtype), batch(dtype=dtype)
    (torch.tensor(w, dtype=dtype) * torch.stack(net.losses(x, y))).sum().backward()
    expected = grads_of(net)
    net.zero_grad(set_to_none=True)

    result = mtl_backward(net.losses(x, y), net.trunk, LinearScalarization(w), parallel=parallel)
    got = grads_of(net)
    assert set(got) == set(expected) == {n for n, _ in net.named_parameters()}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], **tol(dtype), msg=name)
        assert got[name].dtype == dtype
    assert result.loss_weights.tolist() == w
    assert result.weights.tolist() == w


@pytest.mark.parametrize("dtype", DTYPES)
def test_ls_with_task_params_and_call_weights_equals_weighted_sum(dtype):
    w = [3.0, 0.25]
    net, (x, y) = TwoHeadNet(dtype=dtype), batch(dtype=dtype)
    (torch.tensor(w, dtype=dtype) * torch.stack(net.losses(x, y))).sum().backward()
    expected = grads_of(net)
    net.zero_grad(set_to_none=True)
    mtl_backward(
        net.losses(x, y), net.trunk, LinearScalarization(), task_params=[net.head_a, net.head_b],
        task_weights=w,
    )
    for name, g in grads_of(net).items():
        torch.testing.assert_close(g, expected[name], **tol(dtype), msg=name)


# --------------------------------------------------------------------------------------------
# The direction is the aggregator applied to the explicit Jacobian
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "make",
    [
        lambda: FixedWeights([0.3, 1.7]), UnitNormSum, SignAgreement, lambda: LinearScalarization([2.0, 1.0]),
        lambda: CAMEGrad(task_weights=[1, 4]), lambda: MGDA("loss"), lambda: PCGrad(order="fixed"),
    ],
    ids=["fixed", "unit_norm", "sign_agreement", "ls", "came_grad", "mgda_loss", "pcgrad"],
)
def test_direction_is_aggregator_of_explicit_jacobian(dtype, make):
    net, (x, y) = TwoHeadNet(dtype=dtype), batch(dtype=dtype)
    shared = list(net.trunk.parameters())
    losses = net.losses(x, y)
    G = explicit_jacobian(losses, shared)
    agg = make()
    expected = agg(G, losses=torch.stack(losses).detach())
    result = mtl_backward(losses, shared, agg)
    torch.testing.assert_close(flat_grad(shared), expected, **tol(dtype))
    torch.testing.assert_close(result.direction, expected, **tol(dtype))
    if not agg.needs_jacobian:  # one backward pass of Σ w_i L_i: no Jacobian diagnostics
        assert result.gramian is None and result.grad_norms is None and result.cosines is None
        return
    # Diagnostics come from the Gramian of the same Jacobian.
    G64 = G.double()
    norms = G64.norm(dim=1)
    torch.testing.assert_close(result.grad_norms, norms, rtol=1e-5, atol=1e-7)
    cos = (G64 @ G64.T) / (norms[:, None] * norms[None, :])
    torch.testing.assert_close(result.cosines, cos, rtol=1e-5, atol=1e-6)
    assert result.level == "parameters" and result.batched is True


@pytest.mark.parametrize("dtype", DTYPES)
def test_heads_receive_loss_weighted_gradient(dtype):
    """Without task_params every non-shared parameter gets Σ h_i ∇L_i, h = ones here."""
    net, (x, y) = TwoHeadNet(dtype=dtype), batch(dtype=dtype)
    losses = net.losses(x, y)
    heads = [*net.head_a.parameters(), *net.head_b.parameters()]
    expected = torch.autograd.grad(losses[0] + losses[1], heads, retain_graph=True)
    result = mtl_backward(losses, net.trunk, UnitNormSum())
    assert result.loss_weights.tolist() == [1.0, 1.0]
    for p, e in zip(heads, expected):
        torch.testing.assert_close(p.grad, e, **tol(dtype))


def test_loss_weights_precedence():
    assert mtl_opt.loss_weights(LinearScalarization([2.0, 3.0]), 2).tolist() == [2.0, 3.0]
    assert mtl_opt.loss_weights(LinearScalarization([2.0, 3.0]), 2, [1, 4]).tolist() == [1.0, 4.0]
    assert mtl_opt.loss_weights(LinearScalarization(), 3).tolist() == [1.0, 1.0, 1.0]
    assert mtl_opt.loss_weights(UnitNormSum(), 2).tolist() == [1.0, 1.0]

    class OwnWeights(UnitNormSum):
        def loss_weights(self, n_tasks):
            return [0.5] * n_tasks

    assert mtl_opt.loss_weights(OwnWeights(), 2).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="no per-task weights"):
        mtl_opt.loss_weights(UnitNormSum(), 2, [1, 4])
    with pytest.raises(ValueError, match="3 entries but there are 2 tasks"):
        mtl_opt.loss_weights(LinearScalarization([1.0, 2.0, 3.0]), 2)


# --------------------------------------------------------------------------------------------
# Batched and looped Jacobians agree; the fallback is automatic on a graph that breaks vmap
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_and_loop_paths_agree(dtype):
    results = {}
    for parallel in (True, False):
        net, (x, y) = TwoHeadNet(dtype=dtype), batch(dtype=dtype)
        r = mtl_backward(net.losses(x, y), net.trunk, UnitNormSum(), task_params=[net.head_a, net.head_b],
                         parallel=parallel)
        assert r.batched is parallel and r.fallback_reason is None
        results[parallel] = (grads_of(net), r)
    (g1, r1), (g0, r0) = results[True], results[False]
    assert set(g1) == set(g0)
    for name in g1:
        torch.testing.assert_close(g1[name], g0[name], **tol(dtype), msg=name)
    torch.testing.assert_close(r1.gramian, r0.gramian, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("custom", [False, True], ids=["sparse_embedding", "custom_function"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_falls_back_on_a_model_that_breaks_batching(custom, dtype):
    net, (tokens, y) = SparseEmbeddingNet(dtype=dtype, custom=custom), token_batch(dtype=dtype)
    # The batched path really fails on this model ...
    with pytest.raises(RuntimeError, match="parallel="):
        mtl_backward(net.losses(tokens, y), net.shared(), UnitNormSum(), parallel=True)
    assert all(p.grad is None for p in net.parameters())  # nothing written on failure

    # ... and "auto" falls back, warns, says why, and gives the explicit-loop answer.
    losses = net.losses(tokens, y)
    G = explicit_jacobian(losses, net.shared())
    expected_heads = torch.autograd.grad(
        losses[0] + losses[1], [*net.head_a.parameters(), *net.head_b.parameters()], retain_graph=True
    )
    with pytest.warns(BatchedJacobianFallbackWarning, match="separate backward passes") as record:
        result = mtl_backward(losses, net.shared(), UnitNormSum())
    assert record[0].filename == __file__  # the warning points at the caller's line
    assert result.batched is False and result.fallback_reason
    torch.testing.assert_close(flat_grad(net.shared()), UnitNormSum()(G), **tol(dtype))
    for p, e in zip([*net.head_a.parameters(), *net.head_b.parameters()], expected_heads):
        torch.testing.assert_close(p.grad.to_dense(), e.to_dense(), **tol(dtype))


def test_fallback_ls_matches_weighted_sum_backward_with_sparse_gradients():
    w = [0.5, 3.0]
    net, (tokens, y) = SparseEmbeddingNet(), token_batch()
    (torch.tensor(w) * torch.stack(net.losses(tokens, y))).sum().backward()
    expected = {n: p.grad.to_dense().clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BatchedJacobianFallbackWarning)
        mtl_backward(net.losses(tokens, y), net.shared(), LinearScalarization(w))
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad.to_dense(), expected[n], rtol=1e-5, atol=1e-6, msg=n)


def test_parallel_false_never_warns():
    net, (tokens, y) = SparseEmbeddingNet(), token_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchedJacobianFallbackWarning)
        r = mtl_backward(net.losses(tokens, y), net.shared(), UnitNormSum(), parallel=False)
    assert r.batched is False and r.fallback_reason is None


# --------------------------------------------------------------------------------------------
# Routing to task parameters and accumulation
# --------------------------------------------------------------------------------------------
class CrossNet(TwoHeadNet):
    """Head b also feeds loss a, so routing 'only its own task' is observable."""

    def losses_from(self, z, y):
        loss_a, loss_b = super().losses_from(z, y)
        return [loss_a + 0.3 * self.head_b(z).pow(2).mean(), loss_b]


@pytest.mark.parametrize("parallel", [True, False])
def test_task_params_receive_only_their_task_gradient(parallel):
    net, (x, y) = CrossNet(dtype=torch.float64), batch(dtype=torch.float64)
    losses = net.losses(x, y)
    hb = list(net.head_b.parameters())
    only_b = torch.autograd.grad(losses[1], hb, retain_graph=True)
    both = torch.autograd.grad(losses[0] + 4.0 * losses[1], hb, retain_graph=True)
    mtl_backward(losses, net.trunk, LinearScalarization([1.0, 4.0]),
                 task_params=[net.head_a, net.head_b], parallel=parallel)
    for p, e in zip(hb, only_b):
        torch.testing.assert_close(p.grad, 4.0 * e)

    # Without task_params the same head is an "other" parameter: Σ h_i ∇L_i.
    net.zero_grad(set_to_none=True)
    mtl_backward(net.losses(x, y), net.trunk, LinearScalarization([1.0, 4.0]), parallel=parallel)
    for p, e in zip(hb, both):
        torch.testing.assert_close(p.grad, e)


@pytest.mark.parametrize("parallel", [True, False])
def test_gradients_accumulate_into_existing_grad(parallel):
    net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
    mtl_backward(net.losses(x, y), net.trunk, UnitNormSum(), task_params=[net.head_a, net.head_b],
                 parallel=parallel)
    once = grads_of(net)
    g = torch.Generator().manual_seed(3)
    prior = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in net.named_parameters()}
    for n, p in net.named_parameters():
        p.grad = prior[n].clone()
    mtl_backward(net.losses(x, y), net.trunk, UnitNormSum(), task_params=[net.head_a, net.head_b],
                 parallel=parallel)
    for n, g_now in grads_of(net).items():
        torch.testing.assert_close(g_now, prior[n] + once[n], msg=n)


def test_retain_graph_allows_a_second_call():
    net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
    losses = net.losses(x, y)
    mtl_backward(losses, net.trunk, UnitNormSum(), retain_graph=True, parallel=True)
    once = grads_of(net)
    mtl_backward(losses, net.trunk, UnitNormSum(), parallel=True)
    for n, g in grads_of(net).items():
        torch.testing.assert_close(g, 2 * once[n])
    with pytest.raises(RuntimeError, match="graph was already freed by an earlier backward"):
        mtl_backward(losses, net.trunk, UnitNormSum(), parallel=True)


def test_tensor_losses_and_single_task():
    net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
    losses = net.losses(x, y)
    expected = explicit_jacobian(losses, list(net.trunk.parameters())).sum(0)
    mtl_backward(torch.stack(losses), net.trunk, LinearScalarization())
    torch.testing.assert_close(flat_grad(net.trunk.parameters()), expected)

    net.zero_grad(set_to_none=True)
    loss = net.losses(x, y)[0]
    g = explicit_jacobian([loss], list(net.trunk.parameters()))[0]
    r = mtl_backward([loss], net.trunk, UnitNormSum())
    torch.testing.assert_close(flat_grad(net.trunk.parameters()), g / g.norm())
    assert r.cosines.tolist() == [[1.0]]


def test_context_reaches_the_aggregator():
    net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
    losses = net.losses(x, y)
    agg = RecordingWeights()
    mtl_backward(losses, net.trunk, agg)
    mtl_backward(net.losses(x, y), net.trunk, agg, task_weights=[1, 4])
    assert agg.calls[0]["task_weights"] is None
    assert agg.calls[1]["task_weights"].tolist() == [1.0, 4.0]
    torch.testing.assert_close(agg.calls[0]["losses"], torch.stack(losses).detach())


def test_zero_gradient_task_gives_zero_cosine_not_nan():
    net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
    losses = net.losses(x, y)
    zero_task = 0.0 * losses[0]
    r = mtl_backward([losses[1], zero_task], net.trunk, FixedWeights([1.0, 1.0]))
    assert r.grad_norms[1] == 0 and r.cosines[0, 1] == 0 and r.cosines[1, 1] == 0
    assert torch.isfinite(r.cosines).all()


# --------------------------------------------------------------------------------------------
# Representation-level aggregation (MGDA-UB)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parallel", [True, False])
def test_features_path_weights_from_representation_gramian(parallel):
    net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
    z = net.features(x)
    losses = net.losses_from(z, y)
    Z = explicit_jacobian(losses, [z])
    beta = 1.0 / Z.norm(dim=1)  # what UnitNormSum computes from Z Zᵀ
    shared = list(net.trunk.parameters())
    expected_shared = torch.autograd.grad(beta[0] * losses[0] + beta[1] * losses[1], shared, retain_graph=True)
    heads = [*net.head_a.parameters(), *net.head_b.parameters()]
    expected_heads = torch.autograd.grad(losses[0] + losses[1], heads, retain_graph=True)

    r = mtl_backward(losses, net.trunk, UnitNormSum(), features=z, parallel=parallel)
    assert r.level == "features"
    torch.testing.assert_close(r.weights, beta)
    torch.testing.assert_close(r.grad_norms, Z.norm(dim=1))
    for p, e in zip(shared, expected_shared):
        torch.testing.assert_close(p.grad, e)
    for p, e in zip(heads, expected_heads):
        torch.testing.assert_close(p.grad, e)


def test_features_with_mgda_is_mgda_ub_closed_form():
    """MGDA-UB at K = 2: α₁ = clip((z₂ − z₁)·z₂ / ‖z₁ − z₂‖², 0, 1) on the representation
    gradients, and the encoder receives ∇(K Σ α_i L_i)."""
    net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
    z = net.features(x)
    losses = net.losses_from(z, y)
    z1, z2 = explicit_jacobian(losses, [z])
    a1 = float(((z2 - z1) @ z2 / (z1 - z2).pow(2).sum()).clamp(0, 1))
    assert 0 < a1 < 1  # an interior solution: the test exercises the formula, not a vertex
    beta = 2 * torch.tensor([a1, 1 - a1], dtype=torch.float64)
    shared = list(net.trunk.parameters())
    expected = torch.autograd.grad(beta[0] * losses[0] + beta[1] * losses[1], shared, retain_graph=True)
    r = mtl_backward(losses, net.trunk, MGDA(), features=z, task_params=[net.head_a, net.head_b])
    torch.testing.assert_close(r.weights, beta)
    for p, e in zip(shared, expected):
        torch.testing.assert_close(p.grad, e)


def test_features_with_ls_equals_weighted_sum_backward():
    w = [0.2, 5.0]
    net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
    (torch.tensor(w, dtype=torch.float64) * torch.stack(net.losses(x, y))).sum().backward()
    expected = grads_of(net)
    net.zero_grad(set_to_none=True)
    z = net.features(x)
    mtl_backward(net.losses_from(z, y), net.trunk, LinearScalarization(w), features=z)
    for n, g in grads_of(net).items():
        torch.testing.assert_close(g, expected[n], msg=n)


# --------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing written
# --------------------------------------------------------------------------------------------
def _bad_cases():
    def losses_of(net, x, y):
        return net.losses(x, y)

    return [
        ("empty", lambda n, x, y: dict(losses=[]), ValueError, "K = 0"),
        ("empty tensor", lambda n, x, y: dict(losses=torch.zeros(0, requires_grad=True)), ValueError, "K = 0"),
        ("non-scalar", lambda n, x, y: dict(losses=[losses_of(n, x, y)[0], n.head_b(n.features(x)).mean(0)]),
         ValueError, "task 1 must be a scalar"),
        ("nan", lambda n, x, y: dict(losses=[losses_of(n, x, y)[0], losses_of(n, x, y)[1] * float("nan")]),
         ValueError, "non-finite loss: task 1"),
        ("inf", lambda n, x, y: dict(losses=[losses_of(n, x, y)[0] * float("inf"), losses_of(n, x, y)[1]]),
         ValueError, "non-finite loss: task 0"),
        ("no grad", lambda n, x, y: dict(losses=[losses_of(n, x, y)[0], torch.tensor(1.0)]),
         ValueError, "task 1 does not require grad"),
        ("2-D tensor", lambda n, x, y: dict(losses=torch.stack(losses_of(n, x, y))[None]), ValueError, "1-D"),
        ("0-D tensor", lambda n, x, y: dict(losses=losses_of(n, x, y)[0]), ValueError, r"\[loss\]"),
        ("not a tensor", lambda n, x, y: dict(losses=[losses_of(n, x, y)[0], 1.0]), TypeError, "task 1"),
        ("unreached shared", lambda n, x, y: dict(shared_params=[*n.trunk.parameters(), nn.Parameter(torch.ones(3))]),
         ValueError, r"shared parameter #6 \(shape \(3,\)\) is not reached"),
        ("unreached module param", lambda n, x, y: dict(shared_params=nn.ModuleDict({"trunk": n.trunk, "extra": nn.Linear(2, 2)})),
         ValueError, "'extra.weight'.*not reached"),
        ("shared on two devices", lambda n, x, y: dict(
            shared_params=[*n.trunk.parameters(), nn.Parameter(torch.ones(2, device="meta"))]),
         ValueError, "several devices"),
        ("shared twice", lambda n, x, y: dict(shared_params=[*n.trunk.parameters(), n.trunk[0].weight]),
         ValueError, "given twice"),
        ("shared and task", lambda n, x, y: dict(task_params=[[n.head_a.weight, n.trunk[0].weight], n.head_b]),
         ValueError, "task 0 parameter #1.*given twice"),
        ("no shared", lambda n, x, y: dict(shared_params=[]), ValueError, "no shared parameters"),
        ("frozen shared", lambda n, x, y: dict(shared_params=[torch.ones(2)]), ValueError, "does not require grad"),
        ("task_params length", lambda n, x, y: dict(task_params=[n.head_a]), ValueError, "1 groups but there are 2"),
        ("task_params swapped", lambda n, x, y: dict(task_params=[n.head_b, n.head_a]), ValueError,
         r"task 0 parameter 'weight' \(shape \(2, 6\)\) is not reached by the loss of task 0 \(nor are 1 more"),
        ("task_params module", lambda n, x, y: dict(task_params=n.head_a), TypeError, "sequence of K"),
        ("task weights refused", lambda n, x, y: dict(task_weights=[1, 4]), ValueError, "no per-task weights"),
        ("task weights length", lambda n, x, y: dict(aggregator=LinearScalarization(), task_weights=[1, 4, 2]),
         ValueError, "3 entries but there are 2"),
        ("parallel", lambda n, x, y: dict(parallel="yes"), ValueError, "parallel must be"),
        ("aggregator", lambda n, x, y: dict(aggregator=lambda G: G.sum(0)), TypeError, "GradientAggregator"),
        ("features non-gramian", lambda n, x, y: dict(aggregator=SignAgreement(), features=n.features(x)),
         TypeError, "needs a GramianAggregator"),
        ("features detached", lambda n, x, y: dict(features=n.features(x).detach()), ValueError, "detached"),
        ("shared param bypasses features", lambda n, x, y: (lambda z: dict(
            losses=n.losses_from(z, y), features=z,
            shared_params=[*n.trunk.parameters(), *n.head_a.parameters()]))(n.features(x)),
         ValueError, r"shared parameter #6 \(shape \(1, 6\)\) is not reached through the features"),
        ("features unrelated", lambda n, x, y: dict(features=n.features(x) * 1.0), ValueError, "features #0 is not reached"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_one_clear_error(case):
    _, build, exc, pattern = case
    net, (x, y) = TwoHeadNet(), batch()
    kwargs = dict(losses=net.losses(x, y), shared_params=net.trunk, aggregator=UnitNormSum())
    kwargs.update(build(net, x, y))
    with pytest.raises(exc, match=pattern):
        mtl_backward(kwargs.pop("losses"), kwargs.pop("shared_params"), kwargs.pop("aggregator"), **kwargs)
    assert all(p.grad is None for p in net.parameters()), "nothing may be written on error"


def test_batched_and_loop_agree_under_autocast():
    results = {}
    for parallel in (True, False):
        net, (x, y) = TwoHeadNet(), batch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = net.losses(x, y)
        r = mtl_backward(losses, net.trunk, UnitNormSum(), task_params=[net.head_a, net.head_b],
                         parallel=parallel)
        assert r.batched is parallel
        results[parallel] = grads_of(net)
    for name, g in results[True].items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, results[False][name], rtol=1e-2, atol=1e-3, msg=name)


@pytest.mark.parametrize("parallel", [True, False])
def test_three_tasks_with_mgda_and_came_grad(parallel):
    """K = 3 (a third loss straight on the trunk's output, no head of its own)."""
    for agg in (MGDA(), CAMEGrad(task_weights=torch.tensor([1.0, 4.0, 0.5]))):
        net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
        z = net.features(x)
        losses = [*net.losses_from(z, y), z.pow(2).mean()]
        shared = list(net.trunk.parameters())
        G = explicit_jacobian(losses, shared)
        h = mtl_opt.loss_weights(agg, 3)
        expected = torch.autograd.grad(h[0] * losses[0] + h[1] * losses[1], list(net.head_a.parameters()),
                                       retain_graph=True)
        r = mtl_backward(losses, shared, agg, parallel=parallel)
        torch.testing.assert_close(flat_grad(shared), agg(G, losses=torch.stack(losses).detach()))
        assert r.gramian.shape == (3, 3) and r.batched is parallel
        assert torch.equal(r.loss_weights, h)
        for p, e in zip(net.head_a.parameters(), expected):
            torch.testing.assert_close(p.grad, e)


# --------------------------------------------------------------------------------------------
# Task groups are checked against their own loss also when the losses are one stacked tensor
# --------------------------------------------------------------------------------------------
def test_swapped_task_groups_raise_for_stacked_losses():
    net, (x, y) = TwoHeadNet(), batch()
    L = torch.stack(net.losses(x, y))
    # unbind() gives one node for all entries: each reaches every loss, so it cannot tell.
    parts = L.unbind()
    assert parts[0].grad_fn is parts[1].grad_fn
    with pytest.raises(ValueError, match="not reached by the loss of task 0"):
        mtl_backward(L, net.trunk, LinearScalarization(), task_params=[net.head_b, net.head_a])
    assert all(p.grad is None for p in net.parameters())  # nothing written


def test_stacked_losses_with_task_groups_equal_the_list_form():
    net, (x, y) = TwoHeadNet(), batch()
    groups = [net.head_a, net.head_b]
    mtl_backward(net.losses(x, y), net.trunk, MGDA(), task_params=groups)
    expected = grads_of(net)
    net.zero_grad(set_to_none=True)
    mtl_backward(torch.stack(net.losses(x, y)), net.trunk, MGDA(), task_params=groups)
    got = grads_of(net)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
        assert got[name].abs().sum() > 0, name


def test_task_groups_with_an_unstacked_loss_tensor_are_refused_clearly():
    net, (x, y) = TwoHeadNet(), batch()
    L = torch.cat([loss.reshape(1) for loss in net.losses(x, y)])
    with pytest.raises(ValueError, match="torch.stack"):
        mtl_backward(L, net.trunk, LinearScalarization(), task_params=[net.head_a, net.head_b])
    mtl_backward(L, net.trunk, LinearScalarization())  # without task groups it is fine


# --------------------------------------------------------------------------------------------
# The blocked path (GramianAggregator at the parameters: no flat G) equals the flat path
# --------------------------------------------------------------------------------------------
def _fresh_aggregator(name: str, **kw) -> mtl_opt.GradientAggregator:
    import inspect

    if "seed" in inspect.signature(mtl_opt.aggregator_class(name).__init__).parameters:
        kw["seed"] = 0
    torch.manual_seed(1234)
    return mtl_opt.get_aggregator(name, **kw)


def _assert_same_state(a, b, where="state"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=where)
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), where
    elif hasattr(a, "__array__") and not isinstance(a, (str, bytes)):
        import numpy as np

        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=where)
    else:
        assert a == b, where


BLOCKED_SPECS = [(name, {}) for name in mtl_opt.available_aggregators()] + [
    s for s in [("nash_mtl", {"update_weights_every": 2}), ("pcgrad", {"order": "random"})]
    if s[0] in mtl_opt.available_aggregators()
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name,kw", BLOCKED_SPECS, ids=[n + "".join(f"-{k}={v}" for k, v in kw.items()) for n, kw in BLOCKED_SPECS]
)
def test_blocked_path_equals_flat_path_over_three_steps(name, kw, dtype):
    from mtl_opt.backward import _BlockedAggregationResult

    nets = [TwoHeadNet(dtype=dtype), TwoHeadNet(dtype=dtype)]
    aggs = [_fresh_aggregator(name, **kw), _fresh_aggregator(name, **kw)]
    t = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-10)
    for step in range(3):
        x, y = batch(seed=10 + step, dtype=dtype)
        results = []
        for net, agg, parallel in zip(nets, aggs, [True, False]):  # batched: blocked; loop: flat
            net.zero_grad(set_to_none=True)
            results.append(
                mtl_backward(
                    net.losses(x, y), net.trunk, agg, task_params=[net.head_a, net.head_b],
                    parallel=parallel,
                )
            )
        blocked, flat = results
        if isinstance(aggs[0], mtl_opt.GramianAggregator) and aggs[0].needs_jacobian:
            assert isinstance(blocked.aggregation, _BlockedAggregationResult)
        if aggs[0].needs_jacobian:
            assert not isinstance(flat.aggregation, _BlockedAggregationResult)
        for (n, p), (_, q) in zip(nets[0].named_parameters(), nets[1].named_parameters()):
            assert p.grad.dtype == dtype
            torch.testing.assert_close(p.grad, q.grad, **t, msg=f"step {step}: {n}")
        torch.testing.assert_close(blocked.direction, flat.direction, **t)
        assert blocked.direction.dtype == dtype and blocked.direction.shape == flat.direction.shape
        if not aggs[0].needs_jacobian:  # LS and loss weightings: one backward pass either way
            assert blocked.gramian is None and flat.gramian is None
            torch.testing.assert_close(blocked.weights, flat.weights, rtol=0, atol=0)
            _assert_same_state(aggs[0].state_dict(), aggs[1].state_dict())
            with torch.no_grad():
                for net in nets:
                    for p in net.parameters():
                        p -= 0.05 * p.grad
            continue
        torch.testing.assert_close(blocked.gramian, flat.gramian, rtol=1e-5, atol=1e-8)
        assert blocked.gramian.dtype == torch.float64
        assert torch.equal(blocked.gramian, blocked.gramian.T)
        torch.testing.assert_close(blocked.cosines, flat.cosines, rtol=1e-5, atol=1e-6)
        if flat.weights is None:
            assert blocked.weights is None
        else:
            torch.testing.assert_close(blocked.weights, flat.weights, rtol=1e-4, atol=1e-6)
        _assert_same_state(aggs[0].state_dict(), aggs[1].state_dict())
        with torch.no_grad():  # a step, so that the next Jacobian differs
            for net in nets:
                for p in net.parameters():
                    p -= 0.05 * p.grad


def test_blocked_path_writes_fresh_grads_without_copy_and_accumulates():
    net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
    shared = list(net.trunk.parameters())
    G = explicit_jacobian(net.losses(x, y), shared)
    beta = torch.tensor([0.25, 1.5], dtype=torch.float64)
    result = mtl_backward(net.losses(x, y), shared, FixedWeights([0.25, 1.5]), parallel=True)
    torch.testing.assert_close(flat_grad(shared), beta @ G, rtol=1e-10, atol=1e-12)
    for p in shared:
        assert p.grad.shape == p.shape and p.grad.stride() == p.stride()
    # A second call adds to the existing .grad (the pieces of that call are separate tensors).
    second = mtl_backward(net.losses(x, y), shared, FixedWeights([0.25, 1.5]), parallel=True)
    torch.testing.assert_close(flat_grad(shared), 2 * (beta @ G), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second.direction, beta @ G, rtol=1e-10, atol=1e-12)
    # The first call's pieces are the .grad tensors, now modified: its direction refuses.
    with pytest.raises(RuntimeError, match="modified in place"):
        result.direction


def test_blocked_direction_read_before_clipping_is_kept():
    net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
    shared = list(net.trunk.parameters())
    result = mtl_backward(net.losses(x, y), shared, LinearScalarization([1.0, 2.0]), parallel=True)
    before = result.direction.clone()
    torch.nn.utils.clip_grad_norm_(shared, max_norm=1e-3)
    assert torch.equal(result.direction, before)  # cached at first read
    assert float(flat_grad(shared).norm()) == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("scale", [1e-25, 1e25, 1.0])
def test_gramian_of_blocks_matches_gramian_of(scale):
    from mtl_opt._validation import gramian_of
    from mtl_opt.backward import gramian_of_blocks

    g = torch.Generator().manual_seed(3)
    G = (torch.randn(3, 40, generator=g, dtype=torch.float64) * scale).float()
    G[1, :] = 0.0  # an exactly-zero task row is fine in float32
    blocks = [G[:, :7], G[:, 7:8], G[:, 8:]]
    torch.testing.assert_close(gramian_of_blocks(blocks), gramian_of(G), rtol=1e-6, atol=0.0)
    M = gramian_of_blocks(blocks)
    M64 = G.double() @ G.double().T
    torch.testing.assert_close(M, M64, rtol=1e-5, atol=1e-6 * float(M64.abs().max()))


def test_gramian_of_blocks_names_non_finite_rows_and_overflow():
    from mtl_opt.backward import gramian_of_blocks

    G = torch.ones(3, 6)
    G[2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"task row\(s\) \[2\] contain NaN or inf"):
        gramian_of_blocks([G[:, :3], G[:, 3:]])
    big = torch.full((2, 4), 1e200, dtype=torch.float64)
    big[0] = 1.0
    with pytest.raises(ValueError, match=r"task row\(s\) \[1\] of the Jacobian overflows float64"):
        gramian_of_blocks([big[:, :2], big[:, 2:]])


def test_blocked_path_rejects_non_finite_jacobian_before_writing():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    v = torch.tensor([0.5, -1.0], requires_grad=True)
    # Finite loss values; the gradient of task 1 is infinite (d√u/du at u = 0).
    losses = [(w * w).sum() + v.sum(), (w.sum() - 6.0).pow(2).sqrt() + v.sum()]
    # (The batched backward also turns task 0's zero cotangent through √ into 0·∞ = NaN.)
    with pytest.raises(ValueError, match=r"Jacobian is not finite: task row\(s\) \[(0, )?1\]"):
        mtl_backward(losses, [w, v], MGDA(), parallel=True)
    assert w.grad is None and v.grad is None


def test_blocked_result_repr_does_not_assemble_the_direction():
    net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
    result = mtl_backward(net.losses(x, y), net.trunk, MGDA(), parallel=True)
    for p in net.trunk.parameters():
        p.grad.mul_(2.0)
    text = repr(result.aggregation)  # no error although the pieces were modified
    assert "blocked" in text and "weights" in text
    assert repr(result).startswith("MTLBackwardResult(level='parameters'")


def test_features_auto_takes_one_pass_per_task_through_the_heads():
    """At the features, parallel="auto" runs one backward pass per task that stops at z (each
    through its own head only) instead of the batched call, which runs every head K times;
    same result as the batched call, no fallback warning."""
    results = {}
    for parallel in ("auto", True):
        net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
        z = net.features(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = mtl_backward(net.losses_from(z, y), net.trunk, MGDA(), features=z,
                             task_params=[net.head_a, net.head_b], parallel=parallel)
        results[parallel] = (r, grads_of(net))
    auto, batched = results["auto"][0], results[True][0]
    assert auto.batched is False and auto.fallback_reason is None
    assert batched.batched is True
    torch.testing.assert_close(auto.weights, batched.weights)
    torch.testing.assert_close(auto.gramian, batched.gramian)
    for n, g in results["auto"][1].items():
        torch.testing.assert_close(g, results[True][1][n], msg=n)


def test_jacobian_stage_rows_are_replaced_in_one_call_between_the_stages():
    """The Jacobian stage hands every per-task gradient to the Gramian stage in one object;
    ``map_rows`` replaces them all (the step a sum over processes takes): doubling every row
    doubles the Gramian and every head's update; factored layers refuse (not additive)."""
    from mtl_opt._backward.inputs import heads_of, prepare_call
    from mtl_opt._backward.jacobian import jacobian_blocks
    from mtl_opt._backward.weights import gramian
    from mtl_opt._gramian import gramian_of

    def gramian_of_stage(call, jac):  # the flat path's aggregator forms M from G
        M = gramian(call, jac)
        return gramian_of(jac.flat()) if M is None else M

    def stage_two(parallel):
        net, (x, y) = TwoHeadNet(dtype=torch.float64), batch(dtype=torch.float64)
        call = prepare_call(
            net.losses(x, y), net.trunk, MGDA(), task_params=[net.head_a, net.head_b],
            task_weights=None, features=None, retain_graph=False, parallel=parallel,
            factor_linear=False,
        )
        heads = heads_of(call)
        return call, jacobian_blocks(call, heads)

    for parallel in (True, False):
        call, jac = stage_two(parallel)
        M, heads = gramian_of_stage(call, jac), [g.clone() for g in jac.head]
        call, jac = stage_two(parallel)
        jac.map_rows(lambda t: 2 * t)
        torch.testing.assert_close(gramian_of_stage(call, jac), 4 * M)
        for g, h in zip(jac.head, heads):
            torch.testing.assert_close(g, 2 * h)
    torch.manual_seed(0)
    trunk, head_a, head_b = nn.Linear(64, 64), nn.Linear(64, 1), nn.Linear(64, 1)
    z = trunk(torch.randn(4, 64))
    call = prepare_call(
        [head_a(z).pow(2).mean(), head_b(z).pow(2).mean()], trunk, MGDA(),
        task_params=[head_a, head_b], task_weights=None, features=None, retain_graph=False,
        parallel=True, factor_linear=True,
    )
    jac = jacobian_blocks(call, heads_of(call))
    assert jac.n_factored == 1
    with pytest.raises(RuntimeError, match="not additive"):
        jac.map_rows(lambda t: t)
