"""Suite-wide fixtures."""

import os

import pytest


@pytest.fixture(autouse=True)
def _ray_auth_mode_does_not_leak(monkeypatch):
    """Keep ``RAY_AUTH_MODE`` as it was before each test.

    A sweep given a cluster address sets ``RAY_AUTH_MODE=token`` for its process when a token is
    available (``~/.ray/auth_token`` exists once any Ray head has run on the machine). In the
    test process that setting would outlive the test, and every Ray started locally afterwards
    would run its GCS server in token mode while the already-imported driver is not: "Failed to
    start GCS ... InvalidAuthToken". Recording the variable here makes pytest restore it.
    """
    if "RAY_AUTH_MODE" in os.environ:
        monkeypatch.setenv("RAY_AUTH_MODE", os.environ["RAY_AUTH_MODE"])
    else:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
