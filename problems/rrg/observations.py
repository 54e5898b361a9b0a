"""The 14 CheXpert observations and the label encodings used by the RRG workload.

Two encodings of one report's labels are in use in the field:

* **CheXpert values** (what a CheXpert-style labeler writes): per observation ``1`` positive,
  ``0`` negative, ``-1`` uncertain, blank (here ``NaN``) not mentioned. "No Finding" is ``1`` when
  no pathology is positive or uncertain, blank otherwise.
* **Four classes** (PromptMRG's classification target, following CheXbert's output heads):
  ``0`` blank / not mentioned, ``1`` positive, ``2`` negative, ``3`` uncertain.

The column order is the one of CheXbert and PromptMRG (and of R2Gen's clinical-efficacy tables):
Enlarged Cardiomediastinum first, No Finding last. (The CheXpert dataset's CSV puts No Finding
first; these readers use the CheXbert order throughout.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

OBSERVATIONS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)
N_OBSERVATIONS = len(OBSERVATIONS)
OBSERVATION_INDEX: dict[str, int] = {name: i for i, name in enumerate(OBSERVATIONS)}

BLANK, POSITIVE, NEGATIVE, UNCERTAIN = 0, 1, 2, 3
CLASS_NAMES: tuple[str, ...] = ("blank", "positive", "negative", "uncertain")


def _check_label_values(a: np.ndarray) -> None:
    finite = a[~np.isnan(a)]
    bad = finite[~np.isin(finite, (-1.0, 0.0, 1.0))]
    if bad.size:
        raise ValueError(
            f"labels must be 1 (positive), 0 (negative), -1 (uncertain) or NaN (not mentioned); "
            f"found {sorted(set(bad.tolist()))[:5]}"
        )


def labels_to_classes(labels: Tensor | np.ndarray) -> Tensor:
    """Map CheXpert values (n, 14) in {1, 0, -1, NaN} to PromptMRG's four classes (n, 14) long.

    ``NaN -> 0`` (blank), ``1 -> 1`` (positive), ``0 -> 2`` (negative), ``-1 -> 3`` (uncertain).
    Any other value raises ``ValueError``.
    """
    if isinstance(labels, Tensor):
        device = labels.device
        a = labels.detach().to("cpu", torch.float64).numpy()
    else:
        device = torch.device("cpu")
        a = np.asarray(labels, dtype=np.float64)
    if a.ndim < 1 or a.shape[-1] != N_OBSERVATIONS:
        raise ValueError(f"labels must have last dimension {N_OBSERVATIONS}, got shape {a.shape}")
    _check_label_values(a)
    out = np.zeros(a.shape, dtype=np.int64)
    out[a == 1.0] = POSITIVE
    out[a == 0.0] = NEGATIVE
    out[a == -1.0] = UNCERTAIN
    return torch.from_numpy(out).to(device)


def classes_to_labels(classes: Tensor | np.ndarray) -> np.ndarray:
    """Inverse of :func:`labels_to_classes`: four classes -> float CheXpert values with NaN."""
    c = classes.detach().cpu().numpy() if isinstance(classes, Tensor) else np.asarray(classes)
    if c.ndim < 1 or c.shape[-1] != N_OBSERVATIONS:
        raise ValueError(f"classes must have last dimension {N_OBSERVATIONS}, got shape {c.shape}")
    if not np.isin(c, (0, 1, 2, 3)).all():
        raise ValueError("classes must be 0 (blank), 1 (positive), 2 (negative) or 3 (uncertain)")
    table = np.array([np.nan, 1.0, 0.0, -1.0])
    return table[c.astype(np.int64)]
