"""``--problem rrg``: the radiology report generation workload behind the sweep/ablation interface.

Each run is :func:`mtl_opt.problems.rrg.train.train_rrg` with an
:class:`~mtl_opt.problems.rrg.train.RRGConfig` built from

* the workload's options (any ``RRGConfig`` field except the ones below: ``data``,
  ``n_train``, ``model_size``, ``batch_size``, ``eval_max_samples``, ...), given as
  ``--problem rrg:n_train=256,model_size=small``;
* the training settings: ``method`` (with the fixed and searched hyperparameters written into its
  spec), ``optimizer``, ``lr``, ``steps``, ``log_every = record_every``, ``device`` and ``seed``.

Reported metrics: every logged training row (``loss_report``, ``loss_classification``,
``loss_weighted``, ``drift_cos``, ``diffusion``, ...) as training goes, and at the end the
evaluation metrics (``BLEU_1..4``, ``ROUGE_L``, ``CIDEr``, ``CE_*``, ``cls_*``, ``eval_loss_*``;
the per-observation CE F1 scores stay in each run's ``eval.json``). Evaluation metrics exist only at
the end, so a sweep that optimises one cannot use an early-stopping scheduler.

With several seeds the runs go one after the other; their rows are averaged step by step and
reported once all seeds have finished. Each run writes its folder (checkpoint, metrics, eval) under
``run_root`` (``<out>/runs`` in sweeps and ablations), one folder per configuration (a hash of
the hyperparameters and training settings) and seed.

METEOR needs Java; this adapter turns it off unless the options say ``meteor=True``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from mtl_opt.experiments.workloads import Callback, TrainingSettings, Workload

__all__ = ["RRGWorkload", "is_evaluation_metric"]

# Set by the training settings, not by the workload's options.
_FROM_SETTINGS = ("method", "optimizer", "lr", "steps", "epochs", "log_every", "device", "seed", "out")
_EVAL_PREFIXES = ("BLEU_", "METEOR", "ROUGE_L", "CIDEr", "CE_", "cls_", "eval_loss_")


def is_evaluation_metric(name: str) -> bool:
    """Metrics known only after training (the evaluation's)."""
    return name.startswith(_EVAL_PREFIXES)


def _spec(method: str, hyperparameters: Mapping[str, Any]) -> str:
    if not hyperparameters:
        return method
    return method + ":" + ",".join(f"{k}={v!r}" for k, v in hyperparameters.items())


class RRGWorkload(Workload):
    """Radiology report generation (``mtl_opt.problems.rrg``) as a sweep/ablation workload."""

    def __init__(self, **options: Any):
        from mtl_opt.problems.rrg.train import RRGConfig

        known = {f.name for f in dataclasses.fields(RRGConfig)}
        settings_keys = sorted(set(options) & set(_FROM_SETTINGS))
        if settings_keys:
            raise ValueError(
                f"--problem rrg options {settings_keys} are set by the study's own options "
                "(--method, --optimizer, --lr, --steps, --record-every, --device, --seeds)"
            )
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown rrg option(s) {unknown}; RRGConfig takes "
                             f"{', '.join(sorted(known - set(_FROM_SETTINGS)))}")
        self.options = {"meteor": False, **options}
        RRGConfig(**self.options).validate()  # bad options fail before any trial starts
        self.name = "rrg"
        self.run_root: str | None = None

    def default_metric(self) -> str:
        return "loss_weighted"

    def default_budget(self) -> dict[str, float]:
        """The RRG trainer's own defaults for the configured model size (tiny: 400 steps at 3e-3)."""
        from mtl_opt.problems.rrg.train import DEFAULT_LR_BY_SIZE, DEFAULT_STEPS_BY_SIZE, RRGConfig

        size = RRGConfig(**self.options).model_size
        return {"steps": DEFAULT_STEPS_BY_SIZE[size], "lr": DEFAULT_LR_BY_SIZE[size]}

    def final_only(self, metric: str) -> bool:
        return is_evaluation_metric(metric)

    def _config(self, settings: TrainingSettings, hyper: Mapping[str, Any], seed: int) -> Any:
        from mtl_opt.problems.rrg.train import RRGConfig

        import hashlib
        import json

        root = self.run_root or "rrg-runs"
        key = json.dumps({"hyper": dict(hyper), "lr": settings.lr, "optimizer": settings.optimizer,
                          "steps": settings.steps}, sort_keys=True, default=str)
        tag = hashlib.sha1(key.encode()).hexdigest()[:10]
        out = os.path.join(root, f"{settings.method}-{tag}-seed{seed}")
        return RRGConfig(**self.options, method=_spec(settings.method, hyper),
                         optimizer=settings.optimizer, lr=float(settings.lr), steps=settings.steps,
                         log_every=settings.record_every, device=settings.device, seed=int(seed),
                         out=out)

    def _train(self, settings: TrainingSettings, hyper: Mapping[str, Any], seed: int,
               on_row: Callback | None) -> tuple[list[tuple[int, dict[str, float]]], dict[str, float]]:
        from mtl_opt.problems.rrg.train import train_rrg

        rows: list[tuple[int, dict[str, float]]] = []

        def collect(step: int, metrics: Mapping[str, Any]) -> None:
            row = {k: float(v) for k, v in metrics.items() if k != "step"}
            rows.append((int(step), row))
            if on_row is not None:
                on_row(int(step), row)

        result = train_rrg(self._config(settings, hyper, seed), callback=collect)
        evaluation = {k: float(v) for k, v in result["eval"]["metrics"].items() if "/" not in k}
        if not rows:
            raise RuntimeError("train_rrg logged no training row (steps < log_every?)")
        return rows, evaluation

    def run(self, settings: TrainingSettings, hyperparameters: Mapping[str, Any],
            callback: Callback) -> None:
        seeds = list(settings.seeds)
        if len(seeds) == 1:
            rows, evaluation = self._train(settings, hyperparameters, seeds[0], callback)
            step, last = rows[-1]
            callback(step, {**last, **evaluation})
            return
        runs = [self._train(settings, hyperparameters, s, None) for s in seeds]
        steps = [step for step, _ in runs[0][0]]
        for rows, _ in runs[1:]:
            if [step for step, _ in rows] != steps:
                raise RuntimeError("the seeds' runs logged different steps; cannot average them")
        for i, step in enumerate(steps):
            keys = runs[0][0][i][1].keys()
            callback(step, {k: sum(r[0][i][1][k] for r in runs) / len(runs) for k in keys})
        eval_keys = runs[0][1].keys()
        mean_eval = {k: sum(r[1][k] for r in runs) / len(runs) for k in eval_keys}
        last = {k: sum(r[0][-1][1][k] for r in runs) / len(runs) for k in runs[0][0][-1][1]}
        callback(steps[-1], {**last, **mean_eval})

    def describe(self) -> dict[str, Any]:
        return {"name": "rrg", "kind": "rrg", "options": self.options}
