"""RRG data: observations and encodings, tokenizer, SyntheticCXR (images, reports, knobs), R2Gen reader."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from mtl_opt.problems.rrg import (NO_DISAGREEMENT, OBSERVATIONS, CheXpertLabeler, MalformedStudyError,
                                  R2GenDataset, ReportTokenizer, SyntheticCXR, classes_to_labels,
                                  clean_report, collate_rrg, labels_to_classes)
from mtl_opt.problems.rrg.synthetic import DRAWN_OBSERVATIONS
from mtl_opt.problems.rrg.synthetic_render import (DEVICES, THORAX_WIDTH, Finding, Study, heart_half_width,
                                                   render_frontal, render_lateral)

# -- observations ----------------------------------------------------------------------------------


def test_observation_order_is_chexbert():
    assert len(OBSERVATIONS) == 14
    assert OBSERVATIONS[0] == "Enlarged Cardiomediastinum" and OBSERVATIONS[-1] == "No Finding"
    assert OBSERVATIONS[8:10] == ("Pneumothorax", "Pleural Effusion")


def test_labels_to_classes_mapping_and_inverse():
    labels = np.full((2, 14), np.nan)
    labels[0, :4] = [1, 0, -1, np.nan]
    classes = labels_to_classes(labels)
    assert classes.dtype == torch.long and classes.shape == (2, 14)
    assert classes[0, :4].tolist() == [1, 2, 3, 0]  # positive, negative, uncertain, blank
    assert (classes[1] == 0).all()
    back = classes_to_labels(classes)
    np.testing.assert_array_equal(np.isnan(back), np.isnan(labels))
    np.testing.assert_array_equal(back[~np.isnan(back)], labels[~np.isnan(labels)])
    assert labels_to_classes(torch.tensor(labels, dtype=torch.float32)).tolist() == classes.tolist()


def test_labels_to_classes_rejects_bad_values():
    with pytest.raises(ValueError, match="found"):
        labels_to_classes(np.full((1, 14), 2.0))
    with pytest.raises(ValueError, match="last dimension 14"):
        labels_to_classes(np.zeros((1, 13)))


# -- tokenizer -------------------------------------------------------------------------------------


def test_clean_report_iu_and_mimic():
    assert clean_report("1. Heart size is normal.  2. No effusion.", "iu_xray") == \
        "heart size is normal . no effusion ."
    assert clean_report("The heart (size) is normal; lungs: clear..", "iu_xray") == \
        "the heart size is normal lungs clear ."
    assert clean_report("FINDINGS:\n No pleural__effusion.\n\nX-ray 1.5 cm.", "mimic_cxr") == \
        "findings no pleuraleffusion . x-ray 15 cm ."
    assert clean_report("  ", "iu_xray") == ""
    with pytest.raises(ValueError, match="unknown dataset"):
        clean_report("x", "chexpert")


def test_tokenizer_vocabulary_threshold_and_round_trip():
    reports = ["The heart is normal. No effusion."] * 3 + ["The heart is enlarged."]
    tok = ReportTokenizer.fit(reports, threshold=3, dataset="iu_xray")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert "enlarged" not in tok.token2idx and "heart" in tok.token2idx
    assert tok.vocab_size == 4 + len({"the", "heart", "is", "normal", ".", "no", "effusion"})
    ids = tok.encode(reports[0])
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "the heart is normal . no effusion ."
    assert tok.decode(tok.encode("The heart is enlarged.")) == "the heart is <unk> ."
    assert tok.decode([tok.bos_id, 5, tok.eos_id, 6, 7]) == tok.idx2token[5]
    assert tok.decode([tok.bos_id, 5, tok.pad_id, 6]) == f"{tok.idx2token[5]} {tok.idx2token[6]}"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([999])


def test_tokenizer_truncation_keeps_eos_and_state_round_trip():
    tok = ReportTokenizer.fit(["a b c d e f g h"], threshold=1, max_length=5, dataset="synthetic")
    ids = tok.encode("a b c d e f g h")
    assert len(ids) == 5 and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "a b c"
    again = ReportTokenizer.from_state_dict(json.loads(json.dumps(tok.state_dict())))
    assert again.idx2token == tok.idx2token and again.encode("a b x") == tok.encode("a b x")
    with pytest.raises(ValueError, match="missing"):
        ReportTokenizer.from_state_dict({"idx2token": []})


def test_tokenizer_defaults_follow_r2gen():
    assert ReportTokenizer.fit(["x"] * 10, dataset="mimic_cxr").threshold == 10
    assert ReportTokenizer.fit(["x"] * 10, dataset="mimic_cxr").max_length == 100
    assert ReportTokenizer.fit(["x"] * 3, dataset="iu_xray").max_length == 60
    with pytest.raises(ValueError, match="zero reports"):
        ReportTokenizer.fit([])


# -- SyntheticCXR: dataset contract ----------------------------------------------------------------


def test_synthetic_items_shapes_ranges_and_determinism():
    ds = SyntheticCXR(6, image_size=32, views=2, seed=1)
    item = ds[2]
    assert set(item) == {"id", "image", "report", "labels"}
    assert item["image"].shape == (2, 1, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["labels"].shape == (14,) and item["labels"].dtype == torch.float32
    assert item["id"] == "synthetic-1-2" and item["report"].endswith(".")
    again = SyntheticCXR(6, image_size=32, views=2, seed=1)[2]
    assert torch.equal(item["image"], again["image"]) and item["report"] == again["report"]
    np.testing.assert_array_equal(item["labels"].numpy(), again["labels"].numpy())
    other = SyntheticCXR(6, image_size=32, views=2, seed=2)
    assert any(ds.report(i) != other.report(i) for i in range(6))
    assert not torch.equal(ds[0]["image"], other[0]["image"])
    assert SyntheticCXR(3, image_size=48)[0]["image"].shape == (1, 1, 48, 48)
    # An item does not depend on the dataset's length (any size, lazily generated).
    assert SyntheticCXR(100, seed=1, views=2)[2]["report"] == item["report"]


def test_synthetic_image_cache_returns_the_same_images():
    plain = SyntheticCXR(3, image_size=32, views=2, seed=8)
    cached = SyntheticCXR(3, image_size=32, views=2, seed=8, cache_images=True)
    first = cached[1]["image"]
    first.zero_()  # a caller writing into its batch must not corrupt the cache
    assert torch.equal(cached[1]["image"], plain[1]["image"]) and len(cached._cache) == 1


def test_synthetic_argument_checks():
    with pytest.raises(ValueError, match="n must"):
        SyntheticCXR(0)
    with pytest.raises(ValueError, match="views"):
        SyntheticCXR(2, views=3)
    with pytest.raises(ValueError, match="hedge"):
        SyntheticCXR(2, hedge=1.5)
    with pytest.raises(ValueError, match="unknown findings"):
        SyntheticCXR(2, prevalence={"tumour": 0.1})
    with pytest.raises(IndexError):
        SyntheticCXR(2)[2]


def test_synthetic_labels_follow_the_drawn_findings():
    ds = SyntheticCXR(300, seed=5, **NO_DISAGREEMENT)
    idx = {o: OBSERVATIONS.index(o) for o in OBSERVATIONS}
    for i in range(len(ds)):
        study, labels = ds.study(i), ds.labels(i)
        for undecided in ("Enlarged Cardiomediastinum", "Pneumonia", "Pleural Other"):
            assert np.isnan(labels[idx[undecided]])
        assert labels[idx["Cardiomegaly"]] == ("cardiomegaly" in study.findings)
        assert labels[idx["Lung Lesion"]] == bool({"nodule", "mass"} & set(study.findings))
        assert labels[idx["Pleural Effusion"]] == ("effusion" in study.findings)
        pathology = set(study.findings) - {"devices"}
        assert labels[idx["No Finding"]] == (not pathology)


# -- SyntheticCXR: images show the findings --------------------------------------------------------


def _mean(img: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> float:
    n = img.shape[0]
    return float(img[int(y0 * n):int(y1 * n), int(x0 * n):int(x1 * n)].mean())


def _heart_width(img: np.ndarray) -> float:
    """Width (unit coordinates) of the bright run through the heart centre row."""
    n = img.shape[0]
    row = img[int(0.70 * n)] > 0.45
    centre = int(0.545 * n)
    lo = hi = centre
    while lo > 0 and row[lo - 1]:
        lo -= 1
    while hi < n - 1 and row[hi + 1]:
        hi += 1
    return (hi - lo + 1) / n


def test_cardiomegaly_widens_the_heart_and_ap_magnifies_it():
    widths = {}
    for label, findings in [("normal", {}), ("mild", {"cardiomegaly": Finding(severity="mild")}),
                            ("severe", {"cardiomegaly": Finding(severity="severe")})]:
        study = Study(ctr=0.45, findings=findings, anatomy_seed=3)
        widths[label] = _heart_width(render_frontal(study, 128))
        assert widths[label] == pytest.approx(2 * heart_half_width(study), abs=3 / 128)
    assert widths["normal"] < widths["mild"] < widths["severe"]
    assert widths["severe"] / THORAX_WIDTH > 0.6 > widths["normal"] / THORAX_WIDTH
    ap = _heart_width(render_frontal(Study(view="AP", ctr=0.45, anatomy_seed=3), 128))
    assert ap > widths["normal"] * 1.08


def test_dataset_cardiomegaly_labels_match_measured_heart_width():
    from mtl_opt.problems.rrg.synthetic import DEFAULT_PREVALENCE

    only_heart = {**{k: 0.0 for k in DEFAULT_PREVALENCE}, "cardiomegaly": 0.3}
    ds = SyntheticCXR(160, image_size=64, seed=7, prevalence=only_heart, **NO_DISAGREEMENT)
    cm = OBSERVATIONS.index("Cardiomegaly")
    rows = [(ds.labels(i)[cm], _heart_width(ds.image(i)[0])) for i in range(len(ds)) if ds.study(i).view == "PA"]
    pos = [w for lab, w in rows if lab == 1]
    neg = [w for lab, w in rows if lab == 0]
    assert len(pos) >= 10 and len(neg) >= 40
    assert min(pos) > max(neg) - 2 / 64  # CTR >= 0.56 against <= 0.48
    assert np.mean(pos) / THORAX_WIDTH > 0.55 > np.mean(neg) / THORAX_WIDTH


@pytest.mark.parametrize(
    ("finding", "region", "brighter"),
    [
        (("effusion", Finding(side="left", size="moderate")), (0.70, 0.80, 0.66, 0.74), True),
        (("effusion", Finding(side="right", size="large")), (0.22, 0.40, 0.60, 0.72), True),
        (("pneumothorax", Finding(side="right", size="large")), (0.17, 0.21, 0.30, 0.45), False),
        (("consolidation", Finding(side="right", lobe="lower", severity="severe")), (0.27, 0.35, 0.57, 0.65), True),
        (("edema", Finding(severity="severe")), (0.30, 0.40, 0.45, 0.55), True),
        (("nodule", Finding(side="left", lobe="upper", size="large")), (0.68, 0.70, 0.31, 0.33), True),
        (("mass", Finding(side="right", lobe="upper")), (0.28, 0.34, 0.29, 0.35), True),
        (("atelectasis", Finding(side="bilateral")), (0.25, 0.37, 0.664, 0.676), True),
        (("devices", Finding(devices=("endotracheal tube",))), (0.49, 0.51, 0.10, 0.28), True),
    ],
)
def test_findings_are_drawn_where_a_radiologist_looks(finding, region, brighter):
    name, f = finding
    base = render_frontal(Study(anatomy_seed=11), 256)
    img = render_frontal(Study(anatomy_seed=11, findings={name: f}), 256)
    before, after = _mean(base, *region), _mean(img, *region)
    if brighter:
        assert after > before + 0.15, (before, after)
    else:
        assert after < before - 0.05, (before, after)


def test_effusion_is_one_sided_and_grows_with_size():
    base = render_frontal(Study(anatomy_seed=2), 128)
    heights = []
    for size in ("small", "moderate", "large"):
        img = render_frontal(Study(anatomy_seed=2, findings={"effusion": Finding(side="left", size=size)}), 128)
        assert _mean(img, 0.20, 0.42, 0.50, 0.76) == pytest.approx(_mean(base, 0.20, 0.42, 0.50, 0.76), abs=1e-6)
        column = img[:, int(0.78 * 128)]  # lateral left lung column
        heights.append(int(((column > 0.45) & (np.arange(128) > 0.4 * 128)).sum()))
    assert heights[0] < heights[1] < heights[2]


def test_devices_fracture_and_lateral_view():
    base = render_frontal(Study(anatomy_seed=4), 128)
    with_devices = render_frontal(Study(anatomy_seed=4, findings={"devices": Finding(devices=DEVICES)}), 128)
    assert (with_devices > 0.9).sum() > (base > 0.9).sum() + 100
    fractured = render_frontal(Study(anatomy_seed=4, findings={"fracture": Finding(side="right")}), 256)
    diff = np.argwhere(np.abs(fractured - render_frontal(Study(anatomy_seed=4), 256)) > 0.05)
    assert len(diff) > 0 and diff[:, 1].max() < 0.5 * 256  # only on the patient's right (image left)
    lateral = render_lateral(Study(anatomy_seed=4), 64)
    lat_eff = render_lateral(Study(anatomy_seed=4, findings={"effusion": Finding(size="large")}), 64)
    assert _mean(lat_eff, 0.55, 0.75, 0.68, 0.76) > _mean(lateral, 0.55, 0.75, 0.68, 0.76) + 0.15


# -- SyntheticCXR: reports and disagreement knobs --------------------------------------------------

_NEGATION = re.compile(r"\bno\b|\bnot\b|\bwithout\b")
_HEDGE = re.compile(r"possible|cannot|\bmay\b|questionable|borderline|concerning|rule out")


def test_report_proportions_at_defaults():
    # Documented in SyntheticCXR's docstring (measured on 3000 studies): 56 % normal studies,
    # 98 % of reports with a negation, 27 % with a hedge, 5.6 sentences per report.
    ds = SyntheticCXR(800, seed=0)
    reports = [r.lower() for r in ds.reports()]
    normal = np.mean([ds.true_labels(i)[-1] == 1 for i in range(len(ds))])
    assert 0.48 < normal < 0.64
    assert np.mean([bool(_NEGATION.search(r)) for r in reports]) > 0.94
    assert 0.20 < np.mean([bool(_HEDGE.search(r)) for r in reports]) < 0.35
    assert 4.8 < np.mean([r.count(". ") + 1 for r in reports]) < 6.4


def _agreement(**knobs) -> dict[str, float]:
    ds = SyntheticCXR(600, seed=9, **knobs)
    rep = CheXpertLabeler().label(ds.reports())
    cols = [OBSERVATIONS.index(o) for o in DRAWN_OBSERVATIONS if o not in ("Lung Opacity", "No Finding")]
    truth = np.stack([ds.true_labels(i) for i in range(len(ds))])[:, cols] == 1
    labels = np.stack([ds.labels(i) for i in range(len(ds))])
    said = rep[:, cols] == 1
    tp = (said & truth).sum()
    return {"precision": tp / said.sum(), "recall": tp / truth.sum(),
            "uncertain": float((rep[:, cols] == -1).sum()),
            "label_flips": float((labels[:, cols] != (truth * 1.0)).mean()),
            "sentences": float(np.mean([r.count(". ") + 1 for r in ds.reports()]))}


def test_knobs_change_agreement_in_the_documented_direction():
    clean = _agreement(**NO_DISAGREEMENT)
    assert clean["precision"] == 1.0 and clean["recall"] == 1.0 and clean["label_flips"] == 0.0

    def with_knob(**kw):
        return _agreement(**{**NO_DISAGREEMENT, **kw})

    under = with_knob(undercall=0.3)
    assert under["recall"] < 0.85 and under["precision"] == 1.0
    over = with_knob(overcall=0.1)
    assert over["precision"] < 0.85 and over["recall"] == 1.0 and over["uncertain"] > 0
    hedged = with_knob(hedge=0.5)
    assert hedged["recall"] < 0.75 and hedged["uncertain"] > 20
    view = with_knob(view_bias=1.0)
    assert view["precision"] < 0.95 and view["recall"] < 1.0
    noisy = with_knob(label_noise=0.1)
    assert 0.06 < noisy["label_flips"] < 0.14 and noisy["recall"] == 1.0
    chatty = with_knob(nuisance=3.0)
    assert chatty["sentences"] > clean["sentences"] + 2 and chatty["recall"] == 1.0
    default = _agreement()
    assert 0.6 < default["precision"] < 0.95 and 0.6 < default["recall"] < 0.95


# -- collate ---------------------------------------------------------------------------------------


def test_collate_pads_tokens_and_maps_classes():
    ds = SyntheticCXR(4, image_size=32, views=2, seed=3)
    tok = ReportTokenizer.fit(ds.reports(), threshold=1, dataset="synthetic")
    batch = collate_rrg([ds[i] for i in range(4)], tok)
    assert batch["images"].shape == (4, 2, 1, 32, 32)
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape[0] == 4
    assert (batch["tokens"][:, 0] == tok.bos_id).all()
    lengths = [len(tok.encode(ds.report(i))) for i in range(4)]
    assert batch["tokens"].shape[1] == max(lengths)
    for i, n in enumerate(lengths):
        assert batch["tokens"][i, n - 1] == tok.eos_id and (batch["tokens"][i, n:] == tok.pad_id).all()
    assert batch["labels"].shape == (4, 14) and batch["classes"].shape == (4, 14)
    assert torch.equal(batch["classes"], labels_to_classes(batch["labels"]))
    assert batch["ids"] == [f"synthetic-3-{i}" for i in range(4)]
    with pytest.raises(ValueError, match="empty batch"):
        collate_rrg([], tok)


# -- R2Gen reader ----------------------------------------------------------------------------------


def _png(path, value: int = 128, size: int = 20) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size + 4), value, dtype=np.uint8)).save(path)


def _write(root, splits: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "annotation.json").write_text(json.dumps(splits))


def _iu_root(tmp_path):
    root = tmp_path / "iu"
    studies = []
    for k in range(3):
        sid = f"CXR{k}_IM-000{k}"
        _png(root / "images" / sid / "0.png", 40 * k)
        _png(root / "images" / sid / "1.png", 200)
        studies.append({"id": sid, "report": ["The heart size is normal. No pleural effusion.",
                                              "Mild cardiomegaly.", "Small right pneumothorax."][k],
                        "image_path": [f"{sid}/0.png", f"{sid}/1.png"], "split": "train"})
    _write(root, {"train": studies, "val": studies[:1], "test": studies[1:]})
    return root, studies


def test_r2gen_iu_xray_two_views_and_labeler_labels(tmp_path):
    root, _ = _iu_root(tmp_path)
    ds = R2GenDataset(root, dataset="iu_xray", split="train", image_size=16)
    assert len(ds) == 3 and ds.n_skipped == 0
    item = ds[1]
    assert item["image"].shape == (2, 1, 16, 16)
    assert item["image"][0].mean().item() == pytest.approx(40 / 255, abs=1e-3)
    assert item["image"][1].mean().item() == pytest.approx(200 / 255, abs=1e-3)
    assert item["labels"][OBSERVATIONS.index("Cardiomegaly")] == 1
    assert ds[0]["labels"][OBSERVATIONS.index("No Finding")] == 1
    assert len(R2GenDataset(root, dataset="iu_xray", split="test", image_size=16)) == 2


def test_r2gen_mimic_one_view_and_labels_files(tmp_path):
    root = tmp_path / "mimic"
    studies = []
    for k in range(2):
        path = f"p10/p1000{k}/s5{k}/img{k}.jpg"
        _png(root / "images" / path, 100)
        studies.append({"id": f"s5{k}", "report": "FINDINGS:\n No acute process.", "image_path": [path, "extra.jpg"]})
    _write(root, {"train": studies})
    ds = R2GenDataset(root, dataset="mimic_cxr", image_size=8)
    assert ds[0]["image"].shape == (1, 1, 8, 8)
    labels = {"s50": [1] + [None] * 13, "s51": [""] * 13 + [1]}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    ds = R2GenDataset(root, dataset="mimic_cxr", image_size=8, labels_file=str(tmp_path / "labels.json"))
    assert ds[0]["labels"][0] == 1 and torch.isnan(ds[0]["labels"][1:]).all()
    header = "id," + ",".join(f'"{o}"' if " " in o else o for o in OBSERVATIONS)
    (tmp_path / "labels.csv").write_text(header + "\ns50," + ",".join(["-1"] + [""] * 13)
                                         + "\ns51," + ",".join(["0"] * 14) + "\n")
    ds = R2GenDataset(root, dataset="mimic_cxr", image_size=8, labels_file=str(tmp_path / "labels.csv"))
    assert ds[0]["labels"][0] == -1 and (ds[1]["labels"] == 0).all()
    (tmp_path / "bad.json").write_text(json.dumps({"s50": [2] * 14, "s51": [0] * 14}))
    with pytest.raises(ValueError, match=r"s50.*not 1 / 0 / -1"):
        R2GenDataset(root, dataset="mimic_cxr", image_size=8, labels_file=str(tmp_path / "bad.json"))
    (tmp_path / "short.json").write_text(json.dumps({"s50": [0] * 14}))
    with pytest.raises(MalformedStudyError, match=r"'s51'.*no row in labels file"):
        R2GenDataset(root, dataset="mimic_cxr", image_size=8, labels_file=str(tmp_path / "short.json"))


def test_r2gen_promptmrg_annotation_labels(tmp_path):
    root, studies = _iu_root(tmp_path)
    for k, s in enumerate(studies):
        s["labels"] = [0] * 13 + [1] if k != 1 else [3, 1, 2] + [0] * 11
    _write(root, {"train": studies})
    ds = R2GenDataset(root, image_size=8, labels_file="annotation")
    assert ds[1]["labels"][:3].tolist() == [-1.0, 1.0, 0.0] and torch.isnan(ds[1]["labels"][3:]).all()
    assert ds[0]["labels"][-1] == 1 and "annotation" in ds.label_source
    studies[2]["labels"] = [4] * 14
    del studies[0]["labels"]
    _write(root, {"train": studies})
    with pytest.raises(MalformedStudyError, match=r"'CXR0_IM-0000'.*has no 'labels'"):
        R2GenDataset(root, image_size=8, labels_file="annotation")
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = R2GenDataset(root, image_size=8, labels_file="annotation", skip_bad=True)
    assert [sid for sid, _ in ds.skipped] == ["CXR0_IM-0000", "CXR2_IM-0002"] and len(ds) == 1


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        ("missing_key", r"study 'CXR1_IM-0001'.*lacks key\(s\) \['report'\]"),
        ("missing_file", r"study 'CXR1_IM-0001'.*image file .*CXR1_IM-0001/1.png does not exist"),
        ("empty_report", r"study 'CXR1_IM-0001'.*empty report"),
        ("unreadable", r"study 'CXR1_IM-0001': image file .*0.png cannot be read"),
        ("one_view", r"study 'CXR1_IM-0001'.*lists 1 image.*needs 2"),
        ("duplicate", r"study 'CXR0_IM-0000' appears twice"),
    ],
)
def test_r2gen_malformed_studies_name_study_and_file(tmp_path, breakage, match):
    root, studies = _iu_root(tmp_path)
    bad = studies[1]
    if breakage == "missing_key":
        del bad["report"]
    elif breakage == "missing_file":
        (root / "images" / bad["id"] / "1.png").unlink()
    elif breakage == "empty_report":
        bad["report"] = " .. "
    elif breakage == "unreadable":
        (root / "images" / bad["id"] / "0.png").write_bytes(b"not a png")
    elif breakage == "one_view":
        bad["image_path"] = bad["image_path"][:1]
    elif breakage == "duplicate":
        studies[1] = dict(studies[0])
    _write(root, {"train": studies})
    if breakage == "unreadable":
        ds = R2GenDataset(root, dataset="iu_xray", image_size=8)  # only opened when read
        with pytest.raises(MalformedStudyError, match=match):
            ds[1]
    else:
        with pytest.raises(MalformedStudyError, match=match):
            R2GenDataset(root, dataset="iu_xray", image_size=8)
    with pytest.warns(UserWarning, match="skipped 1 malformed studies"):
        ds = R2GenDataset(root, dataset="iu_xray", image_size=8, skip_bad=True)
    assert len(ds) == 2 and ds.n_skipped == 1
    assert ds.skipped[0][0] == ("CXR0_IM-0000" if breakage == "duplicate" else "CXR1_IM-0001")
    assert re.search(match, ds.skipped[0][1])
    for i in range(len(ds)):
        ds[i]


def test_r2gen_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation.json does not exist"):
        R2GenDataset(tmp_path / "nowhere")
    root, _ = _iu_root(tmp_path)
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train', 'val'\]"):
        R2GenDataset(root, split="validation")
    with pytest.raises(ValueError, match="dataset must be"):
        R2GenDataset(root, dataset="chexpert")
    (root / "annotation.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        R2GenDataset(root)
    _write(root, {"train": [{"id": "a", "report": "", "image_path": []}]})
    with pytest.warns(UserWarning):
        with pytest.raises(ValueError, match="no usable studies"):
            R2GenDataset(root, skip_bad=True)


def test_rrg_import_is_light():
    import subprocess
    import sys

    code = ("import sys, mtl_opt.problems.rrg; "
            "print(','.join(m for m in ('PIL', 'pandas', 'plotly', 'pycocoevalcap') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == ""


# -- image bit depths --------------------------------------------------------------------------------


def _ramp(dtype, top: int, width: int = 64) -> np.ndarray:
    """A horizontal ramp 0..top over ``width`` columns, 16 rows."""
    values = np.linspace(0, top, width)
    return np.tile(values.astype(dtype) if np.dtype(dtype).kind == "f" else values.round().astype(dtype), (16, 1))


@pytest.mark.parametrize("kind", ["png16", "tiff16_big_endian", "png8", "int32_16bit_data"])
def test_images_are_scaled_by_their_bit_depth(kind, tmp_path):
    """A 0..max ramp loads as a 0..1 ramp whatever the depth (a 16-bit ramp used to load 98%
    white: PIL's conversion to 8 bits clips instead of scaling)."""
    from PIL import Image

    from mtl_opt.problems.rrg.r2gen import load_image

    if kind == "png16":
        path, im = tmp_path / "ramp.png", Image.fromarray(_ramp(np.uint16, 65535))
        assert im.mode == "I;16"
    elif kind == "tiff16_big_endian":
        path, im = tmp_path / "ramp.tif", Image.fromarray(_ramp(">u2", 65535))
        assert im.mode == "I;16B"
    elif kind == "png8":
        path, im = tmp_path / "ramp.png", Image.fromarray(_ramp(np.uint8, 255))
    else:
        path, im = tmp_path / "ramp.tif", Image.fromarray(_ramp(np.int32, 65535))
        assert im.mode == "I"
    im.save(path)
    with Image.open(path) as reread:
        assert reread.mode == im.mode
    full = load_image(str(path), 64)[:16]
    assert full.dtype == np.float32
    top = 255 if kind == "png8" else 65535
    np.testing.assert_allclose(full[0], np.linspace(0, 1, 64), atol=0.51 / top)  # rounding only
    assert (full >= 1.0).mean() == pytest.approx(1 / 64)  # only the last column is white
    small = load_image(str(path), 16)  # resized: still a ramp around mid-grey
    assert small.mean() == pytest.approx(0.5, abs=0.02) and 0.0 <= small.min() < small.max() <= 1.0


def test_one_bit_palette_and_colour_images_load_as_before(tmp_path):
    from PIL import Image

    from mtl_opt.problems.rrg.r2gen import load_image

    bits = np.zeros((16, 16), dtype=bool)
    bits[:, 8:] = True
    Image.fromarray(bits).convert("1").save(tmp_path / "bits.png")
    one = load_image(str(tmp_path / "bits.png"), 16)
    assert one[:, :8].max() == 0.0 and one[:, 8:].min() == 1.0
    pal = Image.fromarray(_ramp(np.uint8, 255, 16)).convert("P")
    pal.save(tmp_path / "pal.png")
    with Image.open(tmp_path / "pal.png") as reread:
        assert reread.mode == "P"
    np.testing.assert_allclose(load_image(str(tmp_path / "pal.png"), 16)[0], np.linspace(0, 1, 16), atol=1 / 255)
    Image.new("RGB", (16, 16), (200, 200, 200)).save(tmp_path / "rgb.png")
    assert load_image(str(tmp_path / "rgb.png"), 16) == pytest.approx(np.full((16, 16), 200 / 255))


def test_images_of_unknown_range_are_refused_naming_the_file(tmp_path):
    from PIL import Image

    from mtl_opt.problems.rrg.r2gen import load_image

    Image.fromarray(_ramp(np.int32, 1 << 20)).save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match=r"wide.tif holds 32-bit integers .*beyond 16 bits"):
        load_image(str(tmp_path / "wide.tif"), 16)
    Image.fromarray(_ramp(np.float32, 3)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float.tif holds floating-point values outside \[0, 1\]"):
        load_image(str(tmp_path / "float.tif"), 16)
    Image.fromarray(_ramp(np.float32, 1)).save(tmp_path / "unit.tif")
    np.testing.assert_allclose(load_image(str(tmp_path / "unit.tif"), 64)[0], np.linspace(0, 1, 64), atol=1e-6)


@pytest.mark.parametrize("which", ["annotation", "labels_json", "labels_csv"])
def test_text_files_that_are_not_utf8_name_the_file_and_the_byte(which, tmp_path, capsys):
    root, studies = _iu_root(tmp_path)
    latin1 = "Cardiom\u00e9galie l\u00e9g\u00e8re."  # é is one byte (0xe9) in Latin-1, invalid in UTF-8
    if which == "annotation":
        studies[0]["report"] = latin1
        bad = root / "annotation.json"
        bad.write_bytes(json.dumps({"train": studies}, ensure_ascii=False).encode("latin-1"))
        kwargs = {}
    elif which == "labels_json":
        _write(root, {"train": studies})
        bad = tmp_path / "labels.json"
        bad.write_bytes(json.dumps({s["id"]: [""] * 14 for s in studies} | {latin1: [""] * 14},
                                   ensure_ascii=False).encode("latin-1"))
        kwargs = {"labels_file": str(bad)}
    else:
        _write(root, {"train": studies})
        bad = tmp_path / "labels.csv"
        header = "id," + ",".join(f'"{o}"' if " " in o else o for o in OBSERVATIONS)
        rows = [header] + [f"{sid}," + ",".join([""] * 14) for sid in [s["id"] for s in studies] + [latin1]]
        bad.write_bytes("\n".join(rows).encode("latin-1"))
        kwargs = {"labels_file": str(bad)}
    message = rf"{re.escape(str(bad))} is not UTF-8 text \(byte 0xe9 at offset \d+: invalid continuation byte\)"
    with pytest.raises(ValueError, match=message):
        R2GenDataset(root, image_size=8, **kwargs)
    # Through the command line: one line naming the file, no traceback.
    from mtl_opt.cli import main

    argv = ["rrg", "train", "--data", str(root), "--steps", "1", "--out", str(tmp_path / "run")]
    if kwargs:
        argv += ["--labels-file", kwargs["labels_file"]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err) and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    # The same file in UTF-8 (with or without a byte-order mark) is read.
    text = bad.read_bytes().decode("latin-1")
    for prefix in (b"", b"\xef\xbb\xbf"):
        bad.write_bytes(prefix + text.encode("utf-8"))
        ds = R2GenDataset(root, image_size=8, **kwargs)
        assert len(ds) == 3
        if which == "annotation":
            assert ds.reports()[0] == latin1
