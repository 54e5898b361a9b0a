"""Readers for the R2Gen / PromptMRG dataset layout, and the batch collation of the RRG workload.

Layout (as R2Gen distributes IU X-Ray and MIMIC-CXR)::

    ROOT/annotation.json     {"train": [...], "val": [...], "test": [...]}
    ROOT/images/<image_path>

Each study is ``{"id": str, "report": str, "image_path": [str, ...], ...}``. IU X-Ray studies have
two views (frontal and lateral, both used); MIMIC-CXR studies list one or more images of which the
first is used (R2Gen's and PromptMRG's choice). Images are read with PIL as grey-scale, scaled by
their bit depth (8-bit by 255, 16-bit by 65535; see :func:`load_image`) and resized to
``image_size`` squared (bilinear), values in [0, 1]; augmentation belongs to the model. The
annotation and labels files are UTF-8 text (a byte-order mark is allowed).

Classification labels come from, in this order: ``labels_file`` (JSON ``{id: [14 values]}`` or a
CSV with an ``id`` column and one column per observation, values 1 / 0 / -1 / blank, CheXpert
order; or the string ``"annotation"`` for PromptMRG's annotation files, whose studies carry
CheXbert's four classes in a ``labels`` list: 0 blank, 1 positive, 2 negative, 3 uncertain) or the
labeler (default :class:`~mtl_opt.problems.rrg.labeler.CheXpertLabeler`) run on the
reference reports, as CheXbert labels are used in the literature.

Malformed input raises ``ValueError`` / ``FileNotFoundError`` naming the study and the file. With
``skip_bad=True`` bad studies are skipped instead, counted in ``n_skipped``, listed in ``skipped``
as ``(study id, reason)`` and announced with a warning; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .observations import N_OBSERVATIONS, OBSERVATIONS, classes_to_labels, labels_to_classes
from .tokenizer import clean_report

R2GEN_DATASETS = ("iu_xray", "mimic_cxr")
VIEWS = {"iu_xray": 2, "mimic_cxr": 1}


class MalformedStudyError(ValueError):
    """A study in an annotation file cannot be used; the message names the study and the file."""


def _read_labels_file(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file {path} does not exist")
    out: dict[str, np.ndarray] = {}
    if path.endswith(".json"):
        try:
            raw = json.loads(read_text(path, "labels file"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"labels file {path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"labels file {path} must map study id -> list of {N_OBSERVATIONS} labels")
        for sid, values in raw.items():
            out[str(sid)] = _label_row(values, f"study {sid!r} in labels file {path}")
        return out
    reader = csv.DictReader(io.StringIO(read_text(path, "labels file"), newline=""))
    fields = reader.fieldnames or []
    missing = [c for c in ("id", *OBSERVATIONS) if c not in fields]
    if missing:
        raise ValueError(f"labels file {path} lacks columns {missing}; expected 'id' and {list(OBSERVATIONS)}")
    for line, row in enumerate(reader, start=2):
        values = [row[c] for c in OBSERVATIONS]
        out[row["id"]] = _label_row(values, f"study {row['id']!r} (line {line}) in labels file {path}")
    return out


def read_text(path: str, what: str) -> str:
    """The text of the UTF-8 file ``path`` (a leading byte-order mark is dropped); a file that is
    not UTF-8 raises one ``ValueError`` naming it (``what``, e.g. "annotation file"), the offset
    of the first bad byte and the problem."""
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                         f"{exc.start}: {exc.reason}); save it as UTF-8") from None


def _label_row(values: Any, where: str) -> np.ndarray:
    if not isinstance(values, (list, tuple)) or len(values) != N_OBSERVATIONS:
        raise ValueError(f"{where}: expected {N_OBSERVATIONS} labels, got {values!r}")
    row = np.empty(N_OBSERVATIONS)
    for j, v in enumerate(values):
        if v is None or (isinstance(v, str) and v.strip() == ""):
            row[j] = np.nan
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: label {OBSERVATIONS[j]!r} is {v!r}, not 1 / 0 / -1 / blank") from None
        if not (math.isnan(f) or f in (1.0, 0.0, -1.0)):
            raise ValueError(f"{where}: label {OBSERVATIONS[j]!r} is {v!r}, not 1 / 0 / -1 / blank")
        row[j] = f
    return row


def _annotation_labels(values: Any, sid: str, path: str) -> np.ndarray:
    """PromptMRG's per-study ``labels``: 14 CheXbert classes (0 blank, 1 pos, 2 neg, 3 unc)."""
    if values is None:
        raise MalformedStudyError(f"study {sid!r} in {path} has no 'labels' (labels_file='annotation')")
    if (not isinstance(values, list) or len(values) != N_OBSERVATIONS
            or not all(isinstance(v, int) and 0 <= v <= 3 for v in values)):
        raise MalformedStudyError(f"study {sid!r} in {path}: 'labels' must be {N_OBSERVATIONS} classes "
                                  f"in 0..3, got {values!r}")
    return classes_to_labels(np.asarray(values))


#: PIL modes of one channel of 16-bit unsigned integers (16-bit grey-scale PNG and TIFF files).
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def load_image(path: str, image_size: int) -> np.ndarray:
    """Read one radiograph as float32 (image_size, image_size) in [0, 1] (grey-scale, bilinear).

    Values are scaled by the image's bit depth: 8-bit images (and 1-bit, palette and colour
    ones, converted to 8-bit grey-scale by PIL) by 255; 16-bit grey-scale images (PIL modes
    ``I;16*``, e.g. 16-bit PNG and TIFF radiographs) by 65535; images that PIL reads as 32-bit
    integers (mode ``I``) hold 16-bit data when every value is in 0..65535 and are scaled by 65535
    too. Floating-point images (mode ``F``) must already be in [0, 1]. Anything else (32-bit
    integers beyond 16 bits, floats outside [0, 1]) raises ``ValueError``: its range is unknown.
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in _UINT16_MODES or im.mode in ("I", "F"):
            pixels = _wide_pixels(np.asarray(im), im.mode, path)
            if pixels.shape != (image_size, image_size):
                resized = Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR)
                pixels = np.asarray(resized, dtype=np.float32)
            return np.clip(pixels, 0.0, 1.0)
        im = im.convert("L")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0


def _wide_pixels(raw: np.ndarray, mode: str, path: str) -> np.ndarray:
    """The pixels of a 16-bit, 32-bit integer or float image as float32 in [0, 1] (see
    :func:`load_image`)."""
    if mode == "F":
        if not (np.isfinite(raw).all() and raw.min() >= 0.0 and raw.max() <= 1.0):
            raise ValueError(f"image {path} holds floating-point values outside [0, 1] "
                             f"(range {float(np.nanmin(raw)):g}..{float(np.nanmax(raw)):g}); "
                             "save it as 8- or 16-bit grey-scale")
        return raw.astype(np.float32)
    if mode == "I" and (raw.min() < 0 or raw.max() > 65535):
        raise ValueError(f"image {path} holds 32-bit integers (range {int(raw.min())}..{int(raw.max())}) "
                         "beyond 16 bits: its intensity range is unknown; save it as 8- or 16-bit "
                         "grey-scale")
    return (raw.astype(np.float64) / 65535.0).astype(np.float32)


class R2GenDataset(Dataset):
    """One split of an R2Gen-layout dataset (IU X-Ray or MIMIC-CXR) as RRG items.

    Parameters: ``root`` holds ``annotation.json`` and ``images/`` (override with ``annotation``
    and ``image_dir``); ``dataset`` picks the view count and report cleaning; ``split`` is a key of
    the annotation; ``image_size`` the side in pixels; ``labels_file`` / ``labeler`` as in the
    module docstring; ``skip_bad`` skips malformed studies (counted, listed, warned) instead of
    raising. With ``skip_bad`` every image is opened once at construction to find unreadable ones.
    """

    def __init__(self, root: str, *, dataset: str = "iu_xray", split: str = "train", image_size: int = 224,
                 labels_file: str | None = None, skip_bad: bool = False, labeler: Any = None,
                 annotation: str | None = None, image_dir: str | None = None) -> None:
        if dataset not in R2GEN_DATASETS:
            raise ValueError(f"dataset must be one of {R2GEN_DATASETS}, got {dataset!r}")
        if int(image_size) != image_size or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
        self.root = str(root)
        self.dataset = dataset
        self.split = split
        self.image_size = int(image_size)
        self.views = VIEWS[dataset]
        self.annotation_path = annotation or os.path.join(self.root, "annotation.json")
        self.image_dir = image_dir or os.path.join(self.root, "images")
        self.skip_bad = bool(skip_bad)
        self.skipped: list[tuple[str, str]] = []

        entries = self._read_annotation()
        studies: list[dict] = []
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            try:
                study = self._check_entry(i, entry)
                if study["id"] in seen:
                    raise MalformedStudyError(f"study {study['id']!r} appears twice in split {split!r} "
                                              f"of {self.annotation_path}")
                seen.add(study["id"])
            except MalformedStudyError as exc:
                if not self.skip_bad:
                    raise
                sid = entry.get("id", f"#{i}") if isinstance(entry, dict) else f"#{i}"
                self.skipped.append((str(sid), str(exc)))
                continue
            studies.append(study)

        if labels_file == "annotation":
            kept = []
            for s in studies:
                try:
                    s["labels"] = _annotation_labels(s.pop("annotation_labels"), s["id"], self.annotation_path)
                except MalformedStudyError as exc:
                    if not self.skip_bad:
                        raise
                    self.skipped.append((s["id"], str(exc)))
                    continue
                kept.append(s)
            studies = kept
            self.label_source = f"the 'labels' of {self.annotation_path}"
        elif labels_file is not None:
            table = _read_labels_file(labels_file)
            kept = []
            for s in studies:
                if s["id"] not in table:
                    msg = f"study {s['id']!r} of {self.annotation_path} has no row in labels file {labels_file}"
                    if not self.skip_bad:
                        raise MalformedStudyError(msg)
                    self.skipped.append((s["id"], msg))
                    continue
                s["labels"] = table[s["id"]]
                kept.append(s)
            studies = kept
            self.label_source = f"labels file {labels_file}"
        else:
            if labeler is None:
                from .labeler import CheXpertLabeler

                labeler = CheXpertLabeler()
            labels = labeler.label([s["report"] for s in studies]) if studies else np.zeros((0, N_OBSERVATIONS))
            labels = np.asarray(labels, dtype=np.float64)
            if labels.shape != (len(studies), N_OBSERVATIONS):
                raise ValueError(f"labeler returned shape {labels.shape}, expected {(len(studies), N_OBSERVATIONS)}")
            for s, row in zip(studies, labels):
                s["labels"] = row
            self.label_source = f"{type(labeler).__name__} on the reference reports"

        for s in studies:
            s.pop("annotation_labels", None)
        self.studies = studies
        if self.skipped:
            shown = "; ".join(f"{sid}: {why}" for sid, why in self.skipped[:3])
            more = f" (and {len(self.skipped) - 3} more)" if len(self.skipped) > 3 else ""
            warnings.warn(f"skipped {len(self.skipped)} malformed studies of split {split!r} in "
                          f"{self.annotation_path}: {shown}{more}", stacklevel=2)
        if not self.studies:
            raise ValueError(f"split {split!r} of {self.annotation_path} has no usable studies"
                             + (f" ({len(self.skipped)} skipped)" if self.skipped else ""))

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def _read_annotation(self) -> list:
        path = self.annotation_path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"annotation file {path} does not exist (expected the R2Gen layout: "
                                    "ROOT/annotation.json and ROOT/images/)")
        try:
            ann = json.loads(read_text(path, "annotation file"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"annotation file {path} is not valid JSON: {exc}") from exc
        if not isinstance(ann, dict):
            raise ValueError(f"annotation file {path} must be a JSON object with train/val/test lists")
        if self.split not in ann:
            raise ValueError(f"annotation file {path} has no split {self.split!r}; it has {sorted(ann)}")
        entries = ann[self.split]
        if not isinstance(entries, list):
            raise ValueError(f"split {self.split!r} of {path} must be a list of studies")
        return entries

    def _check_entry(self, i: int, entry: Any) -> dict:
        path = self.annotation_path
        if not isinstance(entry, dict):
            raise MalformedStudyError(f"study #{i} of split {self.split!r} in {path} is not a JSON object")
        sid = entry.get("id")
        name = f"study {sid!r}" if sid is not None else f"study #{i}"
        missing = [k for k in ("id", "report", "image_path") if k not in entry]
        if missing:
            raise MalformedStudyError(f"{name} of split {self.split!r} in {path} lacks key(s) {missing}")
        sid = str(sid)
        report = entry["report"]
        if not isinstance(report, str) or not clean_report(report, self.dataset):
            raise MalformedStudyError(f"study {sid!r} in {path} has an empty report")
        paths = entry["image_path"]
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise MalformedStudyError(f"study {sid!r} in {path}: image_path must be a list of file names")
        if len(paths) < self.views:
            raise MalformedStudyError(f"study {sid!r} in {path} lists {len(paths)} image(s); "
                                      f"{self.dataset} needs {self.views}")
        files = [os.path.join(self.image_dir, p) for p in paths[: self.views]]
        for f in files:
            if not os.path.isfile(f):
                raise MalformedStudyError(f"study {sid!r} in {path}: image file {f} does not exist")
            if self.skip_bad:
                self._check_readable(sid, f)
        return {"id": sid, "report": report, "files": files, "annotation_labels": entry.get("labels")}

    def _check_readable(self, sid: str, f: str) -> None:
        from PIL import Image

        try:
            with Image.open(f) as im:
                im.load()
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            raise MalformedStudyError(f"study {sid!r}: image file {f} cannot be read ({exc})") from None

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int) -> dict:
        s = self.studies[index]
        views = []
        for f in s["files"]:
            try:
                views.append(load_image(f, self.image_size))
            except Exception as exc:  # noqa: BLE001
                raise MalformedStudyError(f"study {s['id']!r}: image file {f} cannot be read ({exc})") from None
        return {
            "id": s["id"],
            "image": torch.from_numpy(np.stack(views)).unsqueeze(1),
            "report": s["report"],
            "labels": torch.from_numpy(s["labels"].astype(np.float32)),
        }

    def reports(self) -> list[str]:
        """The reference reports of this split (for fitting a tokenizer on the train split)."""
        return [s["report"] for s in self.studies]

    def __repr__(self) -> str:
        return (f"R2GenDataset({self.root!r}, dataset={self.dataset!r}, split={self.split!r}, "
                f"studies={len(self)}, skipped={self.n_skipped}, labels from {self.label_source})")


def collate_rrg(batch: Sequence[dict], tokenizer: Any) -> dict[str, Any]:
    """Stack RRG items into a batch.

    Returns ``images`` (B, V, 1, H, W), ``tokens`` (B, T) long (``bos ... eos`` padded with
    ``tokenizer.pad_id``), ``labels`` (B, 14) float with NaN, ``classes`` (B, 14) long
    (0 blank, 1 positive, 2 negative, 3 uncertain), ``ids`` and ``reports``.
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    shapes = {tuple(item["image"].shape) for item in batch}
    if len(shapes) != 1:
        raise ValueError(f"images of one batch must share a shape; got {sorted(shapes)}")
    images = torch.stack([item["image"] for item in batch])
    encoded = [tokenizer.encode(item["report"]) for item in batch]
    length = max(len(e) for e in encoded)
    tokens = torch.full((len(batch), length), tokenizer.pad_id, dtype=torch.long)
    for i, e in enumerate(encoded):
        tokens[i, : len(e)] = torch.tensor(e, dtype=torch.long)
    labels: Tensor = torch.stack([item["labels"].to(torch.float32) for item in batch])
    return {
        "images": images,
        "tokens": tokens,
        "labels": labels,
        "classes": labels_to_classes(labels),
        "ids": [item["id"] for item in batch],
        "reports": [item["report"] for item in batch],
    }
