"""``mtl-opt rrg compare``: several methods trained on the same data and seeds, one table.

:func:`compare_rrg` trains every method once per seed with :func:`~mtl_opt.problems.rrg.train.train_rrg` (same data,
same initialisation, same batch order per seed: only the method differs), then tabulates the
test reports the way report generation papers do:

* NLG: BLEU-1..4, METEOR, ROUGE-L, CIDEr (coco-caption scorers, :func:`~mtl_opt.problems.rrg.metrics.nlg_metrics`);
  METEOR reads ``n/a (no Java)`` where no Java runtime is found;
* CE precision/recall/F1 under the two conventions the field reports under the same name
  (:data:`~mtl_opt.problems.rrg.metrics.CE_PRESETS`): ``PromptMRG`` (example-based, positive only) and ``CAME-Grad``
  (macro over the 14 observations, uncertain counted positive);
* each method's CE F1 gain over linear scalarization (``ls``; paired by seed, in F1 points ×100);
* the running share of training steps whose two task gradients had a negative inner product;
* on synthetic data, CE F1 of the generated reports against the generator's true labels;
* the classification head's accuracy and positive-class F1 on its own targets (task 2);
* two baselines computed on the same splits: a **majority-class** classifier (for every
  observation the training reports' most frequent label, predicted for every test study: its CE;
  and the training targets' most frequent class: its accuracy and F1 next to the head's)
  and a **copy** generator (the most common training report, in the tokenizer's view, written for
  every test study: its NLG and CE).

The output folder holds ``config.json`` (how the table was made), ``table.csv`` and ``table.md``
(means over seeds, with ``*_std`` columns when there are several seeds), ``runs.csv`` (one row
per method and seed, baselines included) and ``runs/<method>-seed<k>/`` (each run's folder).
"""

from __future__ import annotations

import collections
import csv
import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mtl_opt.experiments.environment import environment_stamp
from mtl_opt.experiments.markdown_table import to_markdown
from mtl_opt.problems.rrg.metrics import (
    CE_PRESETS,
    NLG_KEYS,
    ce_preset_keys,
    clinical_efficacy,
    format_metric,
    nlg_metrics,
)
from mtl_opt.problems.rrg.train import RRGConfig, build_datasets, dataset_reports, train_rrg

__all__ = ["PRESET_TITLES", "baseline_rows", "compare_rrg", "format_table"]

PRESET_TITLES = {"promptmrg": "PromptMRG (example, positive)",
                 "came_grad": "CAME-Grad (macro, positive or uncertain)"}
#: Short column prefixes of the two CE conventions.
_PREFIX = {"promptmrg": "CE_pm", "came_grad": "CE_cg"}
BASELINE_MAJORITY = "baseline: majority class"
BASELINE_COPY = "baseline: copy most common report"


def _ce_columns(ce: dict[str, float], prefix: str = "") -> dict[str, float]:
    row = {}
    for preset in CE_PRESETS:
        for stat, key in ce_preset_keys(preset).items():
            row[f"{prefix}{_PREFIX[preset]}_{stat[0].upper() if stat != 'f1' else 'F1'}"] = ce[key]
    return row


def _run_row(method: str, seed: int, ev: dict[str, Any]) -> dict[str, Any]:
    m = ev["metrics"]
    row: dict[str, Any] = {"method": method, "seed": seed}
    for k in NLG_KEYS:
        if k in m:
            row[k] = m[k]
    row.update(_ce_columns({k[3:]: v for k, v in m.items() if k.startswith("CE_")}))
    if any(k.startswith("CEtrue_") for k in m):
        truth = {k[7:]: v for k, v in m.items() if k.startswith("CEtrue_")}
        for preset in CE_PRESETS:
            row[f"true_{_PREFIX[preset]}_F1"] = truth[ce_preset_keys(preset)["f1"]]
    row["cls_accuracy"] = m.get("cls_accuracy")
    row["cls_F1"] = m.get("cls_f1_positive")
    row["conflict_share"] = ev.get("conflict_share")
    row["train_time_s"] = ev.get("train_time_s")
    return row


def _majority_labels(train_labels: np.ndarray) -> np.ndarray:
    """Per observation the most frequent of the states 1, 0, -1, blank (NaN) in the training
    labels (ties: the first in that order)."""
    out = np.full(train_labels.shape[1], np.nan)
    for c in range(train_labels.shape[1]):
        col = train_labels[:, c]
        counts = [(col == 1).sum(), (col == 0).sum(), (col == -1).sum(), np.isnan(col).sum()]
        out[c] = (1.0, 0.0, -1.0, np.nan)[int(np.argmax(counts))]
    return out


def _dataset_labels(ds: Any, n: int) -> np.ndarray:
    """The classification labels (n, 14) of a dataset's first ``n`` studies, without images."""
    labels = getattr(ds, "labels", None)
    if callable(labels):
        return np.stack([np.asarray(labels(i), dtype=np.float64) for i in range(n)])
    studies = getattr(ds, "studies", None)
    if studies is not None:
        return np.stack([np.asarray(s["labels"], dtype=np.float64) for s in studies[:n]])
    return np.stack([np.asarray(ds[i]["labels"], dtype=np.float64) for i in range(n)])


def _majority_classifier(train: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Accuracy and positive-class F1 (micro over studies × observations, as the head's
    ``cls_accuracy`` / ``cls_f1_positive``) of predicting, for every observation, its most
    frequent training class among blank/positive/negative/uncertain."""
    from mtl_opt.problems.rrg.observations import labels_to_classes

    tr = labels_to_classes(train).numpy()
    te = labels_to_classes(test).numpy()
    majority = np.array([np.bincount(tr[:, c], minlength=4).argmax() for c in range(tr.shape[1])])
    pred = np.broadcast_to(majority, te.shape)
    tp = int(((pred == 1) & (te == 1)).sum())
    fp = int(((pred == 1) & (te != 1)).sum())
    fn = int(((pred != 1) & (te == 1)).sum())
    return {"cls_accuracy": float((pred == te).mean()),
            "cls_F1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0}


def baseline_rows(cfg: RRGConfig, references: list[str], *, seed: int) -> list[dict[str, Any]]:
    """The majority-class and copy-the-most-common-report rows for ``cfg``'s data (its seed).

    ``references`` are the evaluated references as the runs scored them (the tokenizer's view
    of the first ``len(references)`` studies of the evaluation split).
    """
    from mtl_opt.problems.rrg.labeler import CheXpertLabeler
    from mtl_opt.problems.rrg.tokenizer import ReportTokenizer

    datasets = build_datasets(cfg)
    train_reports = dataset_reports(datasets["train"])
    tokenizer = ReportTokenizer.fit(train_reports,
                                    dataset="synthetic" if cfg.data == "synthetic" else cfg.dataset)
    labeler = CheXpertLabeler()
    ref_labels = labeler.label(references)
    n = len(references)
    eval_ds = datasets[cfg.eval_split]
    truth = None
    if callable(getattr(eval_ds, "true_labels", None)):
        truth = np.stack([eval_ds.true_labels(i) for i in range(n)])

    majority = np.tile(_majority_labels(labeler.label(train_reports)), (n, 1))
    maj: dict[str, Any] = {"method": BASELINE_MAJORITY, "seed": seed}
    maj.update(_ce_columns(clinical_efficacy(ref_labels, majority)))
    train_ds = datasets["train"]
    maj.update(_majority_classifier(_dataset_labels(train_ds, len(train_ds)),
                                    _dataset_labels(eval_ds, n)))
    if truth is not None:
        ce_t = clinical_efficacy(truth, majority)
        for preset in CE_PRESETS:
            maj[f"true_{_PREFIX[preset]}_F1"] = ce_t[ce_preset_keys(preset)["f1"]]

    views = [tokenizer.decode(tokenizer.encode(r)) for r in train_reports]
    common, _ = collections.Counter(views).most_common(1)[0]
    copies = [common] * n
    cp: dict[str, Any] = {"method": BASELINE_COPY, "seed": seed}
    cp.update(nlg_metrics(references, copies, meteor=cfg.meteor))
    cp.pop("METEOR_status", None)
    copy_labels = labeler.label(copies)
    cp.update(_ce_columns(clinical_efficacy(ref_labels, copy_labels)))
    if truth is not None:
        ce_t = clinical_efficacy(truth, copy_labels)
        for preset in CE_PRESETS:
            cp[f"true_{_PREFIX[preset]}_F1"] = ce_t[ce_preset_keys(preset)["f1"]]
    cp["copied_report"] = common
    return [maj, cp]


def _safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)


def _mean_std(values: list[Any]) -> tuple[Any, Any]:
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums or len(nums) != len(values):
        return (values[0] if values and all(v == values[0] for v in values) else None), None
    arr = np.asarray(nums, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def compare_rrg(methods: list[str], base: RRGConfig, *, seeds: list[int] = (0,),
                out: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train ``methods`` on ``base``'s data for every seed and write the comparison table.

    Returns ``{"out", "table" (rows: methods then baselines, means over seeds), "runs" (every
    method × seed and baseline × seed row), "wall_time_s"}``. All options are checked first.
    """
    import mtl_opt

    if not methods:
        raise ValueError("give at least one method to compare")
    if len(set(methods)) != len(methods):
        raise ValueError(f"a method is listed twice in {methods}")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"give distinct seeds, got {seeds}")
    base.validate()
    for seed in seeds:  # every run's own config (its method, its seed) before anything is written
        for spec in methods:
            replace(base, method=spec, seed=seed, synthetic=dict(base.synthetic)).validate()
    out_dir = Path(out) if out else Path("runs") / time.strftime("rrg-compare-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    record = {"methods": methods, "seeds": seeds, "base_config": base.to_dict(),
              "lr": base.resolved_lr(), "ce_presets": {p: {"average": a, "positive": c}
                                                       for p, (a, c) in CE_PRESETS.items()},
              "gain_over": "ls" if any(mtl_opt.parse_method_spec(m)[0] == "ls" and
                                       not mtl_opt.parse_method_spec(m)[1] for m in methods) else None,
              "command": " ".join(sys.argv), "environment": environment_stamp()}
    (out_dir / "config.json").write_text(json.dumps(record, indent=2, default=str))
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        refs: list[str] | None = None
        for spec in methods:
            cfg = replace(base, method=spec, seed=seed, synthetic=dict(base.synthetic),
                          out=str(out_dir / "runs" / f"{_safe_name(spec)}-seed{seed}"))
            say(f"[{time.perf_counter() - t0:6.0f}s] training {spec} (seed {seed}) -> {cfg.out}")
            result = train_rrg(cfg, verbose=False)
            runs.append(_run_row(spec, seed, result["eval"]))
            say(f"[{time.perf_counter() - t0:6.0f}s] {spec} seed {seed}: "
                + " ".join(f"{k}={format_metric(runs[-1].get(k), 3)}"
                           for k in ("BLEU_4", "CE_pm_F1", "CE_cg_F1", "conflict_share")))
            if refs is None:
                with (Path(cfg.out) / "samples.csv").open(newline="") as f:
                    refs = [r["reference"] for r in csv.DictReader(f)]
        base_seed = replace(base, seed=seed, synthetic=dict(base.synthetic))
        runs.extend(baseline_rows(base_seed, refs, seed=seed))
    _add_gains(runs, methods, record["gain_over"])
    table = _summarise(runs, [*methods, BASELINE_MAJORITY, BASELINE_COPY])
    wall = time.perf_counter() - t0
    _write_csv(out_dir / "runs.csv", runs)
    _write_csv(out_dir / "table.csv", table)
    md = format_table(table, base, seeds=seeds, wall_time_s=wall)
    (out_dir / "table.md").write_text(md)
    print(md)
    print(f"compare folder: {out_dir} ({wall:.0f} s)")
    return {"out": str(out_dir), "table": table, "runs": runs, "wall_time_s": wall}


def _add_gains(runs: list[dict[str, Any]], methods: list[str], over: str | None) -> None:
    """``gain_CE_pm_F1`` / ``gain_CE_cg_F1``: F1 minus the same seed's LS F1 (absolute)."""
    if over is None:
        return
    ls = {r["seed"]: r for r in runs if r["method"] == over}
    for r in runs:
        if r["method"] in methods:
            for key in ("CE_pm_F1", "CE_cg_F1"):
                r[f"gain_{key}"] = r[key] - ls[r["seed"]][key]


def _summarise(runs: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r if k not in keys and k not in ("method", "seed", "copied_report")]
    table = []
    for method in order:
        rows = [r for r in runs if r["method"] == method]
        row: dict[str, Any] = {"method": method, "n_seeds": len(rows)}
        for k in keys:
            vals = [r.get(k) for r in rows]
            if all(v is None for v in vals):
                continue
            mean, std = _mean_std(vals)
            row[k] = mean
            if std is not None:
                row[f"{k}_std"] = std
        table.append(row)
    return table


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})


_COLUMNS = [("BLEU_1", "B-1"), ("BLEU_2", "B-2"), ("BLEU_3", "B-3"), ("BLEU_4", "B-4"),
            ("METEOR", "MTR"), ("ROUGE_L", "R-L"), ("CIDEr", "CIDEr"),
            ("CE_pm_P", "P (pm)"), ("CE_pm_R", "R (pm)"), ("CE_pm_F1", "F1 (pm)"),
            ("gain_CE_pm_F1", "ΔF1 (pm)"),
            ("CE_cg_P", "P (cg)"), ("CE_cg_R", "R (cg)"), ("CE_cg_F1", "F1 (cg)"),
            ("gain_CE_cg_F1", "ΔF1 (cg)"),
            ("true_CE_pm_F1", "F1 true (pm)"), ("true_CE_cg_F1", "F1 true (cg)"),
            ("cls_accuracy", "cls acc"), ("cls_F1", "cls F1"), ("conflict_share", "conflict")]


def _cell(row: dict[str, Any], key: str, meteor_on: bool) -> str:
    if key not in row:
        if key == "METEOR" and meteor_on and not row["method"].startswith("baseline: majority"):
            return "n/a (no Java)"
        return ""
    v = row[key]
    if v is None:
        return "n/a (no Java)" if key == "METEOR" else ""
    if key.startswith("gain_"):
        text = f"{100 * v:+.1f}"
    elif key == "CIDEr":
        text = f"{v:.3f}"
    else:
        text = f"{v:.3f}"
    if f"{key}_std" in row:
        text += f" ± {(100 if key.startswith('gain_') else 1) * row[key + '_std']:.{1 if key.startswith('gain_') else 3}f}"
    return text


def format_table(table: list[dict[str, Any]], cfg: RRGConfig, *, seeds: list[int],
                 wall_time_s: float | None = None) -> str:
    """The Markdown table with a caption that says how it was produced."""
    present = [(k, t) for k, t in _COLUMNS if any(k in r for r in table) or k == "METEOR" and cfg.meteor]
    lines = to_markdown([[row["method"], *(_cell(row, k, cfg.meteor) for k, _ in present)] for row in table],
                        columns=["method", *(t for _, t in present)],
                        align=[None, *("right" for _ in present)]).splitlines()
    data = "synthetic" if cfg.data == "synthetic" else f"{cfg.dataset} ({cfg.data})"
    from mtl_opt.problems.rrg.train import DEFAULT_STEPS_BY_SIZE

    n_steps = f"{cfg.epochs} epochs" if cfg.epochs is not None else \
        f"{cfg.steps if cfg.steps is not None else DEFAULT_STEPS_BY_SIZE[cfg.model_size]} steps"
    caption = [
        "",
        f"Test split of {data}, model {cfg.model_size}, {n_steps}, batch {cfg.batch_size}, "
        f"AdamW lr {cfg.resolved_lr():g}, task weights {cfg.resolved_task_weights()}, "
        f"seeds {seeds} (mean{' ± std' if len(seeds) > 1 else ''}).",
        "NLG: coco-caption BLEU-1..4 (B-n), METEOR (MTR), ROUGE-L (R-L, β = 1.2), CIDEr-D on the "
        "cleaned, space-separated reports.",
        f"CE (pm) = {PRESET_TITLES['promptmrg']}; CE (cg) = {PRESET_TITLES['came_grad']}; "
        "labels from the rule labeler. ΔF1: F1 minus linear scalarization's (ls) on the same "
        "seed, ×100." + (" F1 true: the generated reports' labels against the generator's true "
                          "labels." if cfg.data == "synthetic" else ""),
        "conflict: share of training steps whose report and classification gradients on the "
        "shared encoder had a negative inner product.",
        "Baselines: majority class = each observation's most frequent training label for every "
        "study (CE from those labels; cls: the same rule on the classification targets); copy = "
        "the most common training report for every study.",
        "cls acc / cls F1: the classification head's accuracy over the 14 × 4 states and its "
        "positive-class F1 against the classification targets.",
    ]
    if wall_time_s is not None:
        caption.append(f"Wall time {wall_time_s:.0f} s.")
    return "\n".join(lines + caption) + "\n"
