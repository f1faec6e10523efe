"""The conformance suite runs every test against every transport: one fresh system per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import system_url

#: Every transport the suite runs on, by `system_url` kind. A new transport joins with one entry here
#: (and its case in `system_url`); one that needs a server carries that server's marker, so that
#: `pytest -m "not rabbitmq"` runs the rest without it.
TRANSPORTS = ["memory", "sqlite", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]
#: Those whose systems span OS processes (a memory:// system lives in one process).
DURABLE_TRANSPORTS = ["sqlite", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]


def make_url(kind: str, tmp_path: Path) -> str:
    # A short visibility timeout, so that the kill -9 tests do not wait long.
    return system_url(kind, tmp_path, visibility_timeout=2)


@pytest.fixture(params=TRANSPORTS)
def transport_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL naming a fresh, empty system on each transport, with that transport's defaults.

    The default visibility timeout (SQLite's is 30 s) is longer than any test waits, so a message
    that comes back within a test was given back, not timed out.
    """
    return system_url(request.param, tmp_path)


@pytest.fixture(params=DURABLE_TRANSPORTS)
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL naming a fresh system that several OS processes can share."""
    return make_url(request.param, tmp_path)
