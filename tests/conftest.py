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
    # setenv records the value before it (or its absence) for pytest to restore afterwards;
    # delenv of a missing variable would record nothing.
    before = os.environ.get("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_AUTH_MODE", before if before is not None else "disabled")
    if before is None:
        monkeypatch.delenv("RAY_AUTH_MODE")
