"""An interrupted sweep (Ctrl+C or SIGTERM) exits non-zero, says how to resume, and leaves no
process of its embedded Ray behind. Real sweeps in subprocesses on an embedded 2-CPU Ray."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")


def _processes_of(ray_tmp: str) -> list[int]:
    """PIDs of live processes started for the Ray instance whose temp folder is ``ray_tmp``
    (raylet, GCS, agents, workers: all of them name it in their command line or environment)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if ray_tmp.encode() in text and state != "Z":
            pids.append(int(entry.name))
    return pids


def _started_trials(out: Path) -> bool:
    return any(p.stat().st_size > 0 for p in (out / "ray").glob("sweep/*/result.json"))


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc to find Ray's processes")
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_sweep_exits_nonzero_and_tears_down_its_ray(tmp_path, sig, code):
    ray_tmp = tempfile.mkdtemp(prefix="mtlray")  # short: Ray's socket paths must stay < 108 chars
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "mtl_opt.cli", "sweep", "--problem", "toy",
           "--space", "kappa=grid:1,1.5,2,3", "--steps", "200000", "--record-every", "100",
           "--num-cpus", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not _started_trials(out):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no trial reported within 240 s"
            time.sleep(0.5)
        assert _processes_of(ray_tmp), "the sweep's Ray processes were not found"
        proc.send_signal(sig)
        printed, _ = proc.communicate(timeout=180)
        assert proc.returncode == code, printed
        assert f"--resume {out}" in printed, printed
        deadline = time.monotonic() + 60
        while _processes_of(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _processes_of(ray_tmp) == [], f"Ray processes outlived the sweep: {_processes_of(ray_tmp)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _processes_of(ray_tmp):  # only this test's own Ray, by its temp folder
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
