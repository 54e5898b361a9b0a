"""mtl_backward with factored embedding tables: the Gramian share and the update of a shared
table from its looked-up ids and output gradients (rows of the same id summed, the padding id
left out), checked against the explicit Jacobian and against ``factor_linear=False``."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import mtl_opt
from mtl_opt import mtl_backward

from _mtl_models import explicit_jacobian, flat_grad


class Tokens(nn.Module):
    """An embedding table read twice (a batch of sequences and two extra ids), with repeated ids
    and its padding id among them, a LayerNorm and two task heads."""

    def __init__(self, dtype, padding_idx=0, **embedding):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(30, 6, padding_idx=padding_idx, **embedding)
        self.norm = nn.LayerNorm(6)
        self.head_a, self.head_b = nn.Linear(6, 1), nn.Linear(6, 3)
        self.to(dtype)
        self.ids = torch.tensor([[0, 3, 3, 7, 0], [7, 0, 1, 3, 29]])
        self.extra = torch.tensor([3, 12])

    def shared(self) -> list[Tensor]:
        return [*self.embed.parameters(), *self.norm.parameters()]

    def losses(self) -> list[Tensor]:
        h = self.norm(self.embed(self.ids)).mean(1) + torch.tanh(F.embedding(self.extra, self.embed.weight)).sum(0)
        return [self.head_a(h).pow(2).mean(), (self.head_b(h) - 1).sin().sum()]


def _run(model, **kw):
    for p in model.parameters():
        p.grad = None
    result = mtl_backward(model.losses(), model.shared(), mtl_opt.get_aggregator("cagrad"),
                          task_params=[model.head_a, model.head_b], **kw)
    return result, flat_grad(model.shared())


@pytest.mark.parametrize("padding_idx", [0, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factored_embedding_matches_the_jacobian_rows(dtype, padding_idx):
    model = Tokens(dtype, padding_idx)
    rows, rows_grad = _run(model, factor_linear=False)
    fact, fact_grad = _run(model)
    assert rows.factored_params == 0 and fact.factored_params == 1  # the table
    J = explicit_jacobian(model.losses(), model.shared()).double()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fact.gramian, J @ J.T, **tol)
    torch.testing.assert_close(fact_grad, rows_grad, **tol)
    torch.testing.assert_close(fact_grad, fact.weights.to(dtype) @ J.to(dtype), **tol)
    if padding_idx is not None:  # the padding row receives nothing
        assert model.embed.weight.grad[padding_idx].abs().max() == 0


def test_embeddings_used_any_other_way_keep_their_rows():
    """Scaled by frequency, more lookups than rows, and a table tied to an output layer keep
    their rows; the gradients stay exact."""
    cases = {
        "scale_grad_by_freq": Tokens(torch.float64, scale_grad_by_freq=True),
        "more lookups than rows": Tokens(torch.float64),
        "tied to an output layer": Tokens(torch.float64),
    }
    cases["more lookups than rows"].ids = torch.randint(0, 30, (8, 5), generator=torch.Generator().manual_seed(1))
    tied = cases["tied to an output layer"]
    plain_losses = tied.losses
    tied.losses = lambda: [plain_losses()[0] + F.linear(tied.embed.weight[:2], tied.embed.weight).sum(), plain_losses()[1]]
    for name, model in cases.items():
        result, grad = _run(model)
        assert result.factored_params == 0, name
        J = explicit_jacobian(model.losses(), model.shared())
        torch.testing.assert_close(result.gramian, J @ J.T, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(grad, result.weights @ J, rtol=1e-10, atol=1e-12, msg=name)
