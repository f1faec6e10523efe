"""A fresh system on each transport, for the request/reply and scheduling tests."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.conftest import RABBITMQ_HOST, require_server, unique

TRANSPORTS = ["memory", "sqlite", "rabbitmq"]
# `TIDINGS_TEST_RABBITMQ=host:port` points the tests at another broker than 127.0.0.1:5672.
_host, _, _port = os.environ.get("TIDINGS_TEST_RABBITMQ", "").rpartition(":")
RABBITMQ = (_host, int(_port)) if _host else RABBITMQ_HOST


def fresh_url(kind: str, tmp_path: Path) -> str:
    """A URL naming a fresh, empty system on transport `kind`.

    Skips while that transport's module does not exist yet, and when RabbitMQ does not answer
    (under CI a missing server fails the test instead).
    """
    if kind == "memory":
        return f"memory://{unique()}"
    if importlib.util.find_spec(f"tidings.transports.{kind}") is None:
        pytest.skip(f"tidings.transports.{kind} does not exist yet")
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'bus.db'}"
    require_server("RabbitMQ", RABBITMQ)
    return f"amqp://guest:guest@{RABBITMQ[0]}:{RABBITMQ[1]}/?namespace={unique('ns')}"
