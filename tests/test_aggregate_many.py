"""aggregate_many: one Gramian for many methods, directions equal to separate calls."""

from __future__ import annotations

import copy

import pytest
import torch

import mtl_opt
from mtl_opt import GradientAggregator, aggregate_many
from mtl_opt.aggregator import AggregationResult

METHODS = mtl_opt.available_aggregators()


def _jacobian(K: int, d: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Rows with mixed signs and norms, so conflicts and normalisations are exercised."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g, dtype=torch.float64)
    scale = torch.logspace(0, 1, K, dtype=torch.float64).unsqueeze(1)
    return (scale * (mix @ torch.randn(K, d, generator=g, dtype=torch.float64))).to(dtype)


def _context(agg: GradientAggregator, K: int) -> dict:
    return {"losses": torch.linspace(0.5, 2.0, K)} if agg.requires_losses else {}


class ElementwiseMedian(GradientAggregator):
    """A method that is not a Gramian weighting: the coordinate-wise median of the rows."""

    def _aggregate(self, G, *, losses, task_weights):
        return AggregationResult(direction=G.median(dim=0).values)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_equals_separate_calls_for_every_method(name, K):
    separate = mtl_opt.get_aggregator(name)
    together = copy.deepcopy(separate)  # same hyperparameters and same state (seeds included)
    for step in range(3):  # stateful methods must advance identically
        G = _jacobian(K, 40, seed=step)
        ctx = _context(separate, K)
        expected = separate(G, **ctx)
        got = aggregate_many(G, {name: together}, **ctx)[name]
        assert got.dtype == G.dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_all_registered_methods_in_one_call_float32():
    K, d = 4, 300
    G = _jacobian(K, d, dtype=torch.float32)
    losses = torch.linspace(0.5, 2.0, K)
    separate = {n: mtl_opt.get_aggregator(n) for n in METHODS}
    together = copy.deepcopy(separate)
    got = aggregate_many(G, together, losses=losses)
    assert list(got) == METHODS
    for name, agg in separate.items():
        expected = agg(G, losses=losses)
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-5 * float(G.abs().max()))


def test_gramian_is_computed_once(monkeypatch):
    import mtl_opt.many as many

    calls = []
    real = many.gramian_of
    monkeypatch.setattr(many, "gramian_of", lambda G: calls.append(1) or real(G))
    G = _jacobian(3, 20)
    aggs = {f"ls{i}": mtl_opt.get_aggregator("ls", weights=[1.0, i, 2.0]) for i in range(5)}
    out = aggregate_many(G, aggs)
    assert len(calls) == 1
    for i in range(5):
        torch.testing.assert_close(out[f"ls{i}"], G[0] + i * G[1] + 2.0 * G[2])


def test_results_carry_weights_and_the_shared_gramian():
    G = _jacobian(3, 20)
    res = aggregate_many(G, ["ls"], return_results=True)["ls"]
    torch.testing.assert_close(res.weights, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(res.gramian, G @ G.T)
    torch.testing.assert_close(res.direction, G.sum(0))


def test_non_gramian_methods_take_the_general_path():
    G = _jacobian(3, 20)
    out = aggregate_many(G, {"median": ElementwiseMedian(), "ls": mtl_opt.get_aggregator("ls")})
    assert list(out) == ["median", "ls"]
    torch.testing.assert_close(out["median"], G.median(dim=0).values)
    torch.testing.assert_close(out["ls"], G.sum(0))


def test_task_weights_reach_methods_that_take_them():
    G = _jacobian(2, 10)
    out = aggregate_many(G, ["ls"], task_weights=torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(out["ls"], G[0] + 4 * G[1])


def test_bad_input_raises_one_clear_error():
    G = _jacobian(3, 10)
    with pytest.raises(ValueError, match="at least one"):
        aggregate_many(G, [])
    with pytest.raises(ValueError, match="both labelled 'ls'"):
        aggregate_many(G, ["ls", mtl_opt.get_aggregator("ls")])
    with pytest.raises(TypeError, match="not one"):
        aggregate_many(G, mtl_opt.get_aggregator("ls"))
    with pytest.raises(TypeError, match="not a GradientAggregator"):
        aggregate_many(G, {"x": object()})
    with pytest.raises(ValueError, match="unknown method"):
        aggregate_many(G, ["no_such_method"])
    bad = G.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"task row\(s\) \[1\]"):
        aggregate_many(bad, ["ls"])
    with pytest.raises(ValueError, match="shape"):
        aggregate_many(G[0], ["ls"])
