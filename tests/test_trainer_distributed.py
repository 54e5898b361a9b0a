"""The trainer under torchrun: 2 gloo processes on 127.0.0.1 (``python -m torch.distributed.run``,
with this interpreter), a hard timeout on each launch, a tiny Multi-MNIST (float32).

A 2-rank run shards each global batch over the ranks; with the global mode it must end with the
parameters of one process on the same global batches, and leave exactly one run folder.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mtl_opt.experiments.trainer import TrainConfig, load_run_checkpoint, rank_shard, train

# 37 pairs in global batches of 16: 16, 16, 5 per epoch; the last batch splits 3 + 2 (uneven).
TINY = "multimnist:n_train=37,n_val=8,n_test=8"
COMMON = ["--batch-size", "16", "--log-every", "1", "--quiet"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args[:4])} under torchrun did not finish within {timeout} s (a hang)")


def _rows(path: Path, prefix: tuple[str, ...]) -> list[dict[str, float]]:
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in r.items() if k.startswith(prefix) and v != ""} for r in csv.DictReader(f)]


def _assert_same_run(one: Path, two: Path, steps: int) -> None:
    a, b = load_run_checkpoint(one / "checkpoint.pt"), load_run_checkpoint(two / "checkpoint.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == steps
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-5, rtol=1e-5, msg=k)
    ra, rb = _rows(one / "steps.csv", ("loss_", "cos")), _rows(two / "steps.csv", ("loss_", "cos"))
    assert len(ra) == len(rb) == steps
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-5), k


def test_rank_shards_cover_the_global_batch_and_scale_to_its_mean_loss():
    batch = list(range(5))
    shards = [rank_shard(batch, r, 2) for r in range(2)]
    assert [s for s, _ in shards] == [[0, 1], [2, 3, 4]]
    # (1/R) Σ_r c_r mean_r = the mean over the 5 samples
    losses = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64)
    avg = sum(c * losses[s].mean() for s, c in shards) / 2
    assert float(avg) == pytest.approx(float(losses.mean()), rel=1e-15)
    assert rank_shard(list(range(4)), 1, 2) == ([2, 3], 1.0)
    # one sample for two ranks: rank 0's share is empty, it takes the sample and counts nothing
    assert [rank_shard([7], r, 2) for r in range(2)] == [([7], 0.0), ([7], 2.0)]


@pytest.mark.parametrize("method", ["nash_mtl", "came_grad"])
def test_two_ranks_train_like_one_process_on_the_global_batch_into_one_folder(method, tmp_path):
    (tmp_path / "two").mkdir()
    done = _torchrun(["-m", "mtl_opt.cli", "train", "--workload", TINY, "--method", method,
                      "--steps", "4", *COMMON], cwd=tmp_path / "two")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folders = list((tmp_path / "two" / "runs").iterdir())
    assert len(folders) == 1, folders  # rank 0 alone claims the (default, unique) run folder
    assert (folders[0] / "result.json").is_file()
    train(TrainConfig(workload=TINY, method=method, steps=4, batch_size=16, log_every=1,
                      out=str(tmp_path / "one")))
    _assert_same_run(tmp_path / "one", folders[0], steps=4)


WORKER = """
    import sys
    from mtl_opt.experiments.trainer import TrainConfig, train

    def stop_at_3(step, row):
        if step == 3:
            raise RuntimeError("interrupted at step 3")

    train(TrainConfig(workload={tiny!r}, method="ls", steps=5, batch_size=16, log_every=1,
                      eval_every=2, out=sys.argv[1]), callback=stop_at_3)
"""


def test_an_interrupted_two_rank_run_resumes_from_rank_0s_checkpoint(tmp_path):
    """Linear scalarization: its conflict diagnostics are the global batch's (the task blocks are
    averaged over the ranks), so steps.csv equals one process's too."""
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent(WORKER.format(tiny=TINY)))
    cut = tmp_path / "cut"
    done = _torchrun([str(script), str(cut)], cwd=tmp_path)
    assert done.returncode != 0 and "interrupted at step 3" in done.stdout + done.stderr
    assert load_run_checkpoint(cut / "checkpoint.pt")["train_state"]["step"] == 2
    done = _torchrun(["-m", "mtl_opt.cli", "train", "--resume", str(cut), "--quiet"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    train(TrainConfig(workload=TINY, method="ls", steps=5, batch_size=16, log_every=1, eval_every=2,
                      out=str(tmp_path / "one")))
    _assert_same_run(tmp_path / "one", cut, steps=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "interrupted.py", "one"]


def test_distributed_off_with_two_ranks_is_refused_naming_the_mode(tmp_path):
    done = _torchrun(["-m", "mtl_opt.cli", "train", "--workload", TINY, "--method", "ls", "--steps", "1",
                      "--distributed", "off", *COMMON], cwd=tmp_path)
    assert done.returncode != 0
    assert "distributed='off' under a process group of 2 ranks" in done.stdout + done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
