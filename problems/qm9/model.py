"""The QM9 model of the multi-task papers: an MPNN encoder shared by 11 linear heads.

The encoder is the message-passing network of PyTorch Geometric's QM9 example (Gilmer et al.,
"Neural Message Passing for Quantum Chemistry", ICML 2017), as Nash-MTL, FAMO and FairGrad use it
at width ``w = 64``:

* embedding ``h⁰ = ReLU(W₀ x)``;
* 3 rounds, one edge-network convolution and one GRU step each (weights shared across rounds):
  ``m_u = ReLU(W_root h_u + mean_{v→u} h_v Θ(e_vu) + b)`` with ``Θ(e) = reshape_{w×w}(
  W₂ ReLU(W₁ e + b₁) + b₂)`` (a 128-unit edge network), then ``h_u ← GRU(m_u, h_u)``;
* Set2Set readout (Vinyals et al. 2016) with 3 processing steps:
  ``q_t = LSTM(q*_{t-1})``, ``a_u = softmax_{u ∈ graph}(h_u · q_t)``, ``r_t = Σ_u a_u h_u``,
  ``q*_t = [q_t, r_t]``;
* ``z = ReLU(W₁ q*_3)`` (width ``w``): the shared representation.

Head ``k`` is ``ŷ_k = a_kᵀ z + c_k``. The layers are written in plain torch (scatter by
``index_add_``), with the GRU and LSTM cells spelt out as linear maps, so that the batched
per-task Jacobian of :func:`mtl_opt.mtl_backward` runs through every op.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .batching import EDGE_FEATURES, MoleculeBatch
from .featurize import NODE_FEATURES

__all__ = ["EdgeNetworkConv", "MPNNEncoder", "QM9Model", "Set2Set"]


def _uniform_(module: nn.Linear, fan: int) -> None:
    """torch's recurrent-layer initialisation: every weight and bias U(-1/√fan, 1/√fan)."""
    bound = 1.0 / math.sqrt(fan)
    nn.init.uniform_(module.weight, -bound, bound)
    if module.bias is not None:
        nn.init.uniform_(module.bias, -bound, bound)


class GRUStep(nn.Module):
    """One GRU step (Cho et al. 2014), torch's gate layout: ``r, z, n`` and
    ``h' = (1 - z) ⊙ n + z ⊙ h`` with ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.input_map, self.hidden_map = nn.Linear(width, 3 * width), nn.Linear(width, 3 * width)
        _uniform_(self.input_map, width)
        _uniform_(self.hidden_map, width)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        xr, xz, xn = self.input_map(x).chunk(3, dim=-1)
        hr, hz, hn = self.hidden_map(h).chunk(3, dim=-1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


class LSTMStep(nn.Module):
    """One LSTM step (Hochreiter & Schmidhuber 1997), torch's gate layout ``i, f, g, o``."""

    def __init__(self, in_width: int, width: int) -> None:
        super().__init__()
        self.input_map, self.hidden_map = nn.Linear(in_width, 4 * width), nn.Linear(width, 4 * width)
        _uniform_(self.input_map, width)
        _uniform_(self.hidden_map, width)

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        i, f, g, o = (self.input_map(x) + self.hidden_map(h)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class EdgeNetworkConv(nn.Module):
    """Edge-conditioned convolution (Gilmer et al. 2017; PyG's ``NNConv``, mean aggregation):
    ``out_u = W_root h_u + mean_{(v, u) ∈ E} h_v Θ(e_vu) + b``."""

    def __init__(self, width: int, edge_features: int = EDGE_FEATURES, edge_hidden: int = 128) -> None:
        super().__init__()
        self.width = width
        self.edge_network = nn.Sequential(nn.Linear(edge_features, edge_hidden), nn.ReLU(),
                                          nn.Linear(edge_hidden, width * width))
        self.root = nn.Linear(width, width, bias=False)
        self.bias = nn.Parameter(torch.zeros(width))

    def edge_weights(self, edge_attr: Tensor) -> Tensor:
        """``Θ(e)`` for every edge, (E, w, w): computed once per batch and reused by every round
        (the same network on the same edge features; PyG's ``NNConv`` recomputes it per call)."""
        return self.edge_network(edge_attr).view(-1, self.width, self.width)

    def forward(self, h: Tensor, edge_index: Tensor, theta: Tensor) -> Tensor:
        """One convolution of node states ``h`` with the edge weights ``theta`` of :meth:`edge_weights`."""
        src, dst = edge_index[0], edge_index[1]
        messages = torch.bmm(h[src].unsqueeze(1), theta).squeeze(1)
        summed = h.new_zeros(h.shape).index_add(0, dst, messages)
        degree = h.new_zeros(h.shape[0]).index_add(0, dst, h.new_ones(dst.shape[0]))
        return summed / degree.clamp_min(1).unsqueeze(1) + self.root(h) + self.bias


class Set2Set(nn.Module):
    """Set2Set readout (Vinyals et al. 2016): ``steps`` LSTM-driven attention rounds; (B, 2w)."""

    def __init__(self, width: int, steps: int = 3) -> None:
        super().__init__()
        self.width, self.steps = width, steps
        self.lstm = LSTMStep(2 * width, width)

    def forward(self, h: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        q_star = h.new_zeros(num_graphs, 2 * self.width)
        q, c = h.new_zeros(num_graphs, self.width), h.new_zeros(num_graphs, self.width)
        for _ in range(self.steps):
            q, c = self.lstm(q_star, q, c)
            score = (h * q[batch]).sum(-1)
            shift = torch.full((num_graphs,), -torch.inf, dtype=h.dtype, device=h.device)
            shift = shift.scatter_reduce(0, batch, score.detach(), reduce="amax")
            weight = torch.exp(score - shift[batch])
            total = h.new_zeros(num_graphs).index_add(0, batch, weight)
            attention = (weight / total[batch]).unsqueeze(1)
            readout = h.new_zeros(num_graphs, self.width).index_add(0, batch, attention * h)
            q_star = torch.cat([q, readout], dim=-1)
        return q_star


class MPNNEncoder(nn.Module):
    """Atoms and pairs → one ``width``-vector per molecule (the shared part of :class:`QM9Model`)."""

    def __init__(self, width: int = 64, rounds: int = 3, set2set_steps: int = 3,
                 node_features: int = NODE_FEATURES, edge_features: int = EDGE_FEATURES,
                 edge_hidden: int = 128) -> None:
        super().__init__()
        self.rounds = rounds
        self.embed = nn.Linear(node_features, width)
        self.conv = EdgeNetworkConv(width, edge_features, edge_hidden)
        self.gru = GRUStep(width)
        self.readout = Set2Set(width, set2set_steps)
        self.project = nn.Linear(2 * width, width)

    def forward(self, batch: MoleculeBatch) -> Tensor:
        out = torch.relu(self.embed(batch.x))
        hidden = out
        theta = self.conv.edge_weights(batch.edge_attr)
        for _ in range(self.rounds):
            message = torch.relu(self.conv(out, batch.edge_index, theta))
            hidden = self.gru(message, hidden)
            out = hidden
        pooled = self.readout(out, batch.batch, batch.num_graphs)
        return torch.relu(self.project(pooled))


class QM9Model(nn.Module):
    """:class:`MPNNEncoder` (shared) and one ``Linear(width, 1)`` head per target.

    ``target_scale`` (a buffer, K values) turns a standardised error of each target into the
    units its metric reports (the workload's training-split standard deviation × report scale).
    """

    def __init__(self, n_tasks: int = 11, width: int = 64, target_scale: Tensor | None = None,
                 **encoder_options: int) -> None:
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        self.encoder = MPNNEncoder(width, **encoder_options)
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(n_tasks))
        scale = torch.ones(n_tasks, dtype=torch.float64) if target_scale is None else target_scale
        if scale.shape != (n_tasks,):
            raise ValueError(f"target_scale must hold {n_tasks} values, got shape {tuple(scale.shape)}")
        self.register_buffer("target_scale", scale.detach().clone().to(torch.float64))

    def forward(self, batch: MoleculeBatch) -> tuple[Tensor, Tensor]:
        """Predictions (B, K) in standardised units, and the shared representation (B, width)."""
        z = self.encoder(batch)
        return torch.cat([head(z) for head in self.heads], dim=1), z

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters: they receive the method's aggregated direction."""
        return list(self.encoder.parameters())

    def task_parameters(self) -> list[list[nn.Parameter]]:
        """Head k's weight and bias, for each target k."""
        return [list(head.parameters()) for head in self.heads]
