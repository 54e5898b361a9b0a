"""``SyntheticCXR``: a procedural chest X-ray report generation set that needs no download.

Each study is drawn from its own seeded generator (``seed``, index), so the set is deterministic,
has any size and costs nothing until an item is read. A study has a view (PA, or AP for portable
films), a true anatomy and findings (:mod:`.synthetic_render` draws them), a report written by a
simulated reader from a sentence grammar with paraphrases, negations and hedges, and
classification labels taken from the generator's truth.

Findings and default prevalences (per study): cardiomegaly 0.12, pleural effusion 0.10,
pneumothorax 0.04, consolidation 0.07, nodule 0.04, mass 0.02, oedema 0.06 (raises cardiomegaly
and effusion to 0.4), atelectasis 0.08, support devices 0.10, rib fracture 0.03. About half of
the studies are normal. The truth maps to the CheXpert observations as: Cardiomegaly, Pleural
Effusion, Pneumothorax, Consolidation, Edema, Atelectasis, Fracture, Support Devices directly;
Lung Lesion = nodule or mass; Lung Opacity = consolidation, oedema or atelectasis; No Finding = no
pathology; Enlarged Cardiomediastinum, Pneumonia and Pleural Other are not drawn and stay NaN
(blank), as an image cannot decide them.

**Disagreement knobs.** Real reports are not a function of the image; these knobs make the
reader (report) and the image-derived labels (classification target) disagree the way real
readers do. With all of them at 0 every drawn finding is reported plainly and the labels are the
truth; the defaults give the realistic disagreement listed beside each knob.

* ``undercall`` (0.10): probability the reader misses a present finding and writes the normal
  sentence instead ("no pleural effusion"); doubled for small/mild findings, halved for
  large/severe ones. Lowers report recall against the labels.
* ``overcall`` (0.03): probability the reader reports an absent finding (any but devices,
  fractures and masses); half of these are hedged ("cannot exclude a small left pleural
  effusion"). Lowers report precision.
* ``view_bias`` (0.5): on AP views the heart is drawn 12 % wider (magnification); with this
  probability the reader calls that heart enlarged although the true CTR is normal, and misses a
  small or moderate effusion layering on the supine film. View-dependent over- and under-calling.
* ``hedge`` (0.15): probability a reported true finding is hedged ("possible", "may represent",
  "cannot be excluded"), so its report label is uncertain (-1) while the image label is 1.
  Consolidations are also called "concerning for pneumonia" at this rate.
* ``nuisance`` (1.0): mean number (Poisson) of nuisance sentences per report about comparison,
  technique, positioning and the clinical indication ("rule out pneumonia"), which carry no image
  content; indications can carry label-like words, as real ones do.
* ``label_noise`` (0.02): probability each drawn observation's classification label is flipped
  (annotation noise), No Finding recomputed from the flipped labels.

Measured on 3000 studies (``seed=0``), reading the reports with :class:`CheXpertLabeler` and
comparing "report says positive" with "image label is 1" over the nine drawn observations other
than Lung Opacity (precision / recall), one knob at a time from no disagreement:

================================  =========  ======  ==================================
setting                           precision  recall  other effect
================================  =========  ======  ==================================
no disagreement                   1.000      1.000   labels = truth, reports exact
``undercall=0.3``                 1.000      0.627
``overcall=0.1``                  0.691      1.000   27 % of reports gain an uncertain
``view_bias=1.0``                 0.865      0.978   AP cardiomegaly / effusion errors
``hedge=0.5``                     1.000      0.488   31 % of reports carry an uncertain
``nuisance=3.0``                  1.000      1.000   7.6 sentences per report (4.6)
``label_noise=0.1``               1.000      1.000   9.6 % of label cells flipped
defaults                          0.778      0.733   2.2 % of label cells flipped
================================  =========  ======  ==================================

At the defaults 56 % of the studies are normal, 98 % of the reports contain a negation, 27 % a
hedge ("possible", "cannot exclude", "may", "questionable", "borderline", "concerning for", "rule
out"), a report has 5.6 sentences and 0.69 positive observations on average. What each knob does
to the gradient conflict between the report and classification tasks is measured with the model.

Items are dicts ``{"id", "image" (V, 1, H, W) float in [0, 1], "report", "labels" (14,)}``;
:meth:`SyntheticCXR.study` returns the truth behind one item and :meth:`SyntheticCXR.true_labels`
the noise-free labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .observations import N_OBSERVATIONS, OBSERVATION_INDEX
from .synthetic_render import (DEVICES, LOBES, NORMAL_CTR, SEVERITIES, SIZES, Finding, Study,
                               render_frontal, render_lateral)

DEFAULT_PREVALENCE: dict[str, float] = {
    "cardiomegaly": 0.12, "effusion": 0.10, "pneumothorax": 0.04, "consolidation": 0.07,
    "nodule": 0.04, "mass": 0.02, "edema": 0.06, "atelectasis": 0.08, "devices": 0.10,
    "fracture": 0.03,
}
FINDING_OBSERVATION: dict[str, str] = {
    "cardiomegaly": "Cardiomegaly", "effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation", "nodule": "Lung Lesion", "mass": "Lung Lesion",
    "edema": "Edema", "atelectasis": "Atelectasis", "devices": "Support Devices",
    "fracture": "Fracture",
}
#: Observations the generator decides (the others stay NaN in the labels).
DRAWN_OBSERVATIONS: tuple[str, ...] = (
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Fracture", "Support Devices", "No Finding",
)
#: Knob values that give no disagreement at all.
NO_DISAGREEMENT = dict(undercall=0.0, overcall=0.0, view_bias=0.0, hedge=0.0, nuisance=0.0, label_noise=0.0)


@dataclass(frozen=True)
class ReaderCall:
    """What the simulated reader wrote about one finding: ``positive``, ``uncertain`` or ``absent``."""

    finding: str
    status: str
    true: bool


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _side_words(side: str) -> str:
    return {"right": "right", "left": "left", "bilateral": "bilateral"}[side]


class SyntheticCXR(Dataset):
    """Seeded procedural chest X-ray + report set (see the module docstring for the knobs).

    ``views``: 1 (frontal) or 2 (frontal + lateral, the IU X-Ray layout). ``image_size``: pixels
    per side (32 for tests, 224 on a GPU). ``cache_images``: keep each rendered study in memory
    after its first read (float32, ``views x size²`` x 4 bytes per study: 200 kB at 224 px), for
    multi-epoch training where rendering (about 10 ms per study at 224 px on one core) would
    dominate; each DataLoader worker process holds its own cache.
    """

    def __init__(self, n: int, *, image_size: int = 32, views: int = 1, seed: int = 0,
                 undercall: float = 0.10, overcall: float = 0.03, view_bias: float = 0.5,
                 hedge: float = 0.15, nuisance: float = 1.0, label_noise: float = 0.02,
                 ap_fraction: float = 0.25, prevalence: dict[str, float] | None = None,
                 noise: float = 0.02, cache_images: bool = False) -> None:
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if int(image_size) != image_size or image_size < 16:
            raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
        if views not in (1, 2):
            raise ValueError(f"views must be 1 (frontal) or 2 (frontal + lateral), got {views!r}")
        for name, v in (("undercall", undercall), ("overcall", overcall), ("view_bias", view_bias),
                        ("hedge", hedge), ("label_noise", label_noise), ("ap_fraction", ap_fraction)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {v!r}")
        if nuisance < 0 or noise < 0:
            raise ValueError("nuisance and noise must be >= 0")
        prev = dict(DEFAULT_PREVALENCE)
        if prevalence is not None:
            unknown = set(prevalence) - set(prev)
            if unknown:
                raise ValueError(f"unknown findings in prevalence: {sorted(unknown)}; known: {sorted(prev)}")
            for k, v in prevalence.items():
                if not 0.0 <= float(v) <= 1.0:
                    raise ValueError(f"prevalence of {k} must be in [0, 1], got {v!r}")
            prev.update(prevalence)
        self.n = int(n)
        self.image_size = int(image_size)
        self.views = int(views)
        self.seed = int(seed)
        self.undercall, self.overcall, self.view_bias = float(undercall), float(overcall), float(view_bias)
        self.hedge, self.nuisance, self.label_noise = float(hedge), float(nuisance), float(label_noise)
        self.ap_fraction = float(ap_fraction)
        self.prevalence = prev
        self.noise = float(noise)
        self.cache_images = bool(cache_images)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"SyntheticCXR(n={self.n}, image_size={self.image_size}, views={self.views}, seed={self.seed}, "
                f"undercall={self.undercall}, overcall={self.overcall}, view_bias={self.view_bias}, "
                f"hedge={self.hedge}, nuisance={self.nuisance}, label_noise={self.label_noise})")

    # -- generation ---------------------------------------------------------------------------
    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, stream])

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for SyntheticCXR of {self.n} studies")
        return index

    def study(self, index: int) -> Study:
        """The generator's truth for study ``index``."""
        index = self._check_index(index)
        rng = self._rng(index, 0)
        view = "AP" if rng.random() < self.ap_fraction else "PA"
        ctr = float(rng.uniform(*NORMAL_CTR))
        p = self.prevalence
        findings: dict[str, Finding] = {}
        has_edema = rng.random() < p["edema"]
        for name in ("cardiomegaly", "effusion", "pneumothorax", "consolidation", "nodule", "mass",
                     "atelectasis", "devices", "fracture"):
            prob = p[name]
            if has_edema and name in ("cardiomegaly", "effusion"):
                prob = max(prob, 0.4)
            if name == "devices" and view == "AP":
                prob = min(1.0, prob * 3)  # portable films are mostly ICU patients with lines
            if rng.random() >= prob:
                continue
            side = _pick(rng, ("right", "left", "bilateral") if name in ("effusion", "atelectasis")
                         else ("right", "left"))
            if name == "effusion" and has_edema:
                side = "bilateral"
            f = Finding(side=side, size=_pick(rng, SIZES), severity=_pick(rng, SEVERITIES),
                        lobe=_pick(rng, LOBES if side == "right" else ("upper", "lower")),
                        position=(float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.5, 0.5))))
            if name == "devices":
                k = 1 + int(rng.integers(0, 2))
                f.devices = tuple(sorted(rng.choice(DEVICES, size=k, replace=False).tolist(),
                                         key=DEVICES.index))
            findings[name] = f
        if has_edema:
            findings["edema"] = Finding(side="bilateral", severity=_pick(rng, SEVERITIES))
        shift = (float(rng.uniform(-0.02, 0.02)), float(rng.uniform(-0.02, 0.02)))
        return Study(view=view, ctr=ctr, findings=findings, shift=shift,
                     anatomy_seed=int(rng.integers(2**31)))

    def true_labels(self, index: int) -> np.ndarray:
        """Noise-free image-derived labels (14,): 1 / 0 on drawn observations, NaN elsewhere."""
        return study_labels(self.study(index))

    def labels(self, index: int) -> np.ndarray:
        """Classification labels of study ``index``: the truth with ``label_noise`` flips."""
        labels = self.true_labels(index)
        if self.label_noise > 0:
            rng = self._rng(self._check_index(index), 2)
            flips = rng.random(N_OBSERVATIONS) < self.label_noise
            for name in DRAWN_OBSERVATIONS[:-1]:
                j = OBSERVATION_INDEX[name]
                if flips[j]:
                    labels[j] = 1.0 - labels[j]
            _set_no_finding(labels)
        return labels

    def reader_calls(self, index: int, study: Study | None = None) -> list[ReaderCall]:
        """What the simulated reader reports about each finding of study ``index``."""
        study = self.study(index) if study is None else study
        rng = self._rng(self._check_index(index), 1)
        calls = []
        for name in DEFAULT_PREVALENCE:
            f = study.findings.get(name)
            u = rng.random(4)  # fixed draws per finding keep knobs monotone in their effect
            if f is not None:
                scale = 1.0
                if f.size == "small" or (name in ("cardiomegaly", "edema", "consolidation") and f.severity == "mild"):
                    scale = 2.0
                elif f.size == "large" and name not in ("cardiomegaly", "edema", "consolidation"):
                    scale = 0.5
                elif f.severity == "severe" and name in ("cardiomegaly", "edema", "consolidation"):
                    scale = 0.5
                missed = u[0] < min(1.0, self.undercall * scale)
                if (name == "effusion" and study.view == "AP" and f.size != "large"
                        and u[1] < self.view_bias):
                    missed = True
                if missed:
                    status = "absent"
                elif u[2] < self.hedge:
                    status = "uncertain"
                else:
                    status = "positive"
                calls.append(ReaderCall(name, status, True))
            else:
                if name in ("devices", "fracture", "mass"):
                    calls.append(ReaderCall(name, "absent", False))
                    continue
                over = u[0] < self.overcall
                if name == "cardiomegaly" and study.view == "AP" and u[1] < self.view_bias:
                    over = True
                if over:
                    calls.append(ReaderCall(name, "positive" if u[3] < 0.5 else "uncertain", False))
                else:
                    calls.append(ReaderCall(name, "absent", False))
        return calls

    def report(self, index: int) -> str:
        """The report the simulated reader writes for study ``index``."""
        index = self._check_index(index)
        study = self.study(index)
        calls = self.reader_calls(index, study)
        rng = self._rng(index, 3)
        return write_report(study, calls, rng, nuisance=self.nuisance, hedge=self.hedge)

    def image(self, index: int) -> np.ndarray:
        """Images of study ``index``: float32 (views, size, size) in [0, 1]."""
        index = self._check_index(index)
        if index in self._cache:
            return self._cache[index].copy()
        study = self.study(index)
        views = [render_frontal(study, self.image_size, self.noise)]
        if self.views == 2:
            views.append(render_lateral(study, self.image_size, self.noise))
        out = np.stack(views)
        if self.cache_images:
            self._cache[index] = out.copy()
        return out

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        return {
            "id": f"synthetic-{self.seed}-{index}",
            "image": torch.from_numpy(self.image(index)).unsqueeze(1),
            "report": self.report(index),
            "labels": torch.from_numpy(self.labels(index).astype(np.float32)),
        }

    def reports(self) -> list[str]:
        """All reports (cheap: no images are drawn); for fitting a tokenizer."""
        return [self.report(i) for i in range(self.n)]


def _set_no_finding(labels: np.ndarray) -> None:
    path = [OBSERVATION_INDEX[o] for o in DRAWN_OBSERVATIONS if o not in ("No Finding", "Support Devices")]
    labels[OBSERVATION_INDEX["No Finding"]] = 0.0 if np.any(labels[path] == 1.0) else 1.0


def study_labels(study: Study) -> np.ndarray:
    """Image-derived labels of ``study`` (14,): 1 / 0 for drawn observations, NaN otherwise."""
    labels = np.full(N_OBSERVATIONS, np.nan)
    for name in DRAWN_OBSERVATIONS:
        labels[OBSERVATION_INDEX[name]] = 0.0
    for name in study.findings:
        labels[OBSERVATION_INDEX[FINDING_OBSERVATION[name]]] = 1.0
    if any(k in study.findings for k in ("consolidation", "edema", "atelectasis")):
        labels[OBSERVATION_INDEX["Lung Opacity"]] = 1.0
    _set_no_finding(labels)
    return labels


# -- the report grammar ---------------------------------------------------------------------------
_NUISANCE = (
    "comparison is made to the prior study.", "no prior studies are available for comparison.",
    "pa and lateral views of the chest were obtained.", "the patient is slightly rotated.",
    "lung volumes are low.", "there are degenerative changes of the thoracic spine.",
    "the study is limited by patient positioning.", "indication: cough.",
    "indication: rule out pneumonia.", "indication: shortness of breath.",
    "history of chest pain.", "compared with the radiograph from the previous day.",
)
_AP_NUISANCE = ("single portable ap view of the chest.", "portable upright ap radiograph of the chest.")


def _positive(name: str, f: Finding, rng: np.random.Generator) -> str:
    side, size, sev = _side_words(f.side), f.size, f.severity
    if name == "cardiomegaly":
        adv = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}[sev]
        return _pick(rng, (f"{sev} cardiomegaly.", f"the heart is {adv} enlarged.",
                           f"the cardiac silhouette is {adv} enlarged.", f"there is {sev} cardiomegaly."))
    if name == "effusion":
        if f.side == "bilateral":
            return _pick(rng, (f"{size} bilateral pleural effusions.", f"there are {size} bilateral pleural effusions."))
        return _pick(rng, (f"{size} {side} pleural effusion.", f"there is a {size} {side} pleural effusion.",
                           f"blunting of the {side} costophrenic angle consistent with a {size} pleural effusion."))
    if name == "pneumothorax":
        return _pick(rng, (f"{size} {side} pneumothorax.", f"there is a {size} {side} apical pneumothorax.",
                           f"a {size} {side} pneumothorax is present."))
    if name == "consolidation":
        lobe = f"{side} {f.lobe} lobe"
        return _pick(rng, (f"focal consolidation in the {lobe}.", f"{lobe} airspace consolidation.",
                           f"there is {sev} consolidation of the {lobe}."))
    if name == "nodule":
        mm = {"small": 6, "moderate": 9, "large": 12}[f.size]
        return _pick(rng, (f"{mm} mm nodule in the {side} {f.lobe} lobe.",
                           f"there is a {mm} mm pulmonary nodule in the {side} {f.lobe} lobe."))
    if name == "mass":
        cm = {"small": 3, "moderate": 4, "large": 6}[f.size]
        return _pick(rng, (f"{cm} cm mass in the {side} {f.lobe} lobe.",
                           f"there is a {cm} cm {side} {f.lobe} lobe mass."))
    if name == "edema":
        return _pick(rng, (f"{sev} pulmonary edema.", f"there is {sev} interstitial pulmonary edema.",
                           f"findings are consistent with {sev} pulmonary edema."))
    if name == "atelectasis":
        where = "bibasilar" if f.side == "bilateral" else f"{side} basilar"
        return _pick(rng, (f"{where} atelectasis.", f"there is {where} atelectasis.",
                           f"linear {where} atelectasis."))
    if name == "devices":
        parts = {"endotracheal tube": "an endotracheal tube terminates 4 cm above the carina",
                 "nasogastric tube": "a nasogastric tube extends below the diaphragm",
                 "central line": "a right central venous catheter terminates in the svc",
                 "pacemaker": "a left chest wall pacemaker is in place with leads in the right ventricle"}
        return " ".join(parts[d] + "." for d in f.devices)
    if name == "fracture":
        return _pick(rng, (f"acute fracture of the {side} posterior seventh rib.", f"{side} rib fracture."))
    raise ValueError(name)  # pragma: no cover


def _hedged(name: str, f: Finding, rng: np.random.Generator) -> str:
    side, size = _side_words(f.side), f.size
    if name == "cardiomegaly":
        return _pick(rng, ("the heart size is borderline.", "possible mild cardiomegaly.",
                           "the cardiac silhouette may be mildly enlarged."))
    bare = {
        "effusion": (f"{size} {side} pleural effusion" if f.side != "bilateral"
                     else "small bilateral pleural effusions"),
        "pneumothorax": f"{size} {side} pneumothorax",
        "consolidation": f"consolidation in the {side} {f.lobe} lobe",
        "nodule": f"{side} {f.lobe} lobe nodule",
        "mass": f"{side} {f.lobe} lobe mass",
        "edema": "mild pulmonary edema",
        "atelectasis": f"{side} basilar atelectasis",
        "devices": "support device",
        "fracture": f"{side} rib fracture",
    }[name]
    article = "" if name in ("consolidation", "edema", "atelectasis") or bare.endswith("s") else "a "
    return _pick(rng, (f"possible {bare}.", f"{article}{bare} cannot be excluded.",
                       f"cannot exclude {article}{bare}.", f"findings may represent {article}{bare}.",
                       f"questionable {bare}."))


def write_report(study: Study, calls: list[ReaderCall], rng: np.random.Generator, *, nuisance: float,
                 hedge: float) -> str:
    """Compose a report from the reader's calls: findings in anatomical order, normal sentences
    (negations) for what was not called, nuisance sentences; always ends with a period."""
    status = {c.finding: c.status for c in calls}
    said = {k for k, s in status.items() if s != "absent"}
    sentences: list[str] = []
    n_nuisance = int(rng.poisson(nuisance)) if nuisance > 0 else 0
    pool = list(_NUISANCE) + (list(_AP_NUISANCE) * 2 if study.view == "AP" else [])
    head = [pool[i] for i in rng.choice(len(pool), size=min(n_nuisance, len(pool)), replace=False)]
    sentences += head[: (len(head) + 1) // 2]

    def finding_of(name: str) -> Finding:
        return study.findings.get(name) or Finding(side=_pick(rng, ("right", "left")), size="small",
                                                   severity="mild", lobe="lower")

    def say(name: str) -> None:
        f = finding_of(name)
        text = _positive(name, f, rng) if status[name] == "positive" else _hedged(name, f, rng)
        if name == "consolidation" and status[name] == "positive" and rng.random() < hedge:
            text = text[:-1] + ", concerning for pneumonia."
        sentences.append(text)

    # Heart and mediastinum.
    if "cardiomegaly" in said:
        say("cardiomegaly")
    elif rng.random() < 0.85:
        sentences.append(_pick(rng, ("the heart size is normal.", "heart size is within normal limits.",
                                     "normal heart size.", "the cardiac silhouette is normal in size.",
                                     "the heart is not enlarged.")))
    if rng.random() < 0.6:
        sentences.append(_pick(rng, ("the mediastinal contours are normal.",
                                     "the cardiomediastinal silhouette is within normal limits.",
                                     "normal mediastinal contours.", "the hilar contours are unremarkable.")))
    # Lungs.
    lung_findings = [k for k in ("consolidation", "nodule", "mass", "edema", "atelectasis") if k in said]
    for k in lung_findings:
        say(k)
    if not lung_findings:
        sentences.append(_pick(rng, ("the lungs are clear.", "lungs are clear bilaterally.",
                                     "the lungs are clear without focal consolidation.",
                                     "no focal airspace consolidation.", "there is no focal consolidation.")))
    if "edema" not in said and rng.random() < 0.25:
        sentences.append(_pick(rng, ("no pulmonary edema.", "there is no evidence of pulmonary edema.")))
    if not ({"nodule", "mass"} & said) and rng.random() < 0.1:
        sentences.append("no suspicious pulmonary nodules or masses.")
    # Pleura.
    for k in ("effusion", "pneumothorax"):
        if k in said:
            say(k)
    missing = [k for k in ("effusion", "pneumothorax") if k not in said]
    if missing == ["effusion", "pneumothorax"]:
        if rng.random() < 0.9:
            sentences.append(_pick(rng, ("no pleural effusion or pneumothorax.",
                                         "there is no pleural effusion or pneumothorax.",
                                         "no pneumothorax or pleural effusion.",
                                         "there is no pneumothorax or large pleural effusion.")))
    elif missing == ["effusion"]:
        sentences.append(_pick(rng, ("no pleural effusion.", "there is no pleural effusion.")))
    elif missing == ["pneumothorax"]:
        sentences.append(_pick(rng, ("no pneumothorax.", "there is no pneumothorax.")))
    # Bones and devices.
    if "fracture" in said:
        say("fracture")
    elif rng.random() < 0.5:
        sentences.append(_pick(rng, ("no acute osseous abnormality.", "the osseous structures are intact.",
                                     "no displaced rib fractures.", "no acute bony abnormality.")))
    if "devices" in said:
        say("devices")
    sentences += head[(len(head) + 1) // 2:]
    return _capitalise(" ".join(sentences))


def _capitalise(text: str) -> str:
    parts = text.split(". ")
    return ". ".join(p[:1].upper() + p[1:] for p in parts)
