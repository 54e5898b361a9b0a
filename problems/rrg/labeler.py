"""A rule-based CheXpert-style report labeler.

In the spirit of the CheXpert labeler (Irvin et al., AAAI 2019): three stages per report.

1. **Mention extraction.** Each sentence is searched for the phrases of every observation
   (``MENTIONS``). Two kinds of phrase: *findings* ("cardiomegaly", "pleural effusion",
   "endotracheal tube") that are positive unless negated or hedged, and *descriptors*
   ("heart size", "cardiomediastinal silhouette") that carry no label by themselves and take one
   from a modifier in their clause: "normal / within normal limits / unremarkable" -> negative,
   "enlarged / widened / increased" -> positive, "borderline / top normal / upper limits of
   normal" -> uncertain. "The lungs are clear" is a negative mention of Lung Opacity; look-alikes
   such as "pericardial effusion" are matched and ignored.
2. **Classification of each mention.** A sentence is cut into clauses at scope breakers ("but",
   "however", "although", "though", "except", "whereas", "there is/are"). Within the clause:
   a double-negated hedge ("cannot be excluded", "not ruled out", "difficult to exclude") anywhere
   around the mention makes it uncertain; otherwise the nearest cue *before* the mention decides
   (negation: "no", "not", "without", "negative for", "free of", "absence of", "resolution of",
   "removal of"; uncertainty: "may", "possible", "probable", "likely", "suspicious for",
   "concerning for", "questionable", "suggestive of", "versus", "rule out", ...); failing that, a
   cue shortly *after* it ("is not seen", "has resolved", "has been removed", "is suspected",
   "versus"); failing that the mention is positive.
3. **Aggregation.** Per observation over all mentions of the report: positive if any mention is
   positive, else uncertain if any is uncertain, else negative if any is negative, else blank
   (NaN). "No Finding" is 1 when no observation other than Support Devices is positive or
   uncertain, and blank otherwise (never 0), as in CheXpert.

Output: float array (n, 14) in :data:`~mtl_opt.problems.rrg.observations.OBSERVATIONS` order with
1 / 0 / -1 / NaN. Accuracy on the hand-labelled sentence set shipped in
``data/labeler_sentences.tsv`` is checked by the test suite.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from .observations import N_OBSERVATIONS, OBSERVATION_INDEX, OBSERVATIONS

FINDING, DESCRIPTOR, CLEAR, IGNORE = "finding", "descriptor", "clear", "ignore"
POS, NEG, UNC = 1.0, 0.0, -1.0

# (observation, kind, regex). Order matters only for equal-length overlaps; longer matches win.
MENTIONS: tuple[tuple[str, str, str], ...] = (
    # Phrases that look like a mention but are not one: consumed, never labelled.
    ("Pleural Effusion", IGNORE, r"pericardial effusions?"),
    # Enlarged Cardiomediastinum
    ("Enlarged Cardiomediastinum", FINDING,
     r"(?:enlarged|widened|wide|prominent) (?:cardio)?mediastin\w*(?: silhouette| contours?)?"),
    ("Enlarged Cardiomediastinum", FINDING, r"(?:cardio)?mediastinal (?:widening|enlargement)"),
    ("Enlarged Cardiomediastinum", FINDING, r"widening of the (?:cardio)?mediastin\w*"),
    ("Enlarged Cardiomediastinum", FINDING, r"enlarged cardiomediastinum"),
    ("Enlarged Cardiomediastinum", DESCRIPTOR,
     r"(?:cardio)?mediastinal (?:silhouettes?|contours?|structures|shadow)"),
    ("Enlarged Cardiomediastinum", DESCRIPTOR, r"(?:cardio)?mediastinum"),
    ("Enlarged Cardiomediastinum", DESCRIPTOR, r"hilar and mediastinal contours?"),
    # Cardiomegaly
    ("Cardiomegaly", FINDING, r"cardiomegaly"),
    ("Cardiomegaly", FINDING, r"cardiac (?:enlargement|silhouette enlargement)"),
    ("Cardiomegaly", FINDING, r"enlarge(?:d|ment of the) (?:heart|cardiac silhouette)"),
    ("Cardiomegaly", FINDING, r"enlarged cardiac (?:silhouette|size)"),
    ("Cardiomegaly", FINDING, r"(?:large|big) heart"),
    ("Cardiomegaly", DESCRIPTOR, r"(?:heart|cardiac) (?:size|silhouette|contours?|shadow)"),
    ("Cardiomegaly", DESCRIPTOR, r"heart"),
    # Lung Opacity
    ("Lung Opacity", FINDING,
     r"(?:airspace|air-space|air space|alveolar|interstitial|parenchymal|lung|pulmonary|hazy|patchy) "
     r"(?:opacit(?:y|ies)|disease|opacification)"),
    ("Lung Opacity", FINDING, r"opacit(?:y|ies)|opacification|infiltrates?|infiltration"),
    ("Lung Opacity", FINDING, r"(?:increased )?(?:haziness|density|densities)"),
    ("Lung Opacity", CLEAR, r"lungs? (?:are |is |remain |appear )?(?:otherwise )?(?:grossly )?clear"),
    ("Lung Opacity", CLEAR, r"clear lungs?"),
    # Lung Lesion
    ("Lung Lesion", FINDING, r"(?:pulmonary |lung )?nodules?|nodular (?:opacit(?:y|ies)|densit(?:y|ies))"),
    ("Lung Lesion", FINDING, r"(?:lung |pulmonary |cavitary )?masse?s?|lesions?|tumou?rs?|neoplasms?|"
                             r"carcinoma|malignancy|metastas[ie]s"),
    # Edema
    ("Edema", FINDING, r"(?:pulmonary |interstitial |alveolar )?o?edema"),
    ("Edema", FINDING, r"(?:pulmonary )?vascular congestion|pulmonary congestion|congestive heart failure|chf"),
    ("Edema", FINDING, r"fluid overload"),
    # Consolidation
    ("Consolidation", FINDING, r"consolidat(?:ion|ions|ive|ed)"),
    # Pneumonia
    ("Pneumonia", FINDING, r"(?:broncho)?pneumonias?|infectious process|infection"),
    # Atelectasis
    ("Atelectasis", FINDING, r"atelecta(?:sis|ses|tic)|(?:lobar |lobe )?collapse|volume loss"),
    # Pneumothorax
    ("Pneumothorax", FINDING, r"pneumothora(?:x|ces)|ptx"),
    # Pleural Effusion
    ("Pleural Effusion", FINDING, r"(?:pleural )?effusions?|pleural fluid|hydrothorax"),
    ("Pleural Effusion", FINDING,
     r"blunting of the (?:left |right |bilateral )?costophrenic (?:angles?|sulc(?:us|i))"),
    ("Pleural Effusion", FINDING, r"(?:blunted|blunting of) (?:the )?(?:left |right )?costophrenic"),
    ("Pleural Effusion", FINDING, r"costophrenic (?:angle |sulcus )?blunting"),
    # Pleural Other
    ("Pleural Other", FINDING, r"pleural (?:thickening|scarring|plaques?|calcifications?)|fibrothorax"),
    # Fracture
    ("Fracture", FINDING, r"fractures?|fractured"),
    # Support Devices
    ("Support Devices", FINDING,
     r"(?:endotracheal|tracheostomy|et|nasogastric|ng|orogastric|og|enteric|feeding|chest|dobhoff)"
     r" tubes?"),
    ("Support Devices", FINDING,
     r"(?:picc|central venous|central|venous|arterial|dialysis|swan-ganz|midline) (?:lines?|catheters?)"),
    ("Support Devices", FINDING,
     r"pacemaker|pacer|defibrillator|aicd|icd|catheters?|tubes?|stents?|port-a-cath|"
     r"(?:support|monitoring|cardiac) devices?|pacing leads?|pacer leads?|sternotomy wires|drains?"),
)

_NEG_PRE = (r"\bno\b|\bnot\b|\bwithout\b|\bnegative for\b|\bfree of\b|\babsence of\b|\babsent\b|"
            r"\bresolution of\b|\bremoval of\b|\bresolved\b|\bnor\b|\bneither\b|\bclear of\b|\bnone\b")
_UNC_PRE = (r"\bmay\b|\bmight\b|\bcould\b|\bpossible\b|\bpossibly\b|\bprobable\b|\bprobably\b|"
            r"\blikely\b|\bsuspect(?:ed)?\b|\bsuspicious for\b|\bconcerning for\b|\bconcern for\b|"
            r"\bquestionable\b|\bquestion of\b|\bsuggestive of\b|\bsuggests\b|\bsuggesting\b|"
            r"\bversus\b|\bvs\b|\brule out\b|\br/o\b|\bdifferential\b|\bequivocal\b|"
            r"\bindeterminate\b|\bpresumed\b|\bpresumably\b|\bperhaps\b|\bpotential\b|"
            r"\bcannot be excluded\b|\bpossibility of\b|\bborderline\b|\bquestionably\b|\bconsider\b|"
            r"\b(?:evaluate|evaluation|assess|assessment) for\b")
_DOUBLE_NEG_UNC = (r"\b(?:can ?not|can't|could not|not|difficult to|hard to|impossible to)"
                   r"(?: be)?(?: entirely| completely| totally| definitely)? (?:exclude|excluded|rule out|ruled out)\b")
_NEG_POST = (r"\b(?:is|are|was|were|has|have|has been|have been)? ?(?:not (?:seen|identified|visualized|"
             r"appreciated|present|demonstrated|evident|detected|noted|visible|observed)|absent|resolved|"
             r"removed|no longer (?:seen|present|visualized|identified|evident))\b")
_UNC_POST = (r"\b(?:(?:is|are|was|were) (?:suspected|possible|questioned|likely|questionable|a consideration|"
             r"considered|not excluded)|may (?:be present|be seen|exist))\b")
# "atelectasis versus consolidation": a hedge for the words right before it, not a whole clause.
_VERSUS_POST = r"^[ ]*(?:\w+[ ]){0,2}?(?:versus|vs)\b"
_BREAK = (r"\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bexcept\b|\baside from\b|\bapart from\b|"
          r"\bwhereas\b|\bthere (?:is|are)\b|\bwhich\b")
# Descriptor modifiers, checked in this order (uncertain first: "upper limits of normal").
_MOD_UNC = (r"\b(?:borderline|top normal|top-normal|upper limits? of normal|high normal|"
            r"upper normal|mildly prominent|at the upper limits?)\b")
_MOD_NEG = r"\b(?:normal|within normal limits|unremarkable|not enlarged|not widened|stable in size)\b"
_MOD_POS = (r"\b(?:enlarged|enlargement|widened|widening|wide|increased|large|prominent|"
            r"globular|mildly enlarged|moderately enlarged|severely enlarged)\b")

_SENTENCE_SPLIT = re.compile(r"(?<!\d)\.(?!\d)|[;?!:\n]")
_POST_WINDOW = 60   # characters after a mention searched for a post cue / descriptor modifier
_PRE_WINDOW = 25    # characters before a descriptor searched for a modifier ("normal heart size")


class CheXpertLabeler:
    """Rule labeler: ``label(texts) -> float array (n, 14)`` with 1 / 0 / -1 / NaN.

    Fast enough for evaluation sets (10⁴ reports in a few seconds on one core): one combined
    regular expression per stage, no parsing.
    """

    def __init__(self) -> None:
        parts = []
        self._group_info: dict[str, tuple[int, str]] = {}
        for i, (obs, kind, pattern) in enumerate(MENTIONS):
            if obs not in OBSERVATION_INDEX:
                raise ValueError(f"unknown observation {obs!r} in the mention table")
            name = f"m{i}"
            self._group_info[name] = (OBSERVATION_INDEX[obs], kind)
            parts.append(f"(?P<{name}>{pattern})")
        self._mention = re.compile(r"\b(?:" + "|".join(parts) + r")\b")
        self._neg_pre = re.compile(_NEG_PRE)
        self._unc_pre = re.compile(_UNC_PRE)
        self._double = re.compile(_DOUBLE_NEG_UNC)
        self._neg_post = re.compile(_NEG_POST)
        self._unc_post = re.compile(_UNC_POST)
        self._versus_post = re.compile(_VERSUS_POST)
        self._unc_any = re.compile(_UNC_PRE)
        self._break = re.compile(_BREAK)
        self._mod_unc = re.compile(_MOD_UNC)
        self._mod_neg = re.compile(_MOD_NEG)
        self._mod_pos = re.compile(_MOD_POS)
        self._no_finding = OBSERVATION_INDEX["No Finding"]
        self._devices = OBSERVATION_INDEX["Support Devices"]

    # -- public -------------------------------------------------------------------------------
    def label(self, texts: Iterable[str]) -> np.ndarray:
        """Labels of each report: float array (n, 14), 1 / 0 / -1 / NaN (see module docstring)."""
        if isinstance(texts, str):
            raise TypeError("label() takes a sequence of reports; wrap a single report in a list")
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"report {i} is {type(text).__name__}, not str")
            rows.append(self.label_one(text))
        if not rows:
            return np.zeros((0, N_OBSERVATIONS))
        return np.stack(rows)

    def label_one(self, text: str) -> np.ndarray:
        """Labels of one report: float array (14,)."""
        best = np.full(N_OBSERVATIONS, np.nan)
        for obs, value in self.mentions(text):
            cur = best[obs]
            best[obs] = value if np.isnan(cur) else _merge(cur, value)
        pathologies = np.delete(best, [self._devices, self._no_finding])
        if not np.any((pathologies == POS) | (pathologies == UNC)):
            best[self._no_finding] = POS
        else:
            best[self._no_finding] = np.nan
        return best

    def mentions(self, text: str) -> list[tuple[int, float]]:
        """Every labelled mention of ``text`` as (observation index, 1 / 0 / -1)."""
        out: list[tuple[int, float]] = []
        text = " ".join(text.lower().replace("-", " - ").split()).replace(" - ", "-")
        for sentence in _SENTENCE_SPLIT.split(text):
            sentence = sentence.strip()
            if not sentence:
                continue
            for m in self._mention.finditer(sentence):
                obs, kind = self._group_info[m.lastgroup]
                value = self._classify(sentence, m.start(), m.end(), kind)
                if value is not None:
                    out.append((obs, value))
        return out

    # -- internals ----------------------------------------------------------------------------
    def _clause(self, sentence: str, start: int, end: int) -> tuple[int, int]:
        """Bounds of the clause holding [start, end): the nearest scope breakers around it."""
        lo, hi = 0, len(sentence)
        for b in self._break.finditer(sentence):
            if b.end() <= start:
                lo = max(lo, b.end())
            elif b.start() >= end:
                hi = min(hi, b.start())
                break
        return lo, hi

    def _classify(self, s: str, start: int, end: int, kind: str) -> float | None:
        lo, hi = self._clause(s, start, end)
        if kind == IGNORE:
            return None
        if kind == CLEAR:
            return NEG
        post_hi = min(hi, end + _POST_WINDOW)
        doubles = [d for d in self._double.finditer(s, lo, hi)]
        for d in doubles:
            if d.end() <= start or d.start() >= end and d.start() < post_hi:
                return UNC
        if kind == DESCRIPTOR:
            return self._descriptor(s, start, end, lo, hi)
        pre = self._nearest_pre(s, lo, start, doubles)
        if pre is not None:
            return pre
        for m in self._neg_post.finditer(s, end, post_hi):
            return NEG
        for m in self._unc_post.finditer(s, end, post_hi):
            return UNC
        if self._versus_post.match(s[end:post_hi]):
            return UNC
        return POS

    def _nearest_pre(self, s: str, lo: int, start: int, doubles: Sequence[re.Match]) -> float | None:
        best_pos, best = -1, None
        for regex, value in ((self._neg_pre, NEG), (self._unc_pre, UNC)):
            for m in regex.finditer(s, lo, start):
                if any(d.start() <= m.start() < d.end() for d in doubles):
                    continue
                if m.end() > best_pos:
                    best_pos, best = m.end(), value
        return best

    def _descriptor(self, s: str, start: int, end: int, lo: int, hi: int) -> float | None:
        """A descriptor ("heart size") takes its label from a modifier after, else before, it."""
        post_hi = min(hi, end + _POST_WINDOW)
        after = s[end:post_hi]
        # Stop at the next finding: "heart size is normal and there is edema"; a coordinated
        # descriptor shares the predicate: "heart size and mediastinal contours are normal".
        for nxt in self._mention.finditer(after):
            if self._group_info[nxt.lastgroup][1] != DESCRIPTOR:
                after = after[: nxt.start()]
                break
        value = self._modifier(after)
        if value is None:
            before = s[max(lo, start - _PRE_WINDOW):start]
            value = self._modifier(before)
        if value == POS:
            # "heart size is not enlarged", "no enlargement of the heart".
            window = s[max(lo, start - _PRE_WINDOW):end] + " " + after
            if re.search(r"\bnot\b|\bno\b|\bwithout\b", window):
                return NEG
            # "the cardiac silhouette may be mildly enlarged".
            if self._unc_any.search(window):
                return UNC
        return value

    def _modifier(self, text: str) -> float | None:
        if self._mod_unc.search(text):
            return UNC
        if self._mod_neg.search(text):
            return NEG
        if self._mod_pos.search(text):
            return POS
        return None


def _merge(a: float, b: float) -> float:
    """CheXpert's aggregation order: positive > uncertain > negative."""
    for v in (POS, UNC, NEG):
        if a == v or b == v:
            return v
    return a  # pragma: no cover


def observation_names(labels_row: np.ndarray) -> dict[str, float]:
    """``{observation: value}`` for the non-blank entries of one row of labels (for display)."""
    return {name: float(v) for name, v in zip(OBSERVATIONS, labels_row) if not np.isnan(v)}
