"""QM9 as a :class:`~mtl_opt.problems.workload.TrainingWorkload`: 11 regression tasks.

The protocol of the multi-task papers' QM9 code (Nash-MTL, Navon et al. ICML 2022; FAMO and
FairGrad reuse it):

* data: the 130,831 molecules, shuffled with the seed; the first 10,000 are the test split, the
  next 10,000 the validation split, the remaining 110,831 the training split. ``subset=N`` keeps
  the first N of the shuffled molecules and splits them in the same proportions (validation and
  test ``round(N · 10,000 / 130,831)`` each, at least one; so does a ``data_dir`` of fewer
  molecules);
* targets (:mod:`.targets`): standardised with the mean and standard deviation of the training
  split, ``y' = (y − mean) / std``;
* loss of task k: the mean squared error of the standardised target over the batch;
* metric of task k: the mean absolute error in the target's units (``mae_<name>``; the seven
  energies in meV, as the papers' tables), lower is better; Δm% against single-task baselines;
* model (:mod:`.model`): the MPNN encoder of width 64 shared by 11 linear heads; Adam at 1e-3,
  batch 120, 300 epochs.

Options: ``subset`` (molecules; ``None``: all), ``width`` (the encoder width; 64 in the papers,
smaller for CPU runs), ``split_seed`` (``None``: the run's seed, as the papers; an integer: one
split for every seed), ``data_dir`` (a folder of ``qm9_part*.csv`` files in qm9pack's layout;
``None``: qm9pack's own).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mtl_opt.problems.workload import (
    TaskLosses,
    TaskMetric,
    TrainingDefaults,
    TrainingWorkload,
    WorkloadData,
)

from .batching import MoleculeBatch, collate_molecules
from .featurize import MoleculeGraph, molecule_graph
from .model import QM9Model
from .reader import QM9Records, read_qm9
from .targets import QM9_TARGETS, TARGET_NAMES

__all__ = ["QM9", "QM9Split", "collate_qm9", "qm9_split_indices"]

#: The papers' split of the 130,831 molecules: test, validation (the rest is training).
PAPER_SIZES = {"total": 130_831, "test": 10_000, "val": 10_000}


class QM9Split(torch.utils.data.Dataset):
    """Molecular graphs and their standardised targets; items are ``(graph, y)``."""

    def __init__(self, graphs: list[MoleculeGraph], y: Tensor) -> None:
        self.graphs, self.y = graphs, y

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, i: int) -> tuple[MoleculeGraph, Tensor]:
        return self.graphs[i], self.y[i]


def collate_qm9(items: list[tuple[MoleculeGraph, Tensor]]) -> MoleculeBatch:
    """A list of :class:`QM9Split` items → one :class:`~.batching.MoleculeBatch`."""
    return collate_molecules([g for g, _ in items], torch.stack([y for _, y in items]))


def qm9_split_indices(n_molecules: int, seed: int, subset: int | None) -> dict[str, np.ndarray]:
    """Row numbers of the train / val / test splits: a seeded shuffle, test first, then val."""
    order = torch.randperm(n_molecules, generator=torch.Generator().manual_seed(seed)).numpy()
    if subset is not None:
        if subset > n_molecules:
            raise ValueError(f"qm9 option subset={subset} exceeds the {n_molecules} molecules read")
        order = order[:subset]
    held_out = max(1, round(len(order) * PAPER_SIZES["test"] / PAPER_SIZES["total"]))
    n_test = n_val = held_out
    if len(order) - n_test - n_val < 1:
        raise ValueError(f"qm9: {len(order)} molecules leave no training molecule after "
                         f"{n_test} test and {n_val} validation molecules")
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


@lru_cache(maxsize=2)
def _records(data_dir: str | None) -> QM9Records:
    return read_qm9(data_dir)


_GRAPHS: dict[tuple[str | None, int], MoleculeGraph] = {}


def _graph(data_dir: str | None, records: QM9Records, row: int) -> MoleculeGraph:
    """Molecule ``row``'s graph, built once per process."""
    key = (data_dir, row)
    if key not in _GRAPHS:
        _GRAPHS[key] = molecule_graph(records.smiles[row], records.elements[row],
                                      records.positions(row), where=records.where(row))
    return _GRAPHS[key]


class QM9(TrainingWorkload):
    """The 11-target QM9 benchmark of Nash-MTL / FAMO / FairGrad (module docstring)."""

    name = "qm9"
    task_names = TARGET_NAMES
    metrics = tuple(TaskMetric(t.metric, t.name, False) for t in QM9_TARGETS)
    defaults = TrainingDefaults(epochs=300, batch_size=120, lr=1e-3, optimizer="adam")

    def __init__(self, *, subset: int | None = None, width: int = 64, split_seed: int | None = None,
                 data_dir: str | os.PathLike | None = None) -> None:
        options = dict(subset=subset, width=width, split_seed=split_seed,
                       data_dir=None if data_dir is None else str(data_dir))
        super().__init__(**options)
        for key, low in (("subset", 3), ("width", 1)):
            v = options[key]
            if v is None and key == "subset":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"qm9 option {key} must be an integer >= {low}, got {v!r}")
        if split_seed is not None and (isinstance(split_seed, bool) or not isinstance(split_seed, int)
                                       or not 0 <= split_seed < 2**63):
            raise ValueError(f"qm9 option split_seed must be a non-negative integer or None, "
                             f"got {split_seed!r}")
        self.subset, self.width, self.split_seed = subset, width, split_seed
        self.data_dir = options["data_dir"]

    def data(self, seed: int) -> WorkloadData:
        records = _records(self.data_dir)
        rows = qm9_split_indices(len(records), self.split_seed if self.split_seed is not None else seed,
                                 self.subset)
        train_targets = records.targets[rows["train"]]
        mean = train_targets.mean(axis=0)
        std = train_targets.std(axis=0, ddof=1) if len(train_targets) > 1 else np.ones_like(mean)
        if not np.all(std > 0):
            flat = [t.name for t, s in zip(QM9_TARGETS, std) if not s > 0]
            raise ValueError(f"qm9: target(s) {flat} are constant over the training split; "
                             "standardisation needs a spread (use more molecules)")
        splits, from_geometry = {}, []
        for name, idx in rows.items():
            graphs = [_graph(self.data_dir, records, int(r)) for r in idx]
            from_geometry += [int(records.index[r]) for r, g in zip(idx, graphs) if g.bonds_from_geometry]
            y = torch.tensor((records.targets[idx] - mean) / std, dtype=torch.float32)
            splits[name] = QM9Split(graphs, y)
        scale = np.array([t.report_scale for t in QM9_TARGETS]) * std
        return WorkloadData(splits["train"], splits["val"], splits["test"], collate=collate_qm9,
                            info={"target_mean": mean.tolist(), "target_std": std.tolist(),
                                  "metric_scale": scale.tolist(),
                                  "bonds_from_geometry": sorted(from_geometry),
                                  "molecules": {k: [int(records.index[r]) for r in v[:5]]
                                                for k, v in rows.items()}})

    def build_model(self, data: WorkloadData) -> nn.Module:
        return QM9Model(len(QM9_TARGETS), self.width,
                        target_scale=torch.tensor(data.info["metric_scale"], dtype=torch.float64))

    def task_losses(self, model: nn.Module, batch: Any, *, features: bool = False) -> TaskLosses:
        prediction, z = model(batch)
        per_task = ((prediction.float() - batch.y) ** 2).mean(dim=0)
        return TaskLosses(list(per_task.unbind()), z if features else None)

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """MAE per target in the reported units (meV for energies), and the standardised MSE."""
        abs_sum = sq_sum = None
        n = 0
        for batch in batches:
            prediction, _ = model(batch)
            error = prediction.double() - batch.y.double()
            a, s = error.abs().sum(0), (error ** 2).sum(0)
            abs_sum = a if abs_sum is None else abs_sum + a
            sq_sum = s if sq_sum is None else sq_sum + s
            n += batch.num_graphs
        if n == 0:
            raise ValueError("qm9: nothing to evaluate (an empty split)")
        mae = (abs_sum / n * model.target_scale.to(abs_sum.device)).tolist()
        mse = (sq_sum / n).tolist()
        out = {t.metric: v for t, v in zip(QM9_TARGETS, mae)}
        out.update({f"loss_{t.name}": v for t, v in zip(QM9_TARGETS, mse)})
        return out
