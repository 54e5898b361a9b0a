"""Report generation metrics as the field computes them.

**NLG metrics** use the coco-caption implementations (the ``pycocoevalcap`` package, as R2Gen and
PromptMRG do): BLEU-1..4 (corpus BLEU with the "closest" reference length), METEOR 1.5 (the Java
jar, ``-l en -norm``), ROUGE-L (LCS F-measure, beta 1.2) and CIDEr (CIDEr-D, n=4, sigma=6, idf over
the references of the evaluated set). R2Gen and PromptMRG score the strings as they come out of
their tokenizers, without coco-caption's PTB tokenizer; ``tokenization="none"`` does the same
(pass text cleaned with :func:`~mtl_opt.problems.rrg.tokenizer.clean_report`, as the tokenizer's
``decode`` produces). ``tokenization="ptb"`` runs coco-caption's Stanford PTB tokenizer (Java) and
drops punctuation, as the COCO caption evaluation does.

**Clinical efficacy** (CE) labels reference and generated reports with the report labeler and
compares the two label sets over the 14 observations. The literature reports "CE precision /
recall / F1" under two choices it rarely states, so every figure of the grid is computed:

* averaging: ``example`` (ratios per report, averaged over reports), ``macro`` (ratios per
  observation, averaged over the 14), ``micro`` (counts pooled over reports and observations);
* positive class: ``positive`` (label ``1`` only; uncertain, negative and blank are "not
  positive", as R2Gen's ``compute_ce.py`` and PromptMRG do) or ``positive_or_uncertain``
  (labels ``1`` and ``-1`` both count as positive, in reference and generated labels alike).

Keys: ``{precision,recall,f1}_{example,macro,micro}`` for the positive-only figures (unchanged
names) and ``{precision,recall,f1}_{example,macro,micro}_pos_or_unc`` for the others, plus
per-observation F1 ``f1/<observation>`` (positive only). A 0/0 ratio counts 0 everywhere
(scikit-learn's and pandas' ``fillna(0)`` convention). Two named presets pick the figure the two
conventions the field mixes under the same name report (:data:`CE_PRESETS`):

* ``"promptmrg"``: example-based, positive only: per report ``P = tp/(tp+fp)``, ``R = tp/(tp+fn)``,
  ``F1 = tp / (tp + ½(fp + fn))``, averaged over reports (PromptMRG, Jin et al. AAAI 2024);
* ``"came_grad"``: macro over the 14 observations with uncertain counted positive (the
  evaluation code released with "The Double Dilemma in Multi-Task Radiology Report Generation").

As in the field, "No Finding" is one of the 14 and a report that mentions nothing (even an empty
one) is labelled No Finding, so an empty generated report scores a true positive against a
normal reference.

**METEOR without Java.** METEOR is a Java program. When no ``java`` is on ``PATH``,
:func:`nlg_metrics` reports ``METEOR`` as ``None`` with ``METEOR_status`` saying why (never 0, so
a table cannot mistake it for a score); a Java that is present but fails or hangs raises.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .observations import N_OBSERVATIONS, OBSERVATIONS

NLG_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
CE_AVERAGES = ("example", "macro", "micro")
CE_POSITIVES = ("positive", "positive_or_uncertain")
#: Named CE conventions: preset -> (averaging, positive class). See the module docstring.
CE_PRESETS: dict[str, tuple[str, str]] = {
    "promptmrg": ("example", "positive"),
    "came_grad": ("macro", "positive_or_uncertain"),
}
#: What :func:`nlg_metrics` puts in ``METEOR_status`` when no Java runtime is found.
METEOR_NO_JAVA = "unavailable: no `java` executable on PATH"


def ce_key(stat: str, average: str, positive: str = "positive") -> str:
    """The :func:`clinical_efficacy` key of one figure, e.g. ``ce_key("f1", "macro",
    "positive_or_uncertain") == "f1_macro_pos_or_unc"``."""
    if stat not in ("precision", "recall", "f1"):
        raise ValueError(f"stat must be precision, recall or f1, got {stat!r}")
    if average not in CE_AVERAGES:
        raise ValueError(f"average must be one of {CE_AVERAGES}, got {average!r}")
    if positive not in CE_POSITIVES:
        raise ValueError(f"positive must be one of {CE_POSITIVES}, got {positive!r}")
    return f"{stat}_{average}" + ("" if positive == "positive" else "_pos_or_unc")


def ce_preset_keys(preset: str) -> dict[str, str]:
    """``{"precision": key, "recall": key, "f1": key}`` of a named preset (:data:`CE_PRESETS`)."""
    if preset not in CE_PRESETS:
        raise ValueError(f"unknown CE preset {preset!r}; choose {', '.join(CE_PRESETS)}")
    average, positive = CE_PRESETS[preset]
    return {stat: ce_key(stat, average, positive) for stat in ("precision", "recall", "f1")}


SUMMARY_KEYS = (*NLG_KEYS, "CE_f1_example", "CE_f1_macro_pos_or_unc", "CEtrue_f1_example",
                "CEtrue_f1_macro_pos_or_unc", "cls_accuracy", "cls_f1_positive")


def metrics_summary(metrics: dict[str, Any]) -> str:
    """The headline metrics on one line (``BLEU_4=0.1234, ...``); the rest stay in the JSON."""
    return ", ".join(f"{k}={format_metric(metrics[k])}" for k in SUMMARY_KEYS if k in metrics)


def format_metric(value: Any, digits: int = 4) -> str:
    """A metric for a table or log line: ``n/a (no Java)`` for an unavailable METEOR."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a (no Java)" if value is None else "nan"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def _require_pycocoevalcap() -> None:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "NLG metrics need the coco-caption scorers: pip install 'mtl-opt[rrg]' (pycocoevalcap)"
        ) from exc


def _require_java(what: str) -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(f"{what} runs a Java program and no `java` executable is on PATH; "
                           "install a Java runtime (8 or newer) or pass meteor=False")
    return java


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("references and hypotheses must be sequences of strings, not one string")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if len(references) == 0:
        raise ValueError("no reports to score")
    for name, seq in (("reference", references), ("hypothesis", hypotheses)):
        for i, s in enumerate(seq):
            if not isinstance(s, str):
                raise TypeError(f"{name} {i} is {type(s).__name__}, not str")
    for i, r in enumerate(references):
        if not r.split():
            raise ValueError(f"reference {i} is empty; every reference needs at least one word")


def _meteor(gts: dict, res: dict, timeout: float) -> float:
    """coco-caption's METEOR 1.5 with a watchdog: a stuck or dead JVM raises instead of hanging."""
    _require_java("METEOR")
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
    except OSError as exc:
        raise RuntimeError(f"could not start METEOR's Java process: {exc}") from exc
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["score"] = scorer.compute_score(gts, res)[0]
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=work, name="meteor", daemon=True)
    worker.start()
    worker.join(timeout)
    proc = scorer.meteor_p
    try:
        if worker.is_alive():
            proc.kill()
            worker.join(5.0)
            raise TimeoutError(f"METEOR's Java process gave no answer within {timeout:g} s and was killed "
                               "(check that `java -jar meteor-1.5.jar` runs here and has 2 GB of heap)")
        if "error" in result:
            proc.kill()
            stderr = b""
            with contextlib.suppress(Exception):
                stderr = proc.stderr.read() if proc.stderr else b""
            raise RuntimeError("METEOR's Java process failed: "
                               f"{result['error']!r}; stderr: {stderr.decode(errors='replace')[-500:]}")
        return float(result["score"])
    finally:
        # The scorer's own destructor takes a lock that a failed call leaves held (a deadlock at
        # garbage collection); end the process here and give the destructor a fresh lock.
        with contextlib.suppress(Exception):
            proc.stdin.close()
        with contextlib.suppress(Exception):
            proc.kill()
            proc.wait(timeout=10)
        scorer.lock = threading.Lock()


def _ptb_tokenize(texts: Sequence[str], timeout: float) -> list[str]:
    _require_java("the PTB tokenizer")
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    punct = set(ptbtokenizer.PUNCTUATIONS)
    cmd = ["java", "-cp", ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR,
           "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    text = "\n".join(t.replace("\n", " ") for t in texts)
    try:
        out = subprocess.run(cmd, input=text.encode(), cwd=jar_dir, capture_output=True,
                             timeout=timeout, check=True).stdout.decode()
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"the PTB tokenizer gave no answer within {timeout:.0f} s") from exc
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"the PTB tokenizer failed: {exc.stderr.decode(errors='replace')[-500:]}") from exc
    lines = out.split("\n")
    if len(lines) < len(texts):
        raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(texts)} texts")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in lines[: len(texts)]]


def nlg_metrics(references: Sequence[str], hypotheses: Sequence[str], *, tokenization: str = "none",
                meteor: bool = True, timeout: float = 300.0) -> dict[str, Any]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L and CIDEr of ``hypotheses`` against one reference each.

    Keys: ``BLEU_1 .. BLEU_4, METEOR, ROUGE_L, CIDEr`` (``METEOR`` omitted when ``meteor=False``).
    With ``meteor=True`` and no ``java`` on ``PATH``, ``METEOR`` is ``None`` and ``METEOR_status``
    is :data:`METEOR_NO_JAVA` (unavailable, not zero); a Java that fails or hangs raises.
    ``tokenization``: ``"none"`` (lower-cased, whitespace-split, as R2Gen/PromptMRG) or ``"ptb"``.
    ``timeout`` bounds each Java call (METEOR, PTB tokenizer) in seconds.
    Note that CIDEr's idf comes from the evaluated references, so a set of one report scores 0.
    """
    _require_pycocoevalcap()
    _check_pairs(references, hypotheses)
    if tokenization == "none":
        refs = [" ".join(r.lower().split()) for r in references]
        hyps = [" ".join(h.lower().split()) for h in hypotheses]
    elif tokenization == "ptb":
        toks = _ptb_tokenize([*references, *hypotheses], timeout)
        refs, hyps = toks[: len(references)], toks[len(references):]
    else:
        raise ValueError(f"tokenization must be 'none' or 'ptb', got {tokenization!r}")
    gts = {i: [r] for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # coco-caption's BLEU prints its length ratios
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for k, v in zip(NLG_KEYS[:4], bleu):
        out[k] = float(v)
    if meteor:
        if shutil.which("java") is None:
            out["METEOR"] = None
            out["METEOR_status"] = METEOR_NO_JAVA
        else:
            out["METEOR"] = _meteor(gts, res, timeout)
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def _as_labels(x: Any, labeler: Any, what: str) -> np.ndarray:
    if isinstance(x, str):
        raise TypeError(f"{what} must be a sequence of reports, not one string")
    if isinstance(x, (list, tuple)) and all(isinstance(t, str) for t in x):
        return np.asarray(labeler.label(list(x)), dtype=np.float64)
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != N_OBSERVATIONS:
        raise ValueError(f"{what} must be report strings or a label array (n, {N_OBSERVATIONS}); "
                         f"got shape {a.shape}")
    return a


def _safe_div(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def _ce_grid(r: np.ndarray, h: np.ndarray, suffix: str, out: dict[str, float]) -> np.ndarray:
    """Example/macro/micro P/R/F1 of boolean reference ``r`` and generated ``h`` (n, 14) into
    ``out`` (keys ending in ``suffix``); returns the per-observation F1."""
    tp = (r & h).sum(0).astype(np.float64)
    fp = (~r & h).sum(0).astype(np.float64)
    fn = (r & ~h).sum(0).astype(np.float64)
    p_mi = _safe_div(tp.sum(), tp.sum() + fp.sum())
    r_mi = _safe_div(tp.sum(), tp.sum() + fn.sum())
    out[f"precision_micro{suffix}"] = float(p_mi)
    out[f"recall_micro{suffix}"] = float(r_mi)
    out[f"f1_micro{suffix}"] = float(_safe_div(2 * p_mi * r_mi, p_mi + r_mi))
    f_c = _safe_div(2 * tp, 2 * tp + fp + fn)
    out[f"precision_macro{suffix}"] = float(_safe_div(tp, tp + fp).mean())
    out[f"recall_macro{suffix}"] = float(_safe_div(tp, tp + fn).mean())
    out[f"f1_macro{suffix}"] = float(f_c.mean())
    tp_e = (r & h).sum(1).astype(np.float64)
    fp_e = (~r & h).sum(1).astype(np.float64)
    fn_e = (r & ~h).sum(1).astype(np.float64)
    out[f"precision_example{suffix}"] = float(_safe_div(tp_e, tp_e + fp_e).mean())
    out[f"recall_example{suffix}"] = float(_safe_div(tp_e, tp_e + fn_e).mean())
    # tp / (tp + (fp + fn)/2) = 2tp / (2tp + fp + fn), PromptMRG's per-report F1.
    out[f"f1_example{suffix}"] = float(_safe_div(2 * tp_e, 2 * tp_e + fp_e + fn_e).mean())
    return f_c


def clinical_efficacy(references: Sequence[str] | np.ndarray, hypotheses: Sequence[str] | np.ndarray,
                      labeler: Any = None, *, preset: str | None = None) -> dict[str, float]:
    """CE precision/recall/F1 of generated vs reference reports, every convention at once.

    Each argument is a list of report strings (labelled with ``labeler``, default
    :class:`~mtl_opt.problems.rrg.labeler.CheXpertLabeler`) or a label array (n, 14) with
    1/0/-1/NaN. A cell is "positive" when its label is 1 (``positive``) or 1 or -1
    (``positive_or_uncertain``). With ``tp, fp, fn`` counted per observation c over reports:

    * micro: ``P = Σtp / (Σtp + Σfp)``, ``R = Σtp / (Σtp + Σfn)``, ``F1 = 2PR / (P + R)``;
    * macro: the mean over the 14 observations of the per-observation P, R and F1
      (F1_c = 2 tp_c / (2 tp_c + fp_c + fn_c)), 0 where undefined (scikit-learn's convention);
    * example-based (PromptMRG): the same ratios per report, averaged over reports.

    Keys: ``{precision,recall,f1}_{example,macro,micro}`` (positive only),
    the same with ``_pos_or_unc`` appended (uncertain counted positive), and ``f1/<observation>``.
    ``preset`` (``"promptmrg"`` or ``"came_grad"``, see :data:`CE_PRESETS`) adds ``precision``,
    ``recall`` and ``f1``: that preset's figures, copied from the grid.
    """
    if preset is not None and preset not in CE_PRESETS:
        raise ValueError(f"unknown CE preset {preset!r}; choose {', '.join(CE_PRESETS)}")
    if labeler is None:
        from .labeler import CheXpertLabeler

        labeler = CheXpertLabeler()
    ref = _as_labels(references, labeler, "references")
    hyp = _as_labels(hypotheses, labeler, "hypotheses")
    if ref.shape != hyp.shape:
        raise ValueError(f"reference labels {ref.shape} and generated labels {hyp.shape} differ in shape")
    if ref.shape[0] == 0:
        raise ValueError("no reports to score")
    out: dict[str, float] = {}
    f_c = _ce_grid(ref == 1.0, hyp == 1.0, "", out)
    _ce_grid((ref == 1.0) | (ref == -1.0), (hyp == 1.0) | (hyp == -1.0), "_pos_or_unc", out)
    for name, f in zip(OBSERVATIONS, f_c):
        out[f"f1/{name}"] = float(f)
    if preset is not None:
        for stat, key in ce_preset_keys(preset).items():
            out[stat] = out[key]
    return out
