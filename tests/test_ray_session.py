"""Checks made before Ray is asked for anything: reachability and resources."""

import os
import socket
import time

import pytest

from mtl_opt.experiments.ray_session import check_trial_resources, probe_address


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_fails_fast_with_a_message():
    address = f"127.0.0.1:{_free_port()}"
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"no Ray cluster reachable at '{address}'"):
        probe_address(address, timeout=2.0)
    assert time.perf_counter() - start < 3.0


def test_reachable_address_passes():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        probe_address(f"ray://127.0.0.1:{server.getsockname()[1]}", timeout=2.0)


@pytest.mark.parametrize("address", ["localhost", "10.0.0.1:port", ":6379"])
def test_malformed_address(address):
    with pytest.raises(ValueError, match="HOST:PORT"):
        probe_address(address)


def test_sweep_on_an_unreachable_address_fails_before_starting_ray():
    from mtl_opt.experiments import sweep

    address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(ConnectionError, match="no Ray cluster reachable"):
        sweep("toy", "came_grad", ["kappa=grid:1,2"], steps=2, address=address, probe_timeout=1.0,
              verbose=False)


def test_gpu_request_on_a_cluster_without_gpus_fails_with_a_message():
    with pytest.raises(ValueError, match="has no GPU"):
        check_trial_resources({"CPU": 2.0}, 1, 0.25)
    with pytest.raises(ValueError, match="2 GPUs but the Ray cluster has only 1"):
        check_trial_resources({"CPU": 2.0, "GPU": 1.0}, 1, 2)
    with pytest.raises(ValueError, match="4 CPUs but the Ray cluster has only 2"):
        check_trial_resources({"CPU": 2.0}, 4, 0)
    check_trial_resources({"CPU": 16.0, "GPU": 1.0}, 1, 0.25)  # four trials share one GPU


def test_nonpositive_cpu_request_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        check_trial_resources({"CPU": 2.0}, 0, 0)


def test_joining_a_cluster_presents_an_available_token(monkeypatch, tmp_path):
    """`ray start --head` enables token authentication (Ray >= 2.59); a driver joins it at an
    explicit address only with RAY_AUTH_MODE=token, set before Ray is imported."""
    from mtl_opt.experiments.ray_session import prepare_cluster_auth, ray_token_available

    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    assert not ray_token_available()
    prepare_cluster_auth("127.0.0.1:6379")
    assert "RAY_AUTH_MODE" not in os.environ  # no token: nothing to present

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 64)
    assert ray_token_available()
    prepare_cluster_auth(None)  # an embedded local Ray: untouched
    assert "RAY_AUTH_MODE" not in os.environ
    prepare_cluster_auth("local")
    assert "RAY_AUTH_MODE" not in os.environ
    prepare_cluster_auth("127.0.0.1:6379")
    assert os.environ["RAY_AUTH_MODE"] == "token"

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's choice wins
    prepare_cluster_auth("127.0.0.1:6379")
    assert os.environ["RAY_AUTH_MODE"] == "disabled"

    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # the address may come from RAY_ADDRESS
    (tmp_path / ".ray" / "auth_token").unlink()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    prepare_cluster_auth(None)
    assert os.environ["RAY_AUTH_MODE"] == "token"
