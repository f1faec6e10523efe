"""Shared fixtures: real servers when they answer, a clear skip when not (a failure under CI)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

CI = bool(os.environ.get("CI"))

# `TIDINGS_TEST_RABBITMQ=host:port` points the tests at another broker than 127.0.0.1:5672.
_host, _, _port = os.environ.get("TIDINGS_TEST_RABBITMQ", "").rpartition(":")
RABBITMQ_HOST = (_host, int(_port)) if _host else ("127.0.0.1", 5672)
#: Every transport, and those whose systems span OS processes (memory:// lives in one process).
TRANSPORTS = ["memory", "sqlite", "rabbitmq"]
DURABLE_TRANSPORTS = ["sqlite", "rabbitmq"]
POSTGRES_HOST = ("127.0.0.1", 5432)


def answers(host: tuple[str, int]) -> bool:
    """Whether something accepts TCP connections there."""
    try:
        with socket.create_connection(host, timeout=1):
            return True
    except OSError:
        return False


def require_server(name: str, host: tuple[str, int]) -> None:
    """Skip the test when the server does not answer; under CI, fail it instead."""
    if answers(host):
        return
    reason = f"{name} does not answer on {host[0]}:{host[1]}"
    if CI:
        pytest.fail(f"{reason} (CI is set: the server must be running)")
    pytest.skip(reason)


def unique(prefix: str = "t") -> str:
    """A name no other test (or test run) uses."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def system_url(kind: str, tmp_path: Path, *, visibility_timeout: float | None = None) -> str:
    """A URL naming a fresh, empty system on transport `kind` (memory, sqlite or rabbitmq).

    RabbitMQ systems get a namespace of their own; the test skips when the broker does not
    answer (and fails under CI). `visibility_timeout` shortens SQLite's, for kill -9 tests.
    """
    if kind == "memory":
        return f"memory://{unique()}"
    if kind == "sqlite":
        query = f"?visibility_timeout={visibility_timeout}" if visibility_timeout else ""
        return f"sqlite:///{tmp_path / 'bus.db'}{query}"
    if kind == "rabbitmq":
        require_server("RabbitMQ", RABBITMQ_HOST)
        host, port = RABBITMQ_HOST
        return f"amqp://guest:guest@{host}:{port}/?namespace={unique('ns')}"
    raise ValueError(f"no transport kind {kind!r}")


@pytest.fixture
def rabbitmq_url() -> str:
    """A RabbitMQ URL with a namespace of its own, so tests never see each other's exchanges."""
    return system_url("rabbitmq", Path())


@pytest.fixture
def postgres_url() -> str:
    """The local PostgreSQL test database, for SQLAlchemy with asyncpg."""
    require_server("PostgreSQL", POSTGRES_HOST)
    return "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def name() -> Callable[[str], str]:
    """Unique service names, so RabbitMQ queues of different tests never meet."""
    suffix = unique("-")

    def make(service: str) -> str:
        return service + suffix

    return make
