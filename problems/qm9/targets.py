"""The 11 QM9 targets of the multi-task benchmark, their units and their conversions.

The multi-task papers that report QM9 (Nash-MTL, Navon et al. ICML 2022; FAMO, Liu et al.
NeurIPS 2023; FairGrad, Ban & Ji ICML 2024) train on PyTorch Geometric's QM9 targets
``[0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]``: every one of the first twelve except the gap (4), with
U0, U, H and G taken as *atomization* energies (PyG indices 12–15, as DimeNet does) and c_v last.
This module holds that order, the units PyG converts the raw QM9 values to, and the units the
papers' tables report (meV for the seven energies).

Raw QM9 values (Ramakrishnan et al., Sci. Data 2014) are in Hartree for energies; PyG converts
Hartree to eV with ``1 Ha = 27.211386246 eV``. The atomization energy of a molecule is its
energy minus the energies of its free atoms, ``E_at = E - Σ_atoms E_ref(Z)``, with the free-atom
references of QM9's ``atomref`` table (B3LYP/6-31G(2df,p), Hartree).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ATOM_REFERENCE_HARTREE", "HARTREE_TO_EV", "QM9_TARGETS", "QM9Target", "TARGET_NAMES"]

#: CODATA 2018 Hartree energy in eV, the factor PyTorch Geometric's QM9 uses.
HARTREE_TO_EV = 27.211386246

#: Free-atom reference energies (Hartree) of QM9's atomref table, per element and energy kind.
ATOM_REFERENCE_HARTREE: dict[str, dict[str, float]] = {
    "U0": {"H": -0.500273, "C": -37.846772, "N": -54.583861, "O": -75.064579, "F": -99.718730},
    "U": {"H": -0.498857, "C": -37.845355, "N": -54.582445, "O": -75.063163, "F": -99.717314},
    "H": {"H": -0.497912, "C": -37.844411, "N": -54.581501, "O": -75.062219, "F": -99.716370},
    "G": {"H": -0.510927, "C": -37.861317, "N": -54.598897, "O": -75.079532, "F": -99.733544},
}


@dataclass(frozen=True)
class QM9Target:
    """One regression target: where it comes from and in which units it is learnt and reported.

    ``value = column × to_target_unit`` (minus the atom references for atomization energies);
    a reported MAE is ``MAE(target units) × report_scale`` in ``report_unit``.
    """

    name: str
    column: str
    unit: str
    to_target_unit: float
    report_unit: str
    report_scale: float
    pyg_index: int
    atomization: str | None = None

    @property
    def metric(self) -> str:
        """The name of this target's test metric: its MAE in the papers' units."""
        return f"mae_{self.name}"


_EV = dict(unit="eV", to_target_unit=HARTREE_TO_EV, report_unit="meV", report_scale=1000.0)

#: The benchmark's 11 targets, in the papers' order (PyG indices 0, 1, 2, 3, 5, 6, 12-15, 11).
QM9_TARGETS: tuple[QM9Target, ...] = (
    QM9Target("mu", "Dipole_debye", "D", 1.0, "D", 1.0, 0),
    QM9Target("alpha", "Polarizability_bohr3", "a0^3", 1.0, "a0^3", 1.0, 1),
    QM9Target("homo", "HOMO_au", pyg_index=2, **_EV),
    QM9Target("lumo", "LUMO_au", pyg_index=3, **_EV),
    QM9Target("r2", "R2_bohr2", "a0^2", 1.0, "a0^2", 1.0, 5),
    QM9Target("zpve", "ZPVE_au", pyg_index=6, **_EV),
    QM9Target("U0", "InternalEnergy_0K_au", pyg_index=12, atomization="U0", **_EV),
    QM9Target("U", "InternalEnergy_298K_au", pyg_index=13, atomization="U", **_EV),
    QM9Target("H", "Enthalphy_298K_au", pyg_index=14, atomization="H", **_EV),
    QM9Target("G", "GibbsFreeEnergy_298K_au", pyg_index=15, atomization="G", **_EV),
    QM9Target("cv", "Heatcapacity_Cv_cal_mol_K", "cal/(mol K)", 1.0, "cal/(mol K)", 1.0, 11),
)

TARGET_NAMES: tuple[str, ...] = tuple(t.name for t in QM9_TARGETS)
