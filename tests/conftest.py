"""Shared fixtures: real servers when they answer, a clear skip when not (a failure under CI)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable

import pytest

CI = bool(os.environ.get("CI"))

RABBITMQ_HOST = ("127.0.0.1", 5672)
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


@pytest.fixture
def rabbitmq_url() -> str:
    """A RabbitMQ URL with a namespace of its own, so tests never see each other's exchanges."""
    require_server("RabbitMQ", RABBITMQ_HOST)
    return f"amqp://guest:guest@127.0.0.1:5672/?namespace={unique('ns')}"


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
