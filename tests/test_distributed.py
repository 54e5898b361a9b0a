"""Distributed aggregation (mtl_opt.distributed): 2 gloo processes on 127.0.0.1, CPU, float64.

Each scenario starts the two ranks of tests/_distributed_worker.py as subprocesses with a hard
timeout (a hang fails the test, it never blocks the suite); all methods run in one group.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtl_opt
from mtl_opt import distributed as mdist

sys.path.insert(0, str(Path(__file__).parent))
import _distributed_worker as worker  # noqa: E402

WORKER = Path(__file__).parent / "_distributed_worker.py"
WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(scenario: str, tmp_path: Path, timeout: float) -> list[dict]:
    """Start both ranks, wait at most ``timeout`` seconds for all of them, return their outputs
    (a rank still running then is killed and the test fails)."""
    port = _free_port()
    outs = [tmp_path / f"{scenario}-{r}.pt" for r in range(WORLD)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(r), str(WORLD), str(port), str(outs[r])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"scenario {scenario!r} did not finish within {timeout} s (a hang)")
    results = []
    for r, out in enumerate(outs):
        assert out.exists(), f"rank {r} wrote nothing:\n{logs[r][-3000:]}"
        results.append(torch.load(out, weights_only=True))
    return results


@pytest.fixture(scope="module")
def methods_run(tmp_path_factory) -> list[dict]:
    results = _run("methods", tmp_path_factory.mktemp("dist"), timeout=240)
    for r, res in enumerate(results):
        assert "crashed" not in res, f"rank {r} crashed:\n{res['crashed']}"
    return results


def test_global_mode_equals_one_process_on_the_global_batch(methods_run):
    """Every registered method, 3 SGD steps: both ranks end with the parameters of one process
    trained on the concatenated batch (float64, 1e-6); random methods with different torch
    seeds per rank agree through the broadcast of rank 0's state."""
    batch = worker.global_batch()
    names = mtl_opt.available_aggregators()
    assert sorted(methods_run[0]["global"]) == sorted(names)
    wrong = []
    for name in names:
        ref, _, _ = worker.train(name, batch, distributed="off", torch_seed=100)
        for r in range(WORLD):
            err = (methods_run[r]["global"][name] - ref).abs().max().item()
            if not err < 1e-6:
                wrong.append(f"{name} (rank {r}: {err:.3g})")
    assert not wrong, f"differ from one process on the global batch: {', '.join(wrong)}"
    # Gramian weightings factored the widest layer over both ranks' gathered rows, as one
    # process does on the global batch; the layer that factors only over one shard took rows.
    for name in ("mgda", "nash_mtl", "came_grad", "pcgrad"):
        assert methods_run[0]["factored"][name] == 1, name
        assert worker.train(name, batch, steps=1)[2][0].factored_params == 1, name
        shard = worker.shard(batch, 0, WORLD)
        assert worker.train(name, shard, steps=1)[2][0].factored_params == 2, name


def test_local_mode_averages_the_ranks_own_directions(methods_run):
    """One step of the local mode = the mean of the one-process steps on each rank's shard, which
    is not the global step."""
    batch = worker.global_batch()
    for name in ("mgda", "nash_mtl"):
        per_shard = [
            worker.train(name, worker.shard(batch, r, WORLD), steps=1, torch_seed=100)[0]
            for r in range(WORLD)
        ]
        expected = torch.stack(per_shard).mean(0)
        glob = worker.train(name, batch, steps=1, torch_seed=100)[0]
        for r in range(WORLD):
            got = methods_run[r][f"local_{name}"]
            assert (got - expected).abs().max().item() < 1e-10, name
            assert (got - glob).abs().max().item() > 1e-4, f"{name}: local equals global here"


def test_local_mode_a_failure_on_one_rank_stops_every_rank(methods_run):
    """Rank 1's loss is NaN: rank 1 raises its own error, rank 0 one naming rank 1; no gradient
    is written on either, and the next collective pairs up (no rank is left behind)."""
    assert "non-finite loss" in methods_run[1]["local_nan"]
    assert "rank(s) [1] could not complete this step" in methods_run[0]["local_nan"]
    for r in range(WORLD):
        assert all(methods_run[r]["local_nan_grads"])
        assert methods_run[r]["after_local_nan"] == 0.5
    # global mode, features=: rank 1 fails before the Gramian's all-reduce
    assert "non-finite loss" in methods_run[1]["features_nan"]
    assert "another rank are not finite" in methods_run[0]["features_nan"]
    for r in range(WORLD):
        assert all(methods_run[r]["features_nan_grads"])
        assert methods_run[r]["after_features_nan"] == 0.5


def test_ranks_with_different_hyperparameters_all_refuse(methods_run):
    for r in range(WORLD):
        assert "every rank must use the same method and hyperparameters" in methods_run[r]["mismatch"]
        assert "kappa=2.0" in methods_run[r]["mismatch"]


def test_stateful_methods_keep_one_state_across_ranks(methods_run):
    for name in mtl_opt.available_aggregators():
        assert methods_run[0]["fingerprints"][name] == methods_run[1]["fingerprints"][name], name
        assert methods_run[0]["fingerprints"][name][1] is True, name  # check_same_state agreed
    # Without the global mode the states drift apart, and the check names the rank.
    for r in range(WORLD):
        assert "rank(s) [1] differs from rank 0's" in methods_run[r]["diverged_check"]


def test_ddp_wrapped_model(methods_run):
    """A DDP-wrapped model gives the one-process result, with or without no_sync, on the
    Jacobian path (mgda) and the one-backward path (ls); find_unused_parameters outside
    no_sync is refused with a clear error."""
    batch = worker.global_batch()
    for name in ("mgda", "ls"):
        ref = worker.train(name, batch)[0]
        for mode in ("sync", "no_sync"):
            for r in range(WORLD):
                got = methods_run[r][f"ddp_{mode}_{name}"]
                assert (got - ref).abs().max().item() < 1e-10, (name, mode, r)
    for r in range(WORLD):
        assert "no_sync()" in methods_run[r]["ddp_unused"]


def test_representation_level_global_mode_equals_one_process(methods_run):
    """features= in the global mode: weights from the global batch's representation Gramian
    (Σ_r Z^r Z^rᵀ / R², one all-reduce of K × K numbers), the encoder's gradients averaged:
    one process with features= on the concatenated batch, 3 steps, both ranks."""
    batch = worker.global_batch()
    for name in ("mgda", "nash_mtl", "came_grad"):
        ref = worker.train(name, batch, features=True)[0]
        local = [worker.train(name, worker.shard(batch, r, WORLD), features=True)[0] for r in range(WORLD)]
        for r in range(WORLD):
            got, _ = methods_run[r][f"features_{name}"]
            assert (got - ref).abs().max().item() < 1e-6, (name, r)
            assert (got - torch.stack(local).mean(0)).abs().max().item() > 1e-4, name
        # the ranks' states are equal bit for bit (they agree with one process to rounding)
        assert methods_run[0][f"features_{name}"][1] == methods_run[1][f"features_{name}"][1], name


def test_a_rank_that_raises_makes_the_other_fail_clearly(tmp_path):
    results = _run("rank1_raises", tmp_path, timeout=90)
    assert "rank 1 fails on purpose" in results[1]["crashed"]
    error = results[0]["error"]
    assert error is not None and error.startswith("rank 0: the all-reduce of the task losses failed")
    assert "another rank failed, was killed or did not reach this step" in error


def test_a_rank_that_never_arrives_times_out(tmp_path):
    """Rank 1 sleeps past the group's 3 s timeout: rank 0 fails with the clear error instead of
    waiting (the sleeping rank is then killed by the harness's hard timeout or exits)."""
    port = _free_port()
    outs = [tmp_path / f"hang-{r}.pt" for r in range(WORLD)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "rank1_hangs", str(r), str(WORLD), str(port), str(outs[r])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(WORLD)
    ]
    try:
        log = procs[0].communicate(timeout=90)[0]
    except subprocess.TimeoutExpired:
        pytest.fail("rank 0 hung although the process group's timeout is 3 s")
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert outs[0].exists(), log[-3000:]
    res = torch.load(outs[0], weights_only=True)
    assert "crashed" not in res, res.get("crashed")
    assert res["error"] is not None and "did not reach this step" in res["error"]


def test_outside_a_process_group_the_modes_agree_and_are_checked():
    batch = worker.global_batch()
    a = worker.train("cagrad", batch, steps=1, distributed="global")[0]
    b = worker.train("cagrad", batch, steps=1, distributed="off")[0]
    assert torch.equal(a, b)
    model = worker.ThreeTaskNet()
    with pytest.raises(ValueError, match="distributed must be one of"):
        mtl_opt.mtl_backward(worker.task_losses(model, batch), model.trunk,
                             mtl_opt.get_aggregator("mgda"), distributed="global_batch")
    with pytest.raises(ValueError, match="distributed must be one of"):
        mtl_opt.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   mtl_opt.get_aggregator("mgda"), model.trunk, distributed=None)
    # the fingerprint sees every tensor of the state
    agg = mtl_opt.get_aggregator("pcgrad", seed=0)
    first = mdist.state_fingerprint(agg)
    agg(torch.randn(3, 5))
    assert mdist.state_fingerprint(agg) != first
    agg.reset()
    assert mdist.state_fingerprint(agg) == first


def test_the_torchrun_example_keeps_the_ranks_identical():
    """`torchrun --nproc_per_node 2 -m mtl_opt.experiments.distributed_example` (as
    `python -m torch.distributed.run`, with this interpreter), one short epoch."""
    port = _free_port()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "mtl_opt.experiments.distributed_example", "--method", "nash_mtl",
             "--epochs", "1", "--samples", "256", "--timeout", "60"],
            capture_output=True, text=True, timeout=180,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the torchrun example did not finish within 180 s")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "identical on all 2 ranks" in done.stdout, done.stdout
    assert "epoch 1: losses" in done.stdout
