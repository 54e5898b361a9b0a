"""Radiology report generation (RRG): data, model, labeler, metrics and training.

Data, labeler and metrics (this module's light imports: numpy and torch; PIL only when real
images are read; the coco-caption scorers only when NLG metrics are computed):

* :data:`OBSERVATIONS`, :func:`labels_to_classes` — the 14 CheXpert observations and encodings;
* :class:`ReportTokenizer`, :func:`clean_report` — R2Gen's report cleaning and vocabulary;
* :class:`SyntheticCXR` — a procedural chest X-ray + report set with disagreement knobs;
* :class:`R2GenDataset` — IU X-Ray / MIMIC-CXR in the R2Gen ``annotation.json`` layout;
* :func:`collate_rrg` — batches of images, tokens, labels and four-class targets;
* :class:`CheXpertLabeler` — a rule labeler in the spirit of the CheXpert labeler;
* :func:`nlg_metrics`, :func:`clinical_efficacy` — coco-caption metrics and CE P/R/F1
  (:data:`CE_PRESETS`: the PromptMRG and CAME-Grad conventions).

Model and training, loaded on first use (module-level ``__getattr__``), so that importing this
package does not build the model code: :class:`RRGModel`, :class:`ModelConfig`,
:class:`RRGConfig`, :func:`train_rrg`, :func:`evaluate_rrg`, :func:`load_run` and
:func:`compare_rrg`.
"""

from .labeler import CheXpertLabeler
from .metrics import CE_PRESETS, NLG_KEYS, clinical_efficacy, nlg_metrics
from .observations import OBSERVATIONS, classes_to_labels, labels_to_classes
from .r2gen import MalformedStudyError, R2GenDataset, collate_rrg
from .synthetic import NO_DISAGREEMENT, SyntheticCXR
from .tokenizer import ReportTokenizer, clean_report

__all__ = [
    "OBSERVATIONS", "labels_to_classes", "classes_to_labels",
    "ReportTokenizer", "clean_report",
    "SyntheticCXR", "NO_DISAGREEMENT", "R2GenDataset", "MalformedStudyError", "collate_rrg",
    "CheXpertLabeler", "nlg_metrics", "clinical_efficacy", "NLG_KEYS", "CE_PRESETS",
    "RRGModel", "ModelConfig", "RRGConfig", "train_rrg", "evaluate_rrg", "load_run", "compare_rrg",
]

_LAZY = {
    "RRGModel": "model", "ModelConfig": "model",
    "RRGConfig": "train", "train_rrg": "train", "evaluate_rrg": "train", "load_run": "train",
    "compare_rrg": "compare",
}


def __getattr__(name: str):
    """Import the model and training entry points on first access."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
