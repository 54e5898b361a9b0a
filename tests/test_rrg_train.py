"""Training, evaluation and conflict measurement of the RRG workload (tiny model, 32-px synthetic
images, one CPU core)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from mtl_opt.cli import main
from mtl_opt.problems.rrg.train import (
    RRGConfig,
    conflict_figures,
    conflict_of_gradients,
    measure_conflict,
    make_loader,
    prepare_run,
    train_rrg,
    train_steps,
)

SMALL = dict(n_train=128, n_val=16, n_test=16, batch_size=16, log_every=10, lr=3e-3)


def _first_last(history, key):
    return history[0][key], history[-1][key]


@pytest.fixture(scope="module")
def came_run(tmp_path_factory):
    """One run through the command line: default method (came_grad), METEOR on."""
    out = tmp_path_factory.mktemp("came") / "run"
    code = main(["rrg", "train", "--steps", "40", "--n-train", "128", "--n-val", "16",
                 "--n-test", "16", "--batch-size", "16", "--log-every", "10", "--out", str(out),
                 "--quiet", "--samples", "3"])
    assert code == 0
    return out


def test_cli_run_writes_the_run_folder(came_run):
    for name in ("config.json", "metrics.csv", "eval.json", "checkpoint.pt", "samples.md"):
        assert (came_run / name).is_file(), name
    config = json.loads((came_run / "config.json").read_text())
    assert config["method"]["name"] == "came_grad"
    assert config["task_weights"] == [1.0, 4.0]
    assert config["task_weights_mode"] == "aggregator"
    assert config["total_steps"] == 40
    assert 5e4 <= config["n_parameters"]["total"] <= 2e5
    rows = list(csv.DictReader((came_run / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 10, 20, 30, 40]
    for key in ("loss_report", "loss_classification", "drift_cos", "diffusion", "beta_1", "beta_2"):
        assert key in rows[0]
    ev = json.loads((came_run / "eval.json").read_text())
    for key in ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "CE_f1_micro", "cls_accuracy"):
        assert key in ev["metrics"] and math.isfinite(ev["metrics"][key]), key
    assert ev["n"] == 16 and ev["split"] == "test"
    samples = (came_run / "samples.md").read_text()
    assert samples.count("**generated**") == 3


def test_came_grad_diffusion_is_within_its_bounds(came_run):
    """CAME-Grad: g = (1-ν) u_en + ν κ g_joint with ‖u_en‖ = κ‖g_joint‖, so by the triangle
    inequality ‖g‖/‖g_joint‖ lies in [κ(1-2ν), κ] = [0.9, 1.5] at the defaults."""
    rows = list(csv.DictReader((came_run / "metrics.csv").open()))
    for r in rows:
        assert 0.9 - 1e-4 <= float(r["diffusion"]) <= 1.5 + 1e-4
        assert -1.0 <= float(r["drift_cos"]) <= 1.0


def test_rrg_eval_reloads_the_checkpoint_and_reproduces_the_metrics(came_run, capsys):
    saved = json.loads((came_run / "eval.json").read_text())["metrics"]
    capsys.readouterr()
    assert main(["rrg", "eval", "--checkpoint", str(came_run), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["metrics"]
    assert set(again) == set(saved)
    for k, v in saved.items():
        assert again[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    # by default: a one-line summary, the whole JSON in the file it names
    assert main(["rrg", "eval", "--checkpoint", str(came_run)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "BLEU_4=" in printed[0] and "eval-" in printed[0]
    written = json.loads(next(came_run.glob("eval-*.json")).read_text())["metrics"]
    assert set(written) == set(saved)


def test_rrg_conflict_says_what_its_numbers_are(capsys):
    assert main(["rrg", "conflict", "--synthetic", "undercall=0.6", "--steps", "2", "--batches", "2",
                 "--size", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "norm_ratio_mean=" in out and "norm_ratio: ‖g_cls‖ / ‖g_report‖" in out


@pytest.mark.parametrize("method", ["ls", "came_grad"])
def test_tiny_training_clearly_decreases_both_losses(method, tmp_path):
    result = train_rrg(RRGConfig(method=method, steps=40, seed=0, out=str(tmp_path / method),
                                 meteor=False, **SMALL))
    h = result["history"]
    r0, r1 = _first_last(h, "loss_report")
    c0, c1 = _first_last(h, "loss_classification")
    assert r1 < 0.6 * r0, (r0, r1)
    assert c1 < 0.6 * c0, (c0, c1)
    if method == "ls":
        # Linear scalarization applies exactly g_joint = Σ ω_i g_i: diffusion is 1.
        for row in h:
            assert row["diffusion"] == pytest.approx(1.0, rel=1e-4)


def test_callback_sees_every_logged_row(tmp_path):
    seen = []
    result = train_rrg(RRGConfig(method="ls", steps=12, out=str(tmp_path / "cb"), meteor=False,
                                 eval_max_samples=4, **{**SMALL, "log_every": 4}),
                       callback=lambda step, row: seen.append((step, row["loss_report"])))
    assert [s for s, _ in seen] == [1, 4, 8, 12]
    assert [r["loss_report"] for r in result["history"]] == [v for _, v in seen]


@pytest.mark.parametrize("options", [
    dict(aggregate_at="representation"),
    dict(contrastive=True),
    dict(method="mgda", views=2),
    dict(method="ls", grad_clip=0.5),
])
def test_other_training_paths_run_and_log(options):
    cfg = RRGConfig(**{"method": "came_grad", **options}, **{**SMALL, "n_train": 32, "log_every": 2})
    setup = prepare_run(cfg)
    rows = train_steps(setup, 4)
    assert [r["step"] for r in rows] == [1, 2, 4]
    for r in rows:
        assert all(math.isfinite(r[f"loss_{n}"]) for n in setup.model.task_names)
        assert math.isfinite(r["drift_cos"]) and r["diffusion"] > 0
    if options.get("contrastive"):
        assert "loss_contrastive" in rows[0] and len(setup.model.task_names) == 3
    if "grad_clip" in options:
        assert all(r["combined_norm"] <= 0.5 + 1e-5 for r in rows)


def test_methods_without_task_weights_get_them_as_loss_scales():
    cfg = RRGConfig(method="mgda", **{**SMALL, "n_train": 16})
    setup = prepare_run(cfg)
    assert setup.task_weights_mode == "loss_scale"
    rows = train_steps(setup, 1)
    # The logged losses are the unscaled task losses: the classification loss starts near
    # ln 4 (a 4-way softmax at initialisation), not 4 ln 4.
    assert rows[0]["loss_classification"] < 2.0


def test_conflict_figures_by_hand():
    g1 = torch.tensor([1.0, 0.0])
    g2 = torch.tensor([-1.0, 1.0])
    G = torch.stack([g1, g2])
    w = [1.0, 4.0]
    combined = torch.tensor([3.0, 4.0])
    c = conflict_of_gradients(G, w, combined)
    assert c["drift_cos"] == pytest.approx(-1 / math.sqrt(2))
    assert c["norm_ratio"] == pytest.approx(math.sqrt(2))
    joint = (g1 + 4 * g2).norm().item()  # (-3, 4) -> 5
    assert c["joint_norm"] == pytest.approx(joint)
    assert c["diffusion"] == pytest.approx(5.0 / joint)
    # Rows scaled by the weights before the Gramian give the same figures.
    Gs = torch.stack([1.0 * g1, 4.0 * g2])
    s = conflict_figures(Gs @ Gs.T, w, row_scale=w, combined_norm=5.0)
    for k in ("drift_cos", "norm_ratio", "joint_norm", "diffusion"):
        assert s[k] == pytest.approx(c[k]), k


def test_measure_conflict_leaves_the_model_unchanged():
    cfg = RRGConfig(**{**SMALL, "n_train": 48})
    setup = prepare_run(cfg)
    before = [p.detach().clone() for p in setup.model.parameters()]
    loader = make_loader(setup.datasets["train"], setup.tokenizer, cfg, shuffle=False)
    res = measure_conflict(setup.model, loader, 3)
    assert res["n_batches"] == 3
    assert -1.0 <= res["cos_mean"] <= 1.0 and res["norm_ratio_mean"] > 0
    assert res["weighted_norm_ratio_mean"] == pytest.approx(4 * res["norm_ratio_mean"])
    for a, b in zip(before, setup.model.parameters()):
        assert torch.equal(a, b)


def test_conflict_command(capsys):
    assert main(["rrg", "conflict", "--batches", "2", "--n-train", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_batches"] == 2 and res["steps"] == 0
    assert -1.0 <= res["cos_mean"] <= 1.0


@pytest.mark.parametrize("argv, message", [
    (["--method", "no_such_method"], "unknown method"),
    (["--method", "came_grad:kapa=2"], "unknown hyperparameter"),
    (["--data", "/definitely/not/here"], "does not exist"),
    (["--task-weights", "1,2,3"], "task_weights has 3 entries"),
    (["--task-weights", "1,0"], "task_weights must be finite and > 0"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--amp"], "--amp needs a CUDA device"),
])
def test_bad_options_fail_clearly_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["rrg", "train", "--steps", "5", "--out", str(out), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_data_folder_without_annotation_fails(tmp_path, capsys):
    folder = tmp_path / "iu"
    folder.mkdir()
    assert main(["rrg", "train", "--data", str(folder), "--out", str(tmp_path / "x")]) == 2
    assert "annotation.json" in capsys.readouterr().err


def test_eval_of_missing_checkpoint_fails(tmp_path, capsys):
    assert main(["rrg", "eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _write_iu_folder(root: Path, n: int = 6, bad: bool = False) -> None:
    """A tiny IU X-Ray folder in the R2Gen layout, images drawn by the synthetic set."""
    import numpy as np
    from PIL import Image

    from mtl_opt.problems.rrg.synthetic import SyntheticCXR

    ds = SyntheticCXR(3 * n, image_size=32, views=2, seed=3)
    (root / "images").mkdir(parents=True)
    annotation = {"train": [], "val": [], "test": []}
    for i in range(3 * n):
        item = ds[i]
        paths = []
        for v in range(2):
            rel = f"CXR{i}/{v}.png"
            (root / "images" / f"CXR{i}").mkdir(exist_ok=True)
            pixels = (item["image"][v, 0].numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / rel)
            paths.append(rel)
        split = ("train", "val", "test")[i // n]
        annotation[split].append({"id": f"CXR{i}", "report": item["report"], "image_path": paths,
                                  "split": split})
    if bad:
        annotation["train"].append({"id": "broken", "report": "no acute disease .",
                                    "image_path": ["missing/0.png", "missing/1.png"], "split": "train"})
    (root / "annotation.json").write_text(json.dumps(annotation))


def test_training_on_an_r2gen_folder_with_skip_bad(tmp_path, capsys):
    root = tmp_path / "iu"
    _write_iu_folder(root, bad=True)
    out = tmp_path / "run"
    base = ["rrg", "train", "--data", str(root), "--dataset", "iu_xray", "--steps", "3",
            "--batch-size", "4", "--no-meteor", "--quiet", "--out", str(out)]
    # Without --skip-bad the broken study stops the run before training, naming the study.
    assert main(base) == 2
    assert "broken" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        assert main([*base, "--skip-bad"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dataset_sizes"] == {"train": 6, "val": 6, "test": 6}
    assert [s[0] for s in config["skipped_studies"]["train"]] == ["broken"]
    assert config["model"]["max_views"] == 2
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == 6 and "METEOR" not in ev["metrics"]


def test_epochs_set_the_number_of_steps():
    cfg = RRGConfig(epochs=2, **{**SMALL, "n_train": 40})
    setup = prepare_run(cfg)
    assert setup.total_steps == 2 * 3  # 40 studies in batches of 16


def test_unknown_synthetic_option_fails(tmp_path, capsys):
    assert main(["rrg", "train", "--synthetic", "undercal=0.5", "--out", str(tmp_path / "x")]) == 2
    assert "unknown synthetic data option" in capsys.readouterr().err


def test_training_module_imports_without_pandas_plotly_or_ray():
    import subprocess
    import sys

    code = ("import sys, mtl_opt.problems.rrg.train, mtl_opt.experiments.rrg_cli, mtl_opt.cli; "
            "mtl_opt.cli.build_parser(); "
            "print(','.join(m for m in ('pandas', 'plotly', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_loss_weightings_train_with_post_step_losses_and_epoch_ends():
    # FAMO learns its logits from the losses after each step; DWA's epochs are the data's
    # (32 examples / batch 16: two steps per epoch); no per-method code in the trainer.
    famo = prepare_run(RRGConfig(method="famo", **{**SMALL, "n_train": 32, "log_every": 2}))
    rows = train_steps(famo, 3)
    assert famo.aggregator.adam_steps == 3 and not torch.equal(famo.aggregator.logits,
                                                               torch.zeros_like(famo.aggregator.logits))
    assert all(math.isfinite(r["drift_cos"]) for r in rows)  # conflict figures on logged steps
    dwa = prepare_run(RRGConfig(method="dwa", **{**SMALL, "n_train": 32, "log_every": 2}))
    train_steps(dwa, 5)
    assert dwa.aggregator.previous_epoch_mean is not None  # two epochs ended
    assert rows[-1]["beta_1"] > 0
