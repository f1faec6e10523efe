"""Every recoverability test runs on memory, SQLite and RabbitMQ: one fresh system per test.

RabbitMQ tests skip when the broker does not answer (and fail when `CI` is set). While a transport
module is still being written by others, its tests skip with that reason, except under CI.
`TIDINGS_TEST_RABBITMQ=host:port` points them at another broker than 127.0.0.1:5672.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.conftest import CI, RABBITMQ_HOST, require_server, unique
from tests.recoverability.raw import RawInjector, raw_injector
from tidings import Bus, RetryPolicy

TRANSPORTS = ["memory", "sqlite", "rabbitmq"]
_host, _, _port = os.environ.get("TIDINGS_TEST_RABBITMQ", "").rpartition(":")
RABBITMQ = (_host, int(_port)) if _host else RABBITMQ_HOST

#: Transports a system of several OS processes can share (memory:// lives in one process).
DURABLE_TRANSPORTS = ["sqlite", "rabbitmq"]


def _require_transport(kind: str) -> None:
    try:
        importlib.import_module(f"tidings.transports.{kind}")
    except ModuleNotFoundError as error:
        if error.name != f"tidings.transports.{kind}" or CI:
            raise
        pytest.skip(f"the {kind} transport is not written yet (tidings.transports.{kind})")


def make_url(kind: str, tmp_path: Path) -> str:
    if kind == "memory":
        return f"memory://{unique('rec')}"
    if kind == "sqlite":
        _require_transport("sqlite")
        # A short visibility timeout: the poison tests wait for it once per crash.
        return f"sqlite:///{tmp_path / 'bus.db'}?visibility_timeout=1"
    require_server("RabbitMQ", RABBITMQ)
    _require_transport("rabbitmq")
    return f"amqp://guest:guest@{RABBITMQ[0]}:{RABBITMQ[1]}/?namespace={unique('ns')}"


@pytest.fixture(params=TRANSPORTS)
def transport_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL naming a fresh, empty system on each transport."""
    return make_url(request.param, tmp_path)


@pytest.fixture(params=DURABLE_TRANSPORTS)
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL naming a fresh system that several OS processes can share."""
    return make_url(request.param, tmp_path)


@pytest.fixture
def service() -> str:
    """A service name no other test uses."""
    return unique("rec-")


#: Retries fast enough for tests, and without jitter so that the rounds are easy to count.
FAST = RetryPolicy(immediate=2, delays=(0.05, 0.05), jitter=0.0)


@pytest.fixture
def make_bus(transport_url: str, service: str) -> Callable[..., Bus]:
    """`make_bus(**options)`: a `Bus` for the test's service on the test's transport."""

    def make(**options: object) -> Bus:
        options.setdefault("retry", FAST)
        return Bus(service, transport_url, **options)  # type: ignore[arg-type]

    return make


@pytest.fixture
async def raw(transport_url: str) -> AsyncIterator[RawInjector]:
    """Puts hand-made headers and bodies straight onto a queue, below the `Envelope` layer."""
    async with raw_injector(transport_url) as injector:
        yield injector
