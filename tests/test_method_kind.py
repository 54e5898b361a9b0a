"""Each method declares what it is (``kind``); the engine asks it and never inspects overrides."""

from __future__ import annotations

import pytest
import torch

import mtl_opt
from mtl_opt import AggregationResult, GradientAggregator, GramianAggregator, LossWeighting
from mtl_opt.aggregator import KINDS, is_gramian_weighting

f64 = torch.float64


class UnitNormSum(GramianAggregator):
    """``β_i = 1/‖g_i‖``."""

    def _weights(self, M, *, losses, task_weights):
        return 1.0 / torch.sqrt(torch.diagonal(M))


class DoubledUnitNormSum(UnitNormSum):
    """Replaces ``aggregate``: its result is not ``βᵀG`` with the β of ``weights``."""

    def aggregate(self, G, /, *, losses=None, task_weights=None):
        inner = super().aggregate(G, losses=losses, task_weights=task_weights)
        return AggregationResult(direction=2 * inner.direction)


def test_every_registered_method_declares_a_known_kind():
    kinds = {n: mtl_opt.aggregator_class(n).kind for n in mtl_opt.available_aggregators()}
    assert set(kinds.values()) <= set(KINDS)
    assert sorted(n for n, k in kinds.items() if k == "general") == ["db_mtl", "graddrop", "moco"]
    loss = {n for n, k in kinds.items() if k == "loss"}
    assert "ls" in loss
    assert loss - {"ls"} == {
        n for n in kinds if issubclass(mtl_opt.aggregator_class(n), LossWeighting)
    }
    for n, k in kinds.items():  # needs_jacobian is derived from the kind
        assert mtl_opt.aggregator_class(n).needs_jacobian is (k != "loss")
    assert GradientAggregator.kind == "general" and GramianAggregator.kind == "gramian"


def test_rgw_and_ls_replace_aggregate_for_speed_and_keep_their_kind():
    """Both declare their kind in their own body: a promise that their ``_aggregate`` returns
    the ``βᵀG`` of their weights, so the engine may aggregate per parameter block."""
    assert mtl_opt.aggregator_class("rgw").kind == "gramian"
    assert mtl_opt.aggregator_class("ls").kind == "loss"
    assert is_gramian_weighting(mtl_opt.get_aggregator("rgw"))
    assert is_gramian_weighting(mtl_opt.get_aggregator("ls"))
    assert not is_gramian_weighting(mtl_opt.get_aggregator("uw"))  # no weights(M) to ask
    assert not is_gramian_weighting(mtl_opt.get_aggregator("graddrop"))


def test_a_subclass_that_replaces_aggregate_becomes_general():
    assert DoubledUnitNormSum.kind == "general" and not is_gramian_weighting(DoubledUnitNormSum())

    class OwnValidation(UnitNormSum):
        def _validate_jacobian(self, G):
            super()._validate_jacobian(G)

    class OwnAggregate(UnitNormSum):
        def _aggregate(self, G, *, losses, task_weights):
            return AggregationResult(direction=G[0].clone())

    assert OwnValidation.kind == "general" and OwnAggregate.kind == "general"
    assert UnitNormSum.kind == "gramian"


def test_declaring_gramian_while_replacing_aggregate_is_refused():
    with pytest.raises(TypeError, match="declares kind = 'gramian' but replaces aggregate"):
        type("Liar", (UnitNormSum,), {"kind": "gramian", "aggregate": lambda self, G: None})
    with pytest.raises(TypeError, match="replaces _validate_jacobian"):
        type("Liar", (UnitNormSum,),
             {"kind": "gramian", "_validate_jacobian": lambda self, G: None})


def test_needs_jacobian_is_not_declared_and_kind_is_checked():
    with pytest.raises(TypeError, match="sets needs_jacobian; declare kind"):
        type("Old", (UnitNormSum,), {"needs_jacobian": False})
    with pytest.raises(TypeError, match=r"kind must be one of \('gramian', 'loss', 'general'\)"):
        type("Odd", (GradientAggregator,), {"kind": "elementwise"})


def test_aggregate_many_uses_a_general_methods_own_aggregate():
    """aggregate_many computes Gramian weightings as ``βᵀG`` from one shared Gramian; a
    subclass that replaced ``aggregate`` is asked for its own result."""
    G = torch.tensor([[3.0, 4.0, 0.0], [0.0, 1.0, 1.0]], dtype=f64)
    out = mtl_opt.aggregate_many(G, {"own": DoubledUnitNormSum(), "plain": UnitNormSum()})
    torch.testing.assert_close(out["own"], DoubledUnitNormSum()(G))
    torch.testing.assert_close(out["own"], 2 * out["plain"])


def test_mtl_backward_uses_a_general_methods_own_aggregate():
    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 4)
    x = torch.randn(5, 3)
    for agg, factor in ((UnitNormSum(), 1.0), (DoubledUnitNormSum(), 2.0)):
        shared.zero_grad()
        h = shared(x)
        losses = [h[:, :2].pow(2).mean(), h[:, 2:].sin().mean()]
        mtl_opt.mtl_backward(losses, shared.parameters(), agg)
        got = torch.cat([p.grad.reshape(-1) for p in shared.parameters()])
        if factor == 1.0:
            base = got.clone()
    torch.testing.assert_close(got, 2 * base)
