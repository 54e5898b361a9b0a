"""The runner, the comparison study and ``mtl-opt compare``: batching equals independent runs,
the optimizer is torch's, the published Toy results reappear, bad options fail before work."""

from __future__ import annotations

import csv
import json
import re
import time

import pytest
import torch

import mtl_opt
from mtl_opt.cli import main
from mtl_opt.experiments.runner import RunResult, _Adam, run_method, run_methods
from mtl_opt.problems import get_problem

pytest.importorskip("pymoo")
pytest.importorskip("pandas")
pytest.importorskip("plotly")


# ------------------------------------------------------------------------------------ runner
def test_run_method_result_and_callback():
    seen = []
    r = run_method("toy", "mgda", steps=30, record_every=10, lr=1e-2,
                   callback=lambda step, metrics: seen.append((step, dict(metrics))))
    assert isinstance(r, RunResult)
    assert r.x.shape == (5, 2) and r.losses.shape == (5, 2)
    assert r.stationarity.shape == (5,) and r.front_distance.shape == (5,)
    assert r.start_index.tolist() == [0, 1, 2, 3, 4] and r.seed.tolist() == [0] * 5
    assert [s for s, _ in seen] == [0, 10, 20, 30]
    for _, metrics in seen:
        assert set(metrics) == {"loss_1", "loss_2", "stationarity", "front_distance"}
    assert seen[-1][1]["loss_1"] == pytest.approx(float(r.losses[:, 0].mean()))
    assert r.history["step"] == [0, 10, 20, 30]
    assert r.history["x"].shape == (4, 5, 2) and r.history["losses"].shape == (4, 5, 2)
    torch.testing.assert_close(r.history["x"][0], get_problem("toy").protocol_starts())
    assert r.time_per_step > 0


def test_batched_runs_equal_independent_runs():
    starts = torch.tensor([[9.0, 9.0], [-7.5, -0.5]], dtype=torch.float64)
    together = run_methods("toy", ["mgda", "nash_mtl", "ls"], starts=starts, steps=200, lr=1e-2, record_every=200)
    for r in together:
        for s in range(2):
            alone = run_method("toy", r.method, starts=starts[s:s + 1], steps=200, lr=1e-2, record_every=200)
            torch.testing.assert_close(alone.x[0], r.x[s], rtol=0, atol=1e-12)


def test_runner_matches_a_plain_torch_loop():
    """LS with all-ones weights is gradient descent on the summed loss: the batched runner
    must reproduce torch.optim.Adam driven by autograd, run by run."""
    problem = get_problem("quadratic")
    starts = problem.protocol_starts()[:2]
    r = run_method(problem, "ls", starts=starts, steps=150, lr=5e-2, record_every=150)
    for s in range(2):
        x = starts[s].clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=5e-2, foreach=False)
        for _ in range(150):
            opt.zero_grad()
            problem.losses(x).sum().backward()
            opt.step()
        torch.testing.assert_close(r.x[s], x.detach(), rtol=0, atol=1e-10)
    sgd = run_method(problem, "ls", starts=starts[:1], steps=5, lr=1e-2, optimizer="sgd", record_every=5)
    x = starts[0].clone()
    for _ in range(5):
        x = x - 1e-2 * problem.losses_and_jacobian(x)[1].sum(0)
    torch.testing.assert_close(sgd.x[0], x, rtol=0, atol=1e-12)


def test_adam_is_torch_adam_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = x.clone().requires_grad_(True)
    ours, theirs = _Adam(x, 3e-3), torch.optim.Adam([y], lr=3e-3, foreach=False)
    for _ in range(200):
        grad = torch.randn(7, 3, generator=g, dtype=torch.float64)
        ours.step(grad)
        y.grad = grad.clone()
        theirs.step()
    assert torch.equal(x, y.detach())


def test_noise_is_seeded_per_run():
    kw = dict(steps=40, lr=1e-2, record_every=40)
    a = run_method("quadratic_noisy", "ls", seeds=(0, 1), **kw)
    b = run_method("quadratic_noisy", "ls", seeds=(0, 1), **kw)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)  # reproducible
    assert a.seed.tolist() == [0, 1] * 5
    assert not torch.allclose(a.x[0], a.x[1])  # seeds differ
    # a run's noise depends on its seed only, not on which other seeds or methods share the batch
    c = run_methods("quadratic_noisy", ["mgda", "ls"], seeds=(1,), **kw)[1]
    torch.testing.assert_close(c.x, a.x[1::2], rtol=0, atol=0)
    # and the noise is there: the deterministic problem ends elsewhere
    d = run_method("quadratic", "ls", seeds=(1,), **kw)
    assert not torch.allclose(d.x, c.x)


def test_randomised_methods_are_reproducible_from_specs():
    a = run_method("quadratic_many", "pcgrad", steps=30, lr=1e-2, record_every=30)
    b = run_method("quadratic_many", "pcgrad", steps=30, lr=1e-2, record_every=30)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    c = run_method("quadratic_many", "pcgrad:seed=5", steps=30, lr=1e-2, record_every=30)
    assert not torch.equal(a.x, c.x)


def test_bounds_conflicts_and_stationarity_on_zdt1():
    r = run_method("zdt1", "nash_mtl", steps=300, lr=3e-2, record_every=100)
    assert float(r.x.min()) >= 0 and float(r.x.max()) <= 1
    assert r.history["x"] is None and r.x.shape == (5, 30)  # dim > 10: no trajectory
    # f₁ = x₁ and ∂f₂/∂x₁ < 0: the two gradients conflict at every step
    assert r.conflict_share.tolist() == [1.0] * 5
    # Nash-MTL drives the tail to its bound and ends Pareto-stationary on the front (measured
    # on the coordinates the active bounds leave free)
    assert float(r.front_distance.max()) < 1e-6
    assert float(r.stationarity.max()) < 1e-6
    assert float(r.x[:, 1:].max()) == 0.0
    assert r.history["front_distance"][0].min() > 1


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be >= 1"),
    ({"steps": -5}, "steps must be >= 1"),
    ({"lr": -1e-3}, "lr must be a finite number > 0"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"optimizer": "rmsprop"}, "unknown optimizer"),
    ({"record_every": 0}, "record_every must be >= 1"),
    ({"seeds": ()}, "seeds must be a non-empty"),
    ({"seeds": (1, 1)}, "seeds must be distinct"),
    ({"starts": torch.zeros(3, 5)}, r"starts must have shape \(S, 2\)"),
    ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "nonsense"}, "device"),
])
def test_bad_settings_fail_before_any_step(kwargs, message):
    calls = []
    with pytest.raises((ValueError, TypeError), match=message):
        run_method("toy", "ls", callback=lambda s, m: calls.append(s), **{"steps": 10, **kwargs})
    assert calls == []


@pytest.mark.parametrize("method, message", [
    ("adam_mtl", "unknown method"),
    ("cagrad:c=-1", "c"),
    ("came_grad:kappa=2,bogus=1", "unknown hyperparameter"),
])
def test_bad_methods_fail_before_any_step(method, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        run_method("toy", method, callback=lambda s, m: calls.append(s), steps=10)
    assert calls == []


def test_starts_outside_bounds_are_rejected():
    with pytest.raises(ValueError, match="inside zdt1's bounds"):
        run_method("zdt1", "ls", starts=torch.full((1, 30), 1.5), steps=1)


# ------------------------------------------------------------------ published Toy results
def test_published_toy_results_reappear():
    """Nash-MTL (Navon et al. 2022), Figure 1, at a fifth of the steps with five times the
    learning rate (Adam moves about lr per step, so the path budget is the protocol's):
    from (9, 9) LS, PCGrad and CAGrad(c=0.4) stall away from the Pareto set while MGDA and
    Nash-MTL reach it, and MGDA ends nearest the first task's optimum (it favours the task whose
    gradient is smaller)."""
    starts = torch.tensor([[9.0, 9.0], [0.0, 0.0], [-8.5, 7.5]], dtype=torch.float64)
    runs = {r.method: r for r in run_methods(
        "toy", ["ls", "pcgrad", "cagrad:c=0.4", "mgda", "nash_mtl"], starts=starts,
        steps=7000, lr=5e-3, record_every=1000)}
    for name in ("ls", "pcgrad", "cagrad:c=0.4"):
        assert runs[name].front_distance[0] > 1.0, name
        assert runs[name].x[0, 1] > -2.0, name  # still far above the set x₂ ≈ −8.36
    for name in ("mgda", "nash_mtl"):
        assert runs[name].front_distance[0] < 0.05, name
        assert runs[name].stationarity[0] < 1e-2, name
    mean_f1 = {name: float(r.losses[:, 0].mean()) for name, r in runs.items()}
    assert min(mean_f1, key=mean_f1.get) == "mgda"
    assert mean_f1["mgda"] < mean_f1["nash_mtl"] - 0.1
    # Nash-MTL from the origin lands on the set's midpoint (0, −8.3552), as in the paper
    torch.testing.assert_close(runs["nash_mtl"].x[1], torch.tensor([0.0, -8.3552], dtype=torch.float64),
                               rtol=0, atol=2e-3)


# ------------------------------------------------------------------------------------ seeds
def test_seeded_starts_draw_per_seed_and_depend_on_that_seed_only():
    from mtl_opt.experiments.runner import SEEDED_STARTS_OFFSET, seeded_starts

    toy = get_problem("toy")
    S = seeded_starts(toy, (0, 1, 2))
    assert S.shape == (5, 3, 2) and S.dtype == torch.float64
    for r in range(3):
        assert torch.equal(S[:, r], toy.initial_points(5, seed=SEEDED_STARTS_OFFSET + r))
    assert not torch.equal(S[:, 0], S[:, 1])
    assert not torch.equal(S[:, 0], toy.protocol_starts())  # never the published starts
    assert torch.equal(seeded_starts("toy", (2,))[:, 0], S[:, 2])
    zdt = seeded_starts("zdt1", (0, 1), n=4)
    assert zdt.shape == (4, 2, 30) and float(zdt.min()) >= 0 and float(zdt.max()) <= 1


def test_jittered_starts_perturb_each_start_per_seed():
    from mtl_opt.experiments.runner import jittered_starts

    toy = get_problem("toy")
    base = toy.protocol_starts()
    same = jittered_starts(toy, base, (0, 1), 0.0)
    assert torch.equal(same, base.unsqueeze(1).expand(5, 2, 2))
    J = jittered_starts(toy, base, (0, 1, 7), 0.5)
    assert J.shape == (5, 3, 2) and not torch.equal(J[:, 0], J[:, 1])
    assert torch.equal(jittered_starts(toy, base, (7,), 0.5)[:, 0], J[:, 2])  # its own seed only
    assert 0.1 < float((J - base.unsqueeze(1)).std()) < 1.0
    zdt = jittered_starts("zdt1", get_problem("zdt1").protocol_starts(), (0, 1), 5.0)
    assert float(zdt.min()) == 0.0 and float(zdt.max()) == 1.0  # clamped into the box
    with pytest.raises(ValueError, match="start jitter"):
        jittered_starts(toy, base, (0,), -1.0)


def test_per_seed_starts_are_the_runs_starts():
    from mtl_opt.experiments.runner import seeded_starts

    S = seeded_starts("toy", (0, 1), n=3)
    kw = dict(steps=20, lr=1e-2, record_every=10)
    r = run_method("toy", "mgda", starts=S, seeds=(0, 1), **kw)
    assert r.start_index.tolist() == [0, 0, 1, 1, 2, 2] and r.seed.tolist() == [0, 1] * 3
    torch.testing.assert_close(r.history["x"][0], S.reshape(6, 2), rtol=0, atol=0)
    # run s·R + r equals that start run on its own
    alone = run_method("toy", "mgda", starts=S[:, 1], seeds=(1,), **kw)
    torch.testing.assert_close(r.x[1::2], alone.x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="per-seed starts must have shape"):
        run_method("toy", "mgda", starts=S, seeds=(0, 1, 2), **kw)


def test_deterministic_methods_repeat_and_pcgrad_draws_per_seed():
    """Shared starts on a deterministic problem: a deterministic method's seeds are identical
    copies (as documented), PCGrad's seeds draw their own projection orders (K = 10)."""
    kw = dict(starts=get_problem("quadratic_many").protocol_starts()[:2], seeds=(0, 1), steps=30, lr=1e-2,
              record_every=30)
    ls = run_method("quadratic_many", "ls", **kw)
    assert torch.equal(ls.x[0::2], ls.x[1::2])
    fixed = run_method("quadratic_many", "pcgrad:order=fixed", **kw)
    assert torch.equal(fixed.x[0::2], fixed.x[1::2])
    pc = run_method("quadratic_many", "pcgrad", **kw)
    assert not torch.allclose(pc.x[0::2], pc.x[1::2])
    again = run_method("quadratic_many", "pcgrad", **kw)
    assert torch.equal(pc.x, again.x)  # reproducible
    one = run_method("quadratic_many", "pcgrad", **{**kw, "seeds": (1,)})
    assert torch.equal(one.x, pc.x[1::2])  # a run's orders depend on its own seed only
    other = run_method("quadratic_many", "pcgrad:seed=4", **kw)
    assert not torch.allclose(other.x, pc.x)  # and on the method's seed


def test_comparison_refuses_identical_copies_before_any_work():
    from mtl_opt.experiments.study import run_comparison

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="2 identical copies of every run on toy, zdt1") as info:
        run_comparison(["toy", "zdt1", "quadratic_noisy"], ["ls"], seeds=(0, 1), steps=10**9)
    assert "--start-jitter" in str(info.value) and "quadratic_noisy" not in str(info.value).split(":")[0]
    assert time.perf_counter() - t0 < 5  # 10**9 steps never started
    # a noisy problem's seeds are replicates already
    noisy = run_comparison(["quadratic_noisy"], ["ls"], seeds=(0, 1), steps=5, lr=1e-2)
    assert len(noisy.final) == 10


def test_comparison_start_jitter_makes_replicates_and_keeps_start_labels():
    from mtl_opt.experiments.study import run_comparison

    kw = dict(seeds=(0, 1), steps=30, lr=1e-2, start_jitter=0.3)
    comp = run_comparison(["toy"], ["ls", "mgda"], **kw)
    f = comp.final
    assert f["start"].tolist()[:10] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    a, b = f[f["seed"] == 0], f[f["seed"] == 1]
    assert not (a["loss_1"].to_numpy() == b["loss_1"].to_numpy()).any()  # replicates differ
    base = get_problem("toy").protocol_starts()
    x0 = comp.runs[0].history["x"][0]
    assert float((x0 - base.repeat_interleave(2, 0)).abs().max()) > 0.01
    assert comp.config["start_jitter"] == 0.3 and comp.config["problems"][0]["starts"] == base.tolist()
    again = run_comparison(["toy"], ["ls", "mgda"], **kw)
    cols = [c for c in f.columns if c != "time_per_step_us"]
    assert f[cols].equals(again.final[cols])  # reproducible
    # without jitter (one seed) the listed starts are run exactly
    plain = run_comparison(["toy"], ["ls"], steps=5, lr=1e-2)
    torch.testing.assert_close(plain.runs[0].history["x"][0], base, rtol=0, atol=0)


def test_nash_toy_protocol_runs_the_published_starts_unperturbed():
    import argparse

    from mtl_opt.experiments import compare_cli
    from mtl_opt.problems.toy import NASH_TOY_STARTS

    parser = argparse.ArgumentParser()
    compare_cli.configure(parser)
    args = parser.parse_args(["--protocol", "nash-toy", "--methods", "ls"])
    problems, _, _, seeds, starts, labels, steps, lrs, _ = compare_cli._from_options(args)
    assert seeds == [0] and args.start_jitter == 0.0
    assert torch.equal(starts["toy"], torch.tensor(NASH_TOY_STARTS, dtype=torch.float64))
    assert labels["toy"] == [0, 1, 2, 3, 4] and steps["toy"] == 35000 and lrs["toy"] == 1e-3


# ------------------------------------------------------------------------------------ CLI
def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_cli_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--problems", "toy", "zdt1", "dtlz2", "quadratic:imbalance=100", "--methods", "ls",
                 "mgda", "came_grad:kappa=2,nu=0.5", "--steps", "20", "--seeds", "0,3", "--starts", "0,2",
                 "--start-jitter", "0.05", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"outputs in {out}" in printed and "hypervolume" in printed
    for name in ("config.json", "final.csv", "summary.csv", "summary.md", "index.html",
                 "trajectories_toy.html", "objectives_toy.html", "objectives_zdt1.html", "objectives_dtlz2.html",
                 "objectives_quadratic_imbalance_100.html", "convergence.html"):
        assert (out / name).is_file(), name
    header, rows = _read_csv(out / "final.csv")
    assert header[:4] == ["method", "problem", "start", "seed"]
    assert header[4:6] == ["x_0", "x_1"] and "x_9" in header and "x_10" not in header
    assert header[header.index("loss_1"):header.index("loss_2") + 1] == ["loss_1", "loss_2"]
    assert {"stationarity", "front_distance"} <= set(header)
    assert "loss_3" in header  # DTLZ2's third task
    assert len(rows) == 3 * 4 * 2 * 2  # methods × problems × starts × seeds
    starts = {r[header.index("start")] for r in rows}
    assert starts == {"0", "2"}  # indices into the protocol's list
    assert {r[header.index("seed")] for r in rows} == {"0", "3"}
    assert {r[0] for r in rows} == {"ls", "mgda", "came_grad:kappa=2,nu=0.5"}
    s_header, s_rows = _read_csv(out / "summary.csv")
    assert {"hypervolume", "igd", "rank"} <= set(s_header) and len(s_rows) == 12
    config = json.loads((out / "config.json").read_text())
    assert config["methods"] == ["ls", "mgda", "came_grad:kappa=2,nu=0.5"]
    assert config["seeds"] == [0, 3] and config["problems"][0]["steps"] == 20
    assert config["start_jitter"] == 0.05 and "--start-jitter 0.05" in config["rerun"]
    assert config["problems"][0]["starts"] == [[-8.5, 7.5], [9.0, 9.0]]  # the listed starts, unperturbed
    assert config["problems"][3]["options"]["imbalance"] == 100
    index = (out / "index.html").read_text()
    links = set(re.findall(r'href="([^"]+\.html)"', index))
    assert links == {p.name for p in out.glob("*.html")} - {"index.html"}
    assert "| method |" in (out / "summary.md").read_text()


def test_cli_reruns_from_its_config(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["compare", "--problems", "toy", "quadratic_noisy", "--methods", "pcgrad", "nash_mtl",
                 "--steps", "15", "--seeds", "2x", "--starts", "1,3", "--lr", "0.01", "--start-jitter", "0.2",
                 "--out", str(first),
                 "--quiet", "--no-figures"]) == 0
    assert main(["compare", "--config", str(first / "config.json"), "--out", str(second), "--quiet",
                 "--no-figures"]) == 0
    a = (first / "final.csv").read_text().splitlines()
    b = (second / "final.csv").read_text().splitlines()
    drop = a[0].split(",").index("time_per_step_us")
    assert [r.split(",")[:drop] for r in a] == [r.split(",")[:drop] for r in b]
    assert not list(second.glob("*.html"))
    assert main(["compare", "--config", str(first / "config.json"), "--steps", "3", "--out",
                 str(tmp_path / "c")]) == 2
    assert "--config fixes the study" in capsys.readouterr().err


def test_parallel_workers_give_identical_results():
    from mtl_opt.experiments.study import run_comparison

    kw = dict(seeds=(0, 1), steps=25, lr=1e-2, start_jitter=0.1)
    one = run_comparison(["toy", "quadratic_noisy"], ["ls", "pcgrad", "mgda"], **kw)
    two = run_comparison(["toy", "quadratic_noisy"], ["ls", "pcgrad", "mgda"], workers=2, **kw)
    cols = [c for c in one.final.columns if c != "time_per_step_us"]
    assert one.final[cols].equals(two.final[cols])


def test_cli_protocol_rejects_conflicting_options(tmp_path, capsys):
    assert main(["compare", "--protocol", "nash-toy", "--steps", "10", "--out", str(tmp_path / "x")]) == 2
    assert "fixes --steps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["--methods", "ls", "nope"], "unknown method 'nope'"),
    (["--problems", "zdt7"], "unknown problem 'zdt7'"),
    (["--methods", "cagrad:c=-0.5"], "c"),
    (["--steps", "-3"], "--steps must be >= 1"),
    (["--lr", "0"], "--lr must be"),
    (["--optimizer", "lbfgs"], "unknown optimizer"),
    (["--starts", "0,9"], "out of range"),
    (["--seeds", "a,b"], "--seeds must be"),
    (["--seeds", "3x"], "3 identical copies of every run on toy, zdt1, dtlz2, quadratic"),
    (["--protocol", "nash-toy", "--seeds", "2x"], "identical copies"),
    (["--protocol", "nash-toy", "--start-jitter", "0.1"], "fixes --start-jitter"),
    (["--start-jitter", "-1"], "--start-jitter must be"),
])
def test_cli_bad_options_fail_before_work(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    t0 = time.perf_counter()
    assert main(["compare", *argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one clear line
    assert not out.exists()
    assert time.perf_counter() - t0 < 5


def test_cli_lists_compare():
    from mtl_opt.cli import discover_subcommands

    assert "compare" in discover_subcommands()
    assert set(mtl_opt.available_aggregators()) >= {"ls", "pcgrad", "mgda", "cagrad", "nash_mtl", "came_grad"}


# ------------------------------------------------------------------------------------ precision
def test_float32_runs_stall_on_the_toy_plateau_as_the_published_code_did():
    """LS from (−8.5, 7.5) under the Nash-toy protocol: in float32 (the published code's
    precision) the run stalls on the plateau near y ≈ −5 (the original ends at (−5.71, −5.45));
    in float64 it slides on towards the front."""
    start = torch.tensor([[-8.5, 7.5]], dtype=torch.float64)
    f32 = run_method("toy", "ls", starts=start, steps=35000, lr=1e-3, record_every=35000, dtype="float32")
    f64 = run_method("toy", "ls", starts=start, steps=35000, lr=1e-3, record_every=35000)
    assert f32.x[0, 0] == pytest.approx(-5.7, abs=0.1) and -6.0 < float(f32.x[0, 1]) < -4.0
    assert float(f64.x[0, 1]) < -7.0
    with pytest.raises(ValueError, match="dtype must be one of"):
        run_method("toy", "ls", steps=2, dtype="float16")


def test_nash_toy_protocol_runs_in_float32_and_records_it(tmp_path, capsys):
    out, again, short = tmp_path / "f32", tmp_path / "again", tmp_path / "short"
    assert main(["compare", "--protocol", "nash-toy", "--methods", "ls", "--out", str(out),
                 "--quiet", "--no-figures"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "--dtype float32" in config["rerun"]
    with open(out / "final.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert -6.0 < float(rows[0]["x_1"]) < -4.0  # start 0, (−8.5, 7.5): stalled as in float32
    assert main(["compare", "--config", str(out / "config.json"), "--out", str(again), "--quiet",
                 "--no-figures"]) == 0
    assert json.loads((again / "config.json").read_text())["dtype"] == "float32"
    with open(again / "final.csv", newline="") as f:
        assert [r["x_1"] for r in csv.DictReader(f)] == [r["x_1"] for r in rows]
    # other studies default to float64; --dtype picks either
    assert main(["compare", "--problems", "toy", "--methods", "ls", "--steps", "5", "--dtype", "float32",
                 "--out", str(short), "--quiet", "--no-figures"]) == 0
    assert json.loads((short / "config.json").read_text())["dtype"] == "float32"
    capsys.readouterr()
