"""NLG metrics (coco-caption scorers) and clinical efficacy, against hand-computed values."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from mtl_opt.problems.rrg import OBSERVATIONS, CheXpertLabeler, clinical_efficacy, nlg_metrics
from mtl_opt.problems.rrg import metrics as metrics_module

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and PTB need a Java runtime")

REFS = [
    "the heart size is normal . the lungs are clear .",
    "there is a small left pleural effusion .",
    "mild cardiomegaly . no pneumothorax .",
]


@needs_java
def test_identical_reports_score_one_with_meteor():
    out = nlg_metrics(REFS, REFS)
    assert set(out) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"}
    for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L"):
        assert out[k] == pytest.approx(1.0, abs=1e-6), k
    # CIDEr-D of a perfect match: 10 x mean cosine (1) x Gaussian length penalty (1).
    assert out["CIDEr"] == pytest.approx(10.0, abs=1e-6)


def test_partial_overlap_matches_hand_computation():
    ref, hyp = "the cat is on the mat", "the cat the mat"
    out = nlg_metrics([ref], [hyp], meteor=False)
    bp = math.exp(1 - 6 / 4)                 # brevity penalty: 4 hypothesis words, 6 reference words
    p1, p2 = 4 / 4, 2 / 3                    # clipped unigram / bigram precisions
    assert out["BLEU_1"] == pytest.approx(bp * p1, abs=1e-6)
    assert out["BLEU_2"] == pytest.approx(bp * math.sqrt(p1 * p2), abs=1e-6)
    # ROUGE-L: LCS 4 ("the cat the mat"), P = 4/4, R = 4/6, beta = 1.2.
    p, r, b2 = 1.0, 4 / 6, 1.2**2
    assert out["ROUGE_L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), abs=1e-9)
    assert "METEOR" not in out
    assert out["CIDEr"] == 0.0  # idf over a one-report set is log(1/1) = 0


def test_empty_generated_reports_are_scored_not_rejected():
    out = nlg_metrics(REFS, ["", REFS[1], ""], meteor=False)
    assert 0.0 < out["BLEU_1"] < 1.0 and out["ROUGE_L"] == pytest.approx(1 / 3)
    ce = clinical_efficacy(["Mild cardiomegaly.", "The lungs are clear."], ["", ""])
    # No Finding: tp 1 (the normal study), fp 1 (the cardiomegaly study) -> F1 2/3.
    assert ce["f1/No Finding"] == pytest.approx(2 / 3) and ce["f1/Cardiomegaly"] == 0.0


def test_disjoint_reports_score_zero_bleu():
    out = nlg_metrics(REFS, ["alpha beta gamma", "delta epsilon", "zeta eta theta"], meteor=False)
    assert out["BLEU_1"] == pytest.approx(0.0, abs=1e-6)
    assert out["ROUGE_L"] == 0.0 and out["CIDEr"] == 0.0


@needs_java
def test_ptb_tokenization_drops_punctuation():
    out = nlg_metrics(["The heart is normal."], ["the heart is normal"], tokenization="ptb", meteor=False)
    assert out["BLEU_4"] == pytest.approx(1.0, abs=1e-6)


@needs_java
def test_meteor_timeout_is_an_error_not_a_hang():
    with pytest.raises(TimeoutError, match="METEOR"):
        nlg_metrics(REFS, REFS, timeout=0.001)


def test_meteor_without_java_is_unavailable_not_zero(tmp_path, monkeypatch):
    """A PATH with no `java` on it: METEOR is reported unavailable, the other scores still come."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    out = nlg_metrics(REFS, REFS)
    assert out["METEOR"] is None
    assert out["METEOR_status"] == metrics_module.METEOR_NO_JAVA
    assert out["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    assert metrics_module.format_metric(out["METEOR"]) == "n/a (no Java)"
    # The PTB tokenizer cannot run at all without Java: that stays an error.
    with pytest.raises(RuntimeError, match="java"):
        nlg_metrics(REFS, REFS, tokenization="ptb", meteor=False)


@pytest.mark.parametrize(
    ("refs", "hyps", "exc", "match"),
    [
        (REFS, REFS[:2], ValueError, "3 references but 2"),
        ([], [], ValueError, "no reports"),
        ("a b", "a b", TypeError, "sequences"),
        (["a", "  "], ["a", "b"], ValueError, "reference 1 is empty"),
        (["a"], [None], TypeError, "hypothesis 0"),
    ],
)
def test_nlg_input_checks(refs, hyps, exc, match):
    with pytest.raises(exc, match=match):
        nlg_metrics(refs, hyps, meteor=False)


def test_unknown_tokenization():
    with pytest.raises(ValueError, match="tokenization"):
        nlg_metrics(REFS, REFS, tokenization="spacy", meteor=False)


def _labels(rows: list[dict[str, float]]) -> np.ndarray:
    out = np.full((len(rows), 14), np.nan)
    for i, row in enumerate(rows):
        for name, v in row.items():
            out[i, OBSERVATIONS.index(name)] = v
    return out


def test_clinical_efficacy_by_hand():
    ref = _labels([{"Cardiomegaly": 1, "Edema": 1}, {"Cardiomegaly": 0, "Pleural Effusion": 1}, {}])
    gen = _labels([{"Cardiomegaly": 1, "Edema": -1}, {"Cardiomegaly": 1, "Pleural Effusion": 1},
                   {"Pneumothorax": 1}])
    out = clinical_efficacy(ref, gen)
    # Positives only: tp = CM(0) + PE(1) = 2; fp = CM(1) + PTX(2) = 2; fn = Edema(0) = 1.
    assert out["precision_micro"] == pytest.approx(2 / 4)
    assert out["recall_micro"] == pytest.approx(2 / 3)
    assert out["f1_micro"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # Per observation: CM P=1/2 R=1 F1=2/3; Edema P=0 R=0 F1=0; PE 1,1,1; PTX 0,0,0; others 0.
    assert out["precision_macro"] == pytest.approx((0.5 + 1) / 14)
    assert out["recall_macro"] == pytest.approx((1 + 1) / 14)
    assert out["f1_macro"] == pytest.approx((2 / 3 + 1) / 14)
    assert out["f1/Cardiomegaly"] == pytest.approx(2 / 3)
    assert out["f1/Edema"] == 0.0
    # Example-based (PromptMRG): report 0 P=1 R=1/2 F1=2/3; report 1 P=1/2 R=1 F1=2/3; report 2 all 0.
    assert out["precision_example"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert out["recall_example"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert out["f1_example"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_clinical_efficacy_presets_by_hand():
    """The same case as above under both named conventions."""
    ref = _labels([{"Cardiomegaly": 1, "Edema": 1}, {"Cardiomegaly": 0, "Pleural Effusion": 1}, {}])
    gen = _labels([{"Cardiomegaly": 1, "Edema": -1}, {"Cardiomegaly": 1, "Pleural Effusion": 1},
                   {"Pneumothorax": 1}])
    pm = clinical_efficacy(ref, gen, preset="promptmrg")
    # PromptMRG: example-based, positive only; per report F1 = tp / (tp + (fp + fn)/2):
    # report 0: 1/(1 + 1/2) = 2/3, report 1: 1/(1 + 1/2) = 2/3, report 2: 0/(0 + 1/2) = 0.
    assert pm["f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert pm["precision"] == pytest.approx(0.5) and pm["recall"] == pytest.approx(0.5)
    cg = clinical_efficacy(ref, gen, preset="came_grad")
    # CAME-Grad: macro over the 14, uncertain counts positive, so Edema (1 vs -1) is a hit:
    # CM tp1 fp1 -> P 1/2 R 1 F1 2/3; Edema 1, 1, 1; PE 1, 1, 1; PTX fp1 -> 0; ten others 0.
    assert cg["f1"] == pytest.approx((2 / 3 + 1 + 1) / 14)
    assert cg["precision"] == pytest.approx((0.5 + 1 + 1) / 14)
    assert cg["recall"] == pytest.approx(3 / 14)
    assert cg["f1"] == cg["f1_macro_pos_or_unc"] and pm["f1"] == pm["f1_example"]
    # The rest of the uncertain-positive grid: micro tp 3, fp 2, fn 0; examples 0: 1,1,1.
    assert cg["precision_micro_pos_or_unc"] == pytest.approx(3 / 5)
    assert cg["recall_micro_pos_or_unc"] == pytest.approx(1.0)
    assert cg["f1_example_pos_or_unc"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert metrics_module.ce_preset_keys("came_grad")["f1"] == "f1_macro_pos_or_unc"
    with pytest.raises(ValueError, match="unknown CE preset"):
        clinical_efficacy(ref, gen, preset="chexbert")


def test_clinical_efficacy_of_reports_uses_the_labeler():
    refs = ["Mild cardiomegaly. No pleural effusion.", "Small right pneumothorax."]
    out = clinical_efficacy(refs, refs)
    assert out["f1_micro"] == 1.0 and out["precision_micro"] == 1.0
    gen = ["The heart size is normal. No pleural effusion.", "Small right pneumothorax."]
    out = clinical_efficacy(refs, gen, labeler=CheXpertLabeler())
    # Positives: ref {CM, PTX}, gen {PTX, No Finding in report 0}: tp 1, fp 1, fn 1.
    assert out["precision_micro"] == pytest.approx(0.5)
    assert out["recall_micro"] == pytest.approx(0.5)


def test_clinical_efficacy_input_checks():
    with pytest.raises(ValueError, match="shape"):
        clinical_efficacy(np.zeros((2, 14)), np.zeros((3, 14)))
    with pytest.raises(ValueError, match="label array"):
        clinical_efficacy(np.zeros((2, 13)), np.zeros((2, 13)))
    with pytest.raises(TypeError, match="one string"):
        clinical_efficacy("report", "report")


def _fake_java(tmp_path, monkeypatch, body: str) -> None:
    """Put a `java` that misbehaves first on PATH (a broken or stuck runtime)."""
    import os

    bindir = tmp_path / "bin"
    bindir.mkdir()
    java = bindir / "java"
    java.write_text("#!/bin/sh\n" + body + "\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


def test_meteor_jvm_that_dies_is_a_clear_error(tmp_path, monkeypatch):
    _fake_java(tmp_path, monkeypatch, 'echo "Error occurred during initialization of VM" >&2; exit 1')
    with pytest.raises(RuntimeError, match="METEOR's Java process failed.*initialization of VM"):
        nlg_metrics(REFS, REFS, timeout=20)


def test_meteor_jvm_that_hangs_times_out(tmp_path, monkeypatch):
    _fake_java(tmp_path, monkeypatch, "exec sleep 60")
    with pytest.raises(TimeoutError, match="within 2 s"):
        nlg_metrics(REFS, REFS, timeout=2)


def test_ptb_tokenizer_that_hangs_times_out(tmp_path, monkeypatch):
    _fake_java(tmp_path, monkeypatch, "exec sleep 60")
    with pytest.raises(TimeoutError, match="PTB tokenizer"):
        nlg_metrics(REFS, REFS, tokenization="ptb", meteor=False, timeout=1)
