"""Radiology report generation as a training workload (:class:`~mtl_opt.problems.workload.TrainingWorkload`).

``get_training_workload("rrg", model_size="tiny", n_train=512)`` — or ``--workload rrg:...`` on
the command line — is the RRG data (the procedural synthetic chest X-ray set, or a folder in the
R2Gen layout), the tokenizer fitted on the training reports, the :class:`~.model.RRGModel`
(shared image encoder; report decoder, classification head and, with ``contrastive=True``, the
image–report contrastive head) and its task losses, trained by the one trainer
(:mod:`mtl_opt.experiments.trainer`) like every other workload.

Tasks and reported metrics (direction in brackets):

* ``report``: ``BLEU_4`` (↑), the clinical efficacy F1 of the generated reports under the
  PromptMRG convention ``CE_f1_example`` (↑) and the CAME-Grad one ``CE_f1_macro_pos_or_unc`` (↑),
  besides BLEU-1..3, ROUGE-L, CIDEr, METEOR (with ``meteor=True``; needs Java) and the whole CE
  grid (:func:`~.train.score_batches`);
* ``classification``: the head's accuracy over the 14 × 4 observation states ``cls_accuracy``
  (↑) and its positive-class F1 ``cls_f1_positive`` (↑);
* ``contrastive`` (with ``contrastive=True``): the evaluation InfoNCE loss
  ``eval_loss_contrastive`` (↓).

(``CEtrue_*``, the synthetic generator's true labels against the generated reports, needs the
dataset itself: ``mtl-opt rrg eval`` reports it; the workload's ``evaluate`` sees batches only.)

Task weights ω = (1, 4[, 1]): the authors' ``cls_weight=4``. Training defaults per model size
(tiny: 400 steps at 3e-3; small/base: 200 steps at 1e-3; AdamW, weight decay 0.01, batch 16) are
those of ``mtl-opt rrg train``; with equal settings the trainer reproduces that command's
training bit for bit (``tests/test_rrg_workload.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from mtl_opt.problems.workload import TaskLosses, TaskMetric, TrainingDefaults, TrainingWorkload, WorkloadData

__all__ = ["RRGTrainingWorkload", "WORKLOAD_OPTIONS"]

#: The :class:`~.train.RRGConfig` fields that are the workload's options (the rest — method,
#: seed, steps, lr, optimizer, device, ... — are the trainer's).
WORKLOAD_OPTIONS = ("data", "dataset", "labels_file", "skip_bad", "synthetic", "n_train", "n_val",
                    "n_test", "views", "image_size", "model_size", "contrastive", "beam_size",
                    "max_gen_length", "meteor", "eval_max_samples")


class RRGTrainingWorkload(TrainingWorkload):
    """The RRG workload: options are those of :data:`WORKLOAD_OPTIONS` (see
    :class:`~.train.RRGConfig` for each); ``meteor`` is off by default (it needs Java)."""

    name = "rrg"

    def __init__(self, *, data: str = "synthetic", dataset: str = "iu_xray", labels_file: str | None = None,
                 skip_bad: bool = False, synthetic: dict[str, Any] | None = None, n_train: int = 512,
                 n_val: int = 64, n_test: int = 64, views: int = 1, image_size: int | None = None,
                 model_size: str = "tiny", contrastive: bool = False, beam_size: int = 1,
                 max_gen_length: int | None = None, meteor: bool = False,
                 eval_max_samples: int | None = None) -> None:
        given = {k: v for k, v in locals().items() if k in WORKLOAD_OPTIONS}
        given["synthetic"] = dict(synthetic or {})
        defaults = {f.name: f.default for f in dataclasses.fields(_config_class())
                    if f.name in WORKLOAD_OPTIONS and f.default is not dataclasses.MISSING}
        defaults["synthetic"] = {}
        defaults["meteor"] = False
        super().__init__(**{k: v for k, v in given.items() if v != defaults.get(k)})
        self._config = _config_class()(**given)
        self._config.validate()  # bad options fail here, naming the option or the file
        from .train import DEFAULT_LR_BY_SIZE, DEFAULT_STEPS_BY_SIZE

        self.task_names = ("report", "classification", "contrastive")[: 3 if contrastive else 2]
        self.task_weights = (1.0, 4.0, 1.0)[: len(self.task_names)]
        metrics = [TaskMetric("BLEU_4", "report", True),
                   TaskMetric("CE_f1_example", "report", True),
                   TaskMetric("CE_f1_macro_pos_or_unc", "report", True),
                   TaskMetric("cls_accuracy", "classification", True),
                   TaskMetric("cls_f1_positive", "classification", True)]
        if contrastive:
            metrics.append(TaskMetric("eval_loss_contrastive", "contrastive", False))
        self.metrics = tuple(metrics)
        self.defaults = TrainingDefaults(epochs=None, steps=DEFAULT_STEPS_BY_SIZE[model_size], batch_size=16,
                                         lr=DEFAULT_LR_BY_SIZE[model_size], optimizer="adamw",
                                         weight_decay=0.01)

    def config(self, seed: int = 0) -> Any:
        """The :class:`~.train.RRGConfig` of these options (and ``seed``)."""
        return dataclasses.replace(self._config, seed=int(seed), synthetic=dict(self._config.synthetic))

    def data(self, seed: int) -> WorkloadData:
        from .r2gen import collate_rrg
        from .tokenizer import ReportTokenizer
        from .train import build_datasets, dataset_reports

        cfg = self.config(seed)
        splits = build_datasets(cfg)
        tokenizer = ReportTokenizer.fit(dataset_reports(splits["train"]),
                                        dataset="synthetic" if cfg.data == "synthetic" else cfg.dataset)
        return WorkloadData(splits["train"], splits["val"], splits["test"],
                            collate=functools.partial(collate_rrg, tokenizer=tokenizer),
                            info={"tokenizer": tokenizer})

    def build_model(self, data: WorkloadData) -> nn.Module:
        from .train import build_model

        model = build_model(self._config, data.info["tokenizer"])
        model.report_tokenizer = data.info["tokenizer"]  # what evaluate() decodes with
        return model

    def task_losses(self, model: nn.Module, batch: Any, *, features: bool = False) -> TaskLosses:
        out = model(batch["images"], batch["tokens"], batch["classes"])
        return TaskLosses([out[n] for n in model.task_names], out["memory"] if features else None)

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        """Generate a report per study and score it (:func:`~.train.score_batches`: NLG, CE,
        the classification head, the evaluation losses); METEOR only with ``meteor=True``."""
        from .train import score_batches

        cfg = self._config
        scored = score_batches(model, model.report_tokenizer, batches, max_length=cfg.max_gen_length,
                               beam_size=cfg.beam_size, meteor=cfg.meteor,
                               max_samples=cfg.eval_max_samples)
        self._samples = scored["samples"]  # the last evaluation's reports (the test's at the end)
        return {k: float(v) for k, v in scored["metrics"].items()
                if isinstance(v, (int, float)) and "/" not in k}


    def write_test_outputs(self, folder: Path) -> list[str]:
        """``samples.csv`` (every generated report beside its reference) and ``samples.md`` (the
        first five), as ``rrg train`` writes them, from the last evaluation (the test split's)."""
        from .train import _write_samples, write_samples_csv

        samples = getattr(self, "_samples", None)
        if not samples:
            return []
        write_samples_csv(Path(folder) / "samples.csv", samples)
        _write_samples(Path(folder) / "samples.md", samples, 5)
        return ["samples.csv", "samples.md"]

    def checkpoint_state(self, data: WorkloadData) -> dict[str, Any]:
        """The tokenizer (its vocabulary and settings): a checkpoint decodes without the data."""
        return {"tokenizer": data.info["tokenizer"].state_dict()}


def _config_class() -> Any:
    from .train import RRGConfig

    return RRGConfig
