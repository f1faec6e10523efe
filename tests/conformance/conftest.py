"""The conformance suite runs every test against every transport: one fresh system per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import RABBITMQ_HOST, require_server, unique

TRANSPORTS = ["memory", "sqlite", "rabbitmq"]
#: The transports whose systems span OS processes (memory:// lives in one process by definition).
DURABLE_TRANSPORTS = ["sqlite", "rabbitmq"]


def make_url(kind: str, tmp_path: Path) -> str:
    if kind == "memory":
        return f"memory://{unique()}"
    if kind == "sqlite":
        # A short visibility timeout, so that the kill -9 tests do not wait long.
        return f"sqlite:///{tmp_path / 'bus.db'}?visibility_timeout=2"
    require_server("RabbitMQ", RABBITMQ_HOST)
    return f"amqp://guest:guest@127.0.0.1:5672/?namespace={unique('ns')}"


@pytest.fixture(params=TRANSPORTS)
def transport_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL naming a fresh, empty system on each transport."""
    return make_url(request.param, tmp_path)


@pytest.fixture(params=DURABLE_TRANSPORTS)
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL naming a fresh system that several OS processes can share."""
    return make_url(request.param, tmp_path)
