"""Molecular graphs as PyTorch Geometric's QM9 dataset defines them, built with RDKit.

One node per atom, hydrogens included, in the order of the molecule's XYZ block; positions in
Ångström from that block. Node features (11 columns, PyG's ``QM9.x``)::

    one-hot element (H, C, N, O, F) | atomic number | aromatic | sp | sp2 | sp3 | number of H neighbours

Edges: every chemical bond in both directions, sorted by (source, target), with the bond type
(single, double, triple, aromatic) as an index into that one-hot order.

Bonds, aromaticity and hybridisation come from RDKit's reading of the SMILES (with explicit
hydrogens). QM9's XYZ blocks do not always list atoms in SMILES order (e.g. ``N#CC#CC#N``,
zwitterions), so the SMILES atoms are placed on the XYZ atoms by matching the SMILES graph into
the geometry's covalent contacts (atoms closer than the sum of their covalent radii + 0.45 Å;
elements must agree, bond orders are ignored; strained rings add contacts that are not bonds,
hence a match into the contacts rather than an isomorphism).
Two of the 130,831 molecules (QM9 numbers 133857 and 133859, strained cages) relaxed into a
geometry whose bonds are not those of their SMILES: their bonds are then read from the geometry
(RDKit's ``DetermineBonds``, neutral molecule), as PyG's SDF-based reading does for every molecule,
and :attr:`MoleculeGraph.bonds_from_geometry` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .reader import MissingExtraError

__all__ = ["BOND_TYPES", "ELEMENTS", "MoleculeGraph", "molecule_graph", "require_rdkit"]

ELEMENTS: tuple[str, ...] = ("H", "C", "N", "O", "F")
BOND_TYPES: tuple[str, ...] = ("SINGLE", "DOUBLE", "TRIPLE", "AROMATIC")
NODE_FEATURES = len(ELEMENTS) + 6


def require_rdkit():
    """RDKit's ``Chem`` module, or one error naming the extra that installs it."""
    try:
        from rdkit import Chem, RDLogger
    except ImportError as exc:
        raise MissingExtraError(
            "the QM9 workload builds molecular graphs with RDKit, which is not installed: "
            "pip install 'mtl-opt[qm9]'"
        ) from exc
    RDLogger.DisableLog("rdApp.*")
    return Chem


@dataclass(frozen=True)
class MoleculeGraph:
    """One molecule: node features ``x`` (N, 11), ``pos`` (N, 3) Å, directed bonds ``bond_index``
    (2, B) sorted by (source, target), and ``bond_type`` (B,) indices into :data:`BOND_TYPES`."""

    x: Tensor
    pos: Tensor
    bond_index: Tensor
    bond_type: Tensor
    bonds_from_geometry: bool = False

    @property
    def num_atoms(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_bonds(self) -> int:
        """Chemical bonds (each counted once; ``bond_index`` holds both directions)."""
        return int(self.bond_index.shape[1]) // 2


def molecule_graph(smiles: str, elements: list[str], positions: np.ndarray, *,
                   where: str = "molecule") -> MoleculeGraph:
    """The graph of one molecule from its SMILES, its XYZ element list and positions (Å).

    ``where`` names the molecule in errors (e.g. ``"qm9_part1.csv, molecule 24"``).
    """
    Chem = require_rdkit()
    n = len(elements)
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape != (n, 3):
        raise ValueError(f"{where}: {n} elements but positions of shape {positions.shape}")
    unknown = sorted(set(elements) - set(ELEMENTS))
    if unknown:
        raise ValueError(f"{where}: element(s) {unknown} are not QM9 elements {ELEMENTS}")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"{where}: RDKit cannot read the SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    if mol.GetNumAtoms() != n:
        raise ValueError(f"{where}: the SMILES {smiles!r} has {mol.GetNumAtoms()} atoms with "
                         f"hydrogens, the XYZ block {n}")
    place = _place_on_geometry(Chem, mol, elements, positions, smiles, where)
    from_geometry = place is None
    if from_geometry:
        mol, place = _molecule_from_geometry(Chem, elements, positions, smiles, where), list(range(n))

    x = torch.zeros(n, NODE_FEATURES)
    for atom in mol.GetAtoms():
        row = x[place[atom.GetIdx()]]
        row[ELEMENTS.index(atom.GetSymbol())] = 1.0
        row[5] = float(atom.GetAtomicNum())
        row[6] = float(atom.GetIsAromatic())
        hybrid = atom.GetHybridization()
        row[7] = float(hybrid == Chem.HybridizationType.SP)
        row[8] = float(hybrid == Chem.HybridizationType.SP2)
        row[9] = float(hybrid == Chem.HybridizationType.SP3)
    pairs: list[tuple[int, int, int]] = []
    for bond in mol.GetBonds():
        kind = str(bond.GetBondType()).split(".")[-1]
        if kind not in BOND_TYPES:
            raise ValueError(f"{where}: bond type {kind} is none of {BOND_TYPES}")
        a, b = place[bond.GetBeginAtomIdx()], place[bond.GetEndAtomIdx()]
        pairs += [(a, b, BOND_TYPES.index(kind)), (b, a, BOND_TYPES.index(kind))]
    pairs.sort()
    bond_index = torch.tensor([[p[0] for p in pairs], [p[1] for p in pairs]], dtype=torch.long)
    bond_type = torch.tensor([p[2] for p in pairs], dtype=torch.long)
    if pairs:  # number of hydrogen neighbours, counted on the graph (PyG's num_hs)
        is_h = x[:, 0]
        x[:, 10].index_add_(0, bond_index[1], is_h[bond_index[0]])
    return MoleculeGraph(x=x, pos=torch.tensor(positions, dtype=torch.float32),
                         bond_index=bond_index.reshape(2, -1), bond_type=bond_type,
                         bonds_from_geometry=from_geometry)


def _place_on_geometry(Chem, mol, elements: list[str], positions: np.ndarray, smiles: str,
                       where: str) -> list[int] | None:
    """``place[k]``: the XYZ index of SMILES atom ``k`` (the SMILES graph matched into the
    geometry's contacts); ``None`` when the SMILES graph is not among them."""
    n = len(elements)
    symbols = [a.GetSymbol() for a in mol.GetAtoms()]
    if sorted(symbols) != sorted(elements):
        raise ValueError(f"{where}: the SMILES {smiles!r} and the XYZ block have different atoms")
    geometry = _connectivity_graph(Chem, elements, positions)
    if n == 1:
        return [0]
    # Fast path: atoms listed in the same order and every SMILES bond a geometric bond.
    if symbols == list(elements) and all(
            geometry.GetBondBetweenAtoms(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) is not None
            for b in mol.GetBonds()):
        return list(range(n))
    pattern = _bare_graph(Chem, symbols, [(b.GetBeginAtomIdx(), b.GetEndAtomIdx())
                                          for b in mol.GetBonds()])
    match = geometry.GetSubstructMatch(pattern)
    return list(match) if len(match) == n else None


def _molecule_from_geometry(Chem, elements: list[str], positions: np.ndarray, smiles: str, where: str):
    """The molecule with bonds and bond orders perceived from the coordinates (neutral, sanitised),
    atoms in XYZ order: for a geometry that does not hold its SMILES' bonds."""
    from rdkit.Chem import rdDetermineBonds

    block = f"{len(elements)}\n\n" + "\n".join(
        f"{e} {x:.10f} {y:.10f} {z:.10f}" for e, (x, y, z) in zip(elements, positions))
    try:
        mol = Chem.MolFromXYZBlock(block)
        rdDetermineBonds.DetermineBonds(mol, charge=0)
        Chem.SanitizeMol(mol)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"{where}: the geometry does not hold the bonds of the SMILES {smiles!r}, "
                         f"and RDKit cannot perceive bonds from it ({exc})") from None
    return mol


_COVALENT_RADIUS = {"H": 0.31, "C": 0.76, "N": 0.71, "O": 0.66, "F": 0.57}  # Å, Cordero et al. 2008
_BOND_TOLERANCE = 0.45  # Å added to the sum of covalent radii


def _connectivity_graph(Chem, elements: list[str], positions: np.ndarray):
    """Atoms joined when closer than the sum of their covalent radii + 0.45 Å (single bonds)."""
    radii = np.array([_COVALENT_RADIUS[e] for e in elements])
    dist = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
    close = dist < radii[:, None] + radii[None, :] + _BOND_TOLERANCE
    i, j = np.nonzero(np.triu(close, k=1))
    return _bare_graph(Chem, list(elements), list(zip(i.tolist(), j.tolist())))


def _bare_graph(Chem, symbols: list[str], bonds: list[tuple[int, int]]):
    """A molecule of neutral atoms and single bonds: the graph alone, for isomorphism matching."""
    graph = Chem.RWMol()
    for symbol in symbols:
        atom = Chem.Atom(symbol)
        atom.SetNoImplicit(True)
        graph.AddAtom(atom)
    for a, b in bonds:
        graph.AddBond(int(a), int(b), Chem.BondType.SINGLE)
    out = graph.GetMol()
    out.UpdatePropertyCache(strict=False)
    return out
