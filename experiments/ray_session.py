"""Starting, checking and stopping the Ray instance a sweep runs on.

* No address: an embedded local Ray on this machine (all its cores unless ``num_cpus`` says
  otherwise), no dashboard, started in a few seconds and shut down when the sweep ends.
* ``address`` (or the ``RAY_ADDRESS`` environment variable): an existing cluster. The address is
  probed with a plain TCP connection and a timeout first, because ``ray.init`` on an unreachable
  address waits indefinitely.
* A Ray instance already running in this process (a notebook, a test fixture) is reused as is and
  left running.
* An embedded instance is shut down when the ``with`` block ends, normally or by an exception,
  Ctrl+C (``KeyboardInterrupt``) or SIGTERM (turned into a ``KeyboardInterrupt`` while the
  block runs), so its raylet, GCS and agent processes do not outlive the sweep.

Before trials are submitted, :func:`check_trial_resources` compares what one trial asks for with
what the cluster has: Ray would otherwise leave a trial that asks for a GPU the cluster lacks
pending forever.

Ray is imported only inside these functions (importing it costs about a second and a few hundred
megabytes).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RaySession",
    "check_trial_resources",
    "probe_address",
    "quiet_ray_environment",
    "ray_session",
]

# Environment defaults that make Ray quiet (and patient at start-up) without hiding trial errors: the legacy reporter honours
# ``verbose=0``, no usage-stats prompt, no metrics exporter, no deduplication of error lines.
_QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Ray waits 30 s for its GCS server to publish its port. The first start on a fresh machine
    # (cold page cache for the server binary, two busy cores) has been measured to exceed that and
    # fail with "Timed out waiting for file .../gcs_server_port"; 120 s is Ray's own default for its
    # slower storage backend.
    "RAY_gcs_server_port_wait_time_s": "120",
}


def quiet_ray_environment() -> None:
    """Set the quiet-Ray environment defaults (never overriding what the user set)."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)


def _split_host_port(address: str) -> tuple[str, int]:
    text = address.strip()
    for prefix in ("ray://", "http://", "https://"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(
            f"cannot read Ray address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379) "
            "or ray://HOST:PORT"
        )
    return host.strip("[]"), int(port)


def probe_address(address: str, timeout: float = 5.0) -> None:
    """Raise :class:`ConnectionError` unless something accepts TCP connections at ``address``.

    ``address`` is ``HOST:PORT`` or ``ray://HOST:PORT``. This is a reachability check, done because
    ``ray.init`` on an unreachable address does not return.
    """
    host, port = _split_host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:  # refused, unreachable, timed out, unknown host
        raise ConnectionError(
            f"no Ray cluster reachable at {address!r} ({type(exc).__name__}: {exc}; "
            f"waited up to {timeout:g} s). Start one with `ray start --head`, fix --address / "
            "RAY_ADDRESS, or leave the address out to run on an embedded local Ray."
        ) from None


def check_trial_resources(
    cluster: dict[str, float], cpus_per_trial: float, gpus_per_trial: float
) -> None:
    """Raise :class:`ValueError` when one trial asks for more than the whole cluster has."""
    if not (cpus_per_trial > 0):
        raise ValueError(f"--cpus-per-trial must be positive, got {cpus_per_trial}")
    if gpus_per_trial < 0:
        raise ValueError(f"--gpus-per-trial must be >= 0, got {gpus_per_trial}")
    have_cpu = float(cluster.get("CPU", 0.0))
    have_gpu = float(cluster.get("GPU", 0.0))
    if gpus_per_trial > 0 and have_gpu == 0:
        raise ValueError(
            f"each trial asks for {gpus_per_trial:g} GPU but the Ray cluster has no GPU; "
            "set --gpus-per-trial 0 or connect to a cluster with GPUs (--address)"
        )
    if gpus_per_trial > have_gpu:
        raise ValueError(
            f"each trial asks for {gpus_per_trial:g} GPUs but the Ray cluster has only "
            f"{have_gpu:g}; trials would wait forever"
        )
    if cpus_per_trial > have_cpu:
        raise ValueError(
            f"each trial asks for {cpus_per_trial:g} CPUs but the Ray cluster has only "
            f"{have_cpu:g}; trials would wait forever"
        )


def ray_token_available() -> bool:
    """Whether this process can present a Ray authentication token: ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, or the default token file ``~/.ray/auth_token`` that ``ray start``
    writes on the head (copy it to other machines, or print it with ``ray get-auth-token``)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return True
    return (Path.home() / ".ray" / "auth_token").is_file()


def prepare_cluster_auth(address: str | None) -> None:
    """Before Ray is imported: present the token when joining an existing cluster.

    Since Ray 2.59 ``ray start --head`` enables token authentication, and a driver joins such a
    cluster at an explicit address only with ``RAY_AUTH_MODE=token`` set before ``import ray``
    (Ray reads it at import). A token-mode driver also joins clusters without authentication, so
    when ``address`` names a cluster, a token is available and the user has not set
    ``RAY_AUTH_MODE``, it is set to ``token`` for this process.
    """
    address = address if address is not None else (os.environ.get("RAY_ADDRESS") or None)
    if address is None or address.strip().lower() in ("", "local"):
        return
    if "RAY_AUTH_MODE" not in os.environ and ray_token_available():
        os.environ["RAY_AUTH_MODE"] = "token"


@dataclass(frozen=True)
class RaySession:
    """What :func:`ray_session` connected to."""

    address: str | None  # None: embedded local instance
    started_here: bool
    resources: dict[str, float]


@contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    probe_timeout: float = 5.0,
) -> Iterator[RaySession]:
    """Connect to (or start) Ray for the duration of a ``with`` block.

    ``address=None`` falls back to ``RAY_ADDRESS`` and then to an embedded local instance.
    ``num_cpus``/``num_gpus`` size the embedded instance only.
    """
    quiet_ray_environment()
    prepare_cluster_auth(address)  # effective only if Ray is not imported yet
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
    if address is not None and address.strip().lower() in ("local", ""):
        address = None
    if address is not None and address.strip().lower() != "auto":
        probe_address(address, timeout=probe_timeout)

    import ray

    started_here = False
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                      configure_logging=True)
        if address is None:
            saved = os.environ.pop("RAY_ADDRESS", None)  # an empty one would confuse ray.init
            try:
                ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
            finally:
                if saved is not None:
                    os.environ["RAY_ADDRESS"] = saved
        else:
            if num_cpus is not None or num_gpus is not None:
                raise ValueError("num_cpus/num_gpus size an embedded Ray only; a cluster has its own")
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as exc:
                raise ConnectionError(
                    f"could not join the Ray cluster at {address!r}: {exc}. If the cluster uses "
                    "token authentication (the default of `ray start` since Ray 2.59), make its "
                    "token available here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or "
                    "~/.ray/auth_token; `ray get-auth-token` on the head prints it) and set "
                    "RAY_AUTH_MODE=token before Ray is imported (mtl-opt sweep does this itself)."
                ) from None
        started_here = True
    previous = _raise_on_terminate() if started_here else None
    try:
        yield RaySession(address, started_here, dict(ray.cluster_resources()))
    finally:
        if started_here:
            ray.shutdown()  # stops the raylet, the GCS and their agents
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def _raise_on_terminate() -> object | None:
    """While an embedded Ray runs: SIGTERM raises :class:`KeyboardInterrupt` in the main thread,
    so the ``with`` block unwinds and Ray is shut down instead of outliving its driver (Python's
    default on SIGTERM is to exit without running ``finally`` blocks). Returns the handler to
    restore (``None`` off the main thread, where signals cannot be handled)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, _terminate)
    return signal.SIG_DFL if previous is None else previous
