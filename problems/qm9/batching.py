"""Many molecules as one graph: the complete-graph edges and edge features of the QM9 benchmark.

The multi-task QM9 code (Nash-MTL and its successors, after PyTorch Geometric's QM9 example)
connects every ordered pair of distinct atoms of a molecule (the ``Complete`` transform) and gives
each pair a 5-vector: the one-hot bond type of :data:`~.featurize.BOND_TYPES` (zeros where the
atoms are not bonded) followed by their distance in Å (``T.Distance(norm=False)``). A batch
concatenates the molecules' atoms, with ``batch[u]`` the molecule of atom ``u``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .featurize import BOND_TYPES, MoleculeGraph

__all__ = ["EDGE_FEATURES", "MoleculeBatch", "collate_molecules"]

EDGE_FEATURES = len(BOND_TYPES) + 1


class MoleculeBatch(NamedTuple):
    """``x`` (N, 11) atoms, ``edge_index`` (2, E) source → target pairs, ``edge_attr`` (E, 5),
    ``batch`` (N,) molecule of each atom, ``y`` (B, K) targets (standardised), ``num_graphs`` B.

    A named tuple, so that moving a batch to a device keeps its type."""

    x: Tensor
    edge_index: Tensor
    edge_attr: Tensor
    batch: Tensor
    y: Tensor
    num_graphs: int

    def to(self, device: torch.device | str) -> "MoleculeBatch":
        """The same batch on ``device``."""
        return MoleculeBatch(*(v.to(device) if isinstance(v, Tensor) else v for v in self))


def collate_molecules(graphs: Sequence[MoleculeGraph], y: Tensor) -> MoleculeBatch:
    """One batch of ``graphs`` (complete graphs with bond and distance features) and targets ``y``."""
    if not graphs:
        raise ValueError("cannot batch zero molecules")
    if y.shape[0] != len(graphs):
        raise ValueError(f"{len(graphs)} molecules but {y.shape[0]} target rows")
    sizes = torch.tensor([g.num_atoms for g in graphs], dtype=torch.long)
    offsets = torch.cumsum(sizes, 0) - sizes
    n_total = int(sizes.sum())
    batch = torch.repeat_interleave(torch.arange(len(graphs)), sizes)
    x = torch.cat([g.x for g in graphs])
    pos = torch.cat([g.pos for g in graphs])

    # Every ordered pair (u, v) of atoms of one molecule, u-major, self pairs removed.
    partners = sizes[batch]                                  # atoms in u's molecule, per atom u
    src = torch.repeat_interleave(torch.arange(n_total), partners)
    block_start = torch.cumsum(partners, 0) - partners
    within = torch.arange(src.numel()) - torch.repeat_interleave(block_start, partners)
    dst = offsets[batch[src]] + within
    keep = src != dst
    src, dst = src[keep], dst[keep]

    # Bonded pairs get their one-hot bond type (looked up by the pair's key src * N + dst).
    bond_src = torch.cat([g.bond_index[0] + off for g, off in zip(graphs, offsets.tolist())])
    bond_dst = torch.cat([g.bond_index[1] + off for g, off in zip(graphs, offsets.tolist())])
    bond_type = torch.cat([g.bond_type for g in graphs])
    edge_attr = torch.zeros(src.numel(), EDGE_FEATURES)
    if bond_type.numel():
        bond_key = bond_src * n_total + bond_dst
        order = torch.argsort(bond_key)
        bond_key, bond_type = bond_key[order], bond_type[order]
        pair_key = src * n_total + dst
        slot = torch.searchsorted(bond_key, pair_key).clamp_max(bond_key.numel() - 1)
        bonded = bond_key[slot] == pair_key
        edge_attr[bonded.nonzero(as_tuple=True)[0], bond_type[slot[bonded]]] = 1.0
    edge_attr[:, -1] = (pos[dst] - pos[src]).norm(dim=-1)
    return MoleculeBatch(x=x, edge_index=torch.stack([src, dst]), edge_attr=edge_attr,
                         batch=batch, y=y, num_graphs=len(graphs))
