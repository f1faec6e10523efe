"""The conformance suite runs every test against every transport: one fresh system per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import DURABLE_TRANSPORTS, TRANSPORTS, system_url


def make_url(kind: str, tmp_path: Path) -> str:
    # A short visibility timeout, so that the kill -9 tests do not wait long.
    return system_url(kind, tmp_path, visibility_timeout=2)


@pytest.fixture(params=TRANSPORTS)
def transport_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL naming a fresh, empty system on each transport."""
    return make_url(request.param, tmp_path)


@pytest.fixture(params=DURABLE_TRANSPORTS)
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL naming a fresh system that several OS processes can share."""
    return make_url(request.param, tmp_path)
