"""Read QM9 from the CSV files of the ``qm9pack`` package (PyPI, MIT; Ramakrishnan et al.).

``qm9pack`` ships the 130,831 molecules of QM9 that PyTorch Geometric also keeps (the 133,885 of
the original release minus the 3,054 whose geometry failed the consistency check) as three CSV
files ``qm9pack/data/qm9_part{1,2,3}.csv``, one row per molecule: ``Index`` (the QM9 number),
``SMILES``, ``Elements`` (``['C','H',...]``), ``XYZ_Ang`` (``[[x, y, z], ...]`` in Å) and every
property in QM9's raw units (Debye, Bohr³, Hartree, Bohr², cal/(mol K)). The package is found
without importing it (its ``__init__`` needs setuptools' ``pkg_resources``).

:func:`read_qm9` returns the molecules with the 11 benchmark targets of
:mod:`~mtl_opt.problems.qm9.targets` in PyTorch Geometric's units.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .targets import ATOM_REFERENCE_HARTREE, QM9_TARGETS

__all__ = ["MissingExtraError", "QM9Records", "qm9pack_data_dir", "read_qm9"]

_BARE_POINT = re.compile(r"(?<=\d)\.(?![\d])")
_STRUCTURE_COLUMNS = ("Index", "SMILES", "Elements", "XYZ_Ang")
_MISSING_PACKAGE = ("the QM9 workload reads the molecules that the qm9pack package ships, and "
                    "qm9pack is not installed: pip install 'mtl-opt[qm9]'")


class MissingExtraError(ModuleNotFoundError, ValueError):
    """An optional dependency of the QM9 workload is not installed; the message names the extra.

    A ``ModuleNotFoundError`` for code that catches import errors, and a ``ValueError`` so that
    the command line reports it in one line, like any other unusable input."""


@dataclass(frozen=True)
class QM9Records:
    """Molecules in file order: QM9 numbers, SMILES, raw element and XYZ texts, and targets.

    ``targets`` is (N, 11) float64 in the units of :data:`QM9_TARGETS`; ``sources[i]`` names the
    file molecule ``i`` came from (for errors).
    """

    index: np.ndarray
    smiles: list[str]
    elements: list[list[str]]
    xyz: list[str]
    targets: np.ndarray
    sources: list[str]

    def __len__(self) -> int:
        return len(self.smiles)

    def positions(self, i: int) -> np.ndarray:
        """The (n_atoms, 3) coordinates of molecule ``i`` in Å, checked against its elements."""
        try:  # qm9pack writes some numbers as "0." (not JSON): complete them to "0.0"
            pos = np.asarray(json.loads(_BARE_POINT.sub(".0", self.xyz[i])), dtype=np.float64)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{self.where(i)}: XYZ_Ang is not a list of [x, y, z] rows") from exc
        if pos.shape != (len(self.elements[i]), 3) or not np.isfinite(pos).all():
            raise ValueError(f"{self.where(i)}: XYZ_Ang holds {pos.shape} values for "
                             f"{len(self.elements[i])} atoms (finite [x, y, z] rows expected)")
        return pos

    def where(self, i: int) -> str:
        """Names molecule ``i`` in errors: its file and QM9 number."""
        return f"{self.sources[i]}, molecule {int(self.index[i])}"


def qm9pack_data_dir() -> Path:
    """The folder of qm9pack's CSV files, or a :class:`MissingExtraError` naming the extra."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(_MISSING_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not folder.is_dir():
        raise MissingExtraError(f"qm9pack is installed but has no data folder at {folder}; "
                                "reinstall it: pip install --force-reinstall qm9pack")
    return folder


def read_qm9(data_dir: str | Path | None = None) -> QM9Records:
    """Every molecule of ``data_dir``'s ``qm9_part*.csv`` files (default: qm9pack's), sorted by
    file name; the targets converted to PyTorch Geometric's units.

    A missing folder or file, a missing column, a non-numeric or non-finite property or a
    malformed element list raises one ``ValueError`` naming the file (and the molecule).
    """
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - pandas comes with qm9pack and the test extra
        raise MissingExtraError(_MISSING_PACKAGE) from exc
    folder = qm9pack_data_dir() if data_dir is None else Path(data_dir)
    if not folder.is_dir():
        raise ValueError(f"QM9 data folder {str(folder)!r} does not exist")
    files = sorted(folder.glob("qm9_part*.csv"))
    if not files:
        raise ValueError(f"QM9 data folder {str(folder)!r} holds no qm9_part*.csv file")
    value_columns = [t.column for t in QM9_TARGETS]
    wanted = list(_STRUCTURE_COLUMNS) + value_columns
    index, smiles, elements, xyz, values, sources = [], [], [], [], [], []
    for path in files:
        try:
            header = pd.read_csv(path, nrows=0).columns
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a QM9 CSV file ({exc})") from exc
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} of the qm9pack layout")
        try:
            frame = pd.read_csv(path, usecols=wanted, dtype={c: "float64" for c in value_columns})
        except (ValueError, pd.errors.ParserError) as exc:
            raise ValueError(f"{path}: a property column is not numeric ({exc})") from exc
        block = frame[value_columns].to_numpy(dtype=np.float64)
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            first = int(frame["Index"].iloc[int(np.argmax(bad))])
            raise ValueError(f"{path}, molecule {first}: a property is missing or not finite")
        name = path.name
        for row, (number, text) in enumerate(zip(frame["Index"].tolist(), frame["Elements"].tolist())):
            try:
                atoms = json.loads(str(text).replace("'", '"'))
            except ValueError as exc:
                raise ValueError(f"{name}, molecule {number}: Elements {text!r} is not a list") from exc
            if not isinstance(atoms, list) or not atoms or not all(isinstance(a, str) for a in atoms):
                raise ValueError(f"{name}, molecule {number}: Elements {text!r} is not a list of symbols")
            elements.append(atoms)
        index.extend(frame["Index"].tolist())
        smiles.extend(str(s) for s in frame["SMILES"].tolist())
        xyz.extend(str(s) for s in frame["XYZ_Ang"].tolist())
        values.append(block)
        sources.extend([name] * len(frame))
    raw = np.concatenate(values)
    return QM9Records(index=np.asarray(index, dtype=np.int64), smiles=smiles, elements=elements,
                      xyz=xyz, targets=_to_target_units(raw, elements, sources, index),
                      sources=sources)


def _to_target_units(raw: np.ndarray, elements: list[list[str]], sources: list[str],
                     index: list[int]) -> np.ndarray:
    """Raw QM9 columns → the benchmark's targets (PyG units; energies atomization energies in eV)."""
    symbols = ("H", "C", "N", "O", "F")
    counts = np.zeros((len(elements), len(symbols)))
    for i, atoms in enumerate(elements):
        for atom in atoms:
            if atom not in symbols:
                raise ValueError(f"{sources[i]}, molecule {index[i]}: element {atom!r} is not one "
                                 f"of QM9's {symbols}")
            counts[i, symbols.index(atom)] += 1
    out = np.empty_like(raw)
    for k, target in enumerate(QM9_TARGETS):
        column = raw[:, k]
        if target.atomization is not None:
            reference = ATOM_REFERENCE_HARTREE[target.atomization]
            column = column - counts @ np.array([reference[s] for s in symbols])
        out[:, k] = column * target.to_target_unit
    return out
