"""Checks made before Ray is asked for anything: reachability and resources."""

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
