"""With a database, a handler's own exceptions follow the retry policy; only the database's are outages.

A handler's `OSError` or `TimeoutError` (an HTTP call, a file) once passed for a database outage:
retried every second forever, `never_retry` ignored, never dead-lettered.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.helpers import eventually, running
from tests.storage.messages import Credit
from tidings import Bus, Context, DeadLetters, RetryPolicy

ERRORS = [OSError("connection refused by the payment API"), TimeoutError("the payment API timed out")]


def failing_bus(database: AsyncEngine, error: Exception, retry: RetryPolicy, calls: list[int]) -> Bus:
    bus = Bus("payments", transport=f"memory://{uuid.uuid4().hex}", database=database, retry=retry)

    @bus.handle(Credit)
    async def credit(command: Credit, ctx: Context) -> None:
        calls.append(ctx.attempt)
        raise error

    return bus


@pytest.mark.parametrize("error", ERRORS, ids=["OSError", "TimeoutError"])
async def test_a_handlers_own_os_or_timeout_error_is_retried_per_policy_then_dead_lettered(
    database: AsyncEngine, error: Exception
) -> None:
    calls: list[int] = []
    bus = failing_bus(database, error, RetryPolicy(immediate=1, delays=(0.05,)), calls)
    async with running(bus):
        await bus.send(Credit(account="a", seq=1))
        await eventually(lambda: bus.stats.dead_lettered == 1)
        [failed] = await DeadLetters(bus.transport, bus.service).list()
    assert calls == [1, 2, 3, 4]  # two rounds of two calls, then the error queue
    assert failed.fault.reason == "handler-failed"
    assert failed.fault.exception_type == f"builtins.{type(error).__name__}"
    assert bus.stats.unavailable == 0


@pytest.mark.parametrize("error", ERRORS, ids=["OSError", "TimeoutError"])
async def test_never_retry_applies_to_a_handlers_os_or_timeout_error(
    database: AsyncEngine, error: Exception
) -> None:
    calls: list[int] = []
    policy = RetryPolicy(immediate=3, delays=(1.0,), never_retry=(type(error),))
    bus = failing_bus(database, error, policy, calls)
    async with running(bus):
        await bus.send(Credit(account="a", seq=1))
        await eventually(lambda: bus.stats.dead_lettered == 1)
        [failed] = await DeadLetters(bus.transport, bus.service).list()
    assert calls == [1]
    assert failed.fault.reason == "not-retryable"
    assert bus.stats.unavailable == 0
