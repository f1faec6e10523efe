"""Every recoverability test runs on memory, SQLite and RabbitMQ: one fresh system per test.

RabbitMQ tests skip when the broker does not answer (and fail when `CI` is set).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.conftest import DURABLE_TRANSPORTS, TRANSPORTS, system_url, unique
from tests.recoverability.raw import RawInjector, raw_injector
from tidings import Bus, RetryPolicy


def make_url(kind: str, tmp_path: Path) -> str:
    # A short visibility timeout: the poison tests wait for it once per crash.
    return system_url(kind, tmp_path, visibility_timeout=1)


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
