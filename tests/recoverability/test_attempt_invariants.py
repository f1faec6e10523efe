"""Property: whatever the policy, a handler that always fails is called exactly as often as the
policy allows, with attempts numbered 1, 2, 3, ..., and the error queue says how many."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import unique
from tests.helpers import eventually, running
from tests.recoverability.app import Job
from tidings import Bus, Context, DeadLetters, RetryPolicy


async def _attempts_until_dead_lettered(policy: RetryPolicy) -> tuple[list[int], int]:
    bus = Bus(unique("rec-"), f"memory://{unique('rec')}", retry=policy)
    attempts: list[int] = []

    @bus.handle(Job)
    async def always_fails(job: Job, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise ValueError("no")

    async with running(bus):
        await bus.send(Job(n=1))
        await eventually(lambda: bus.stats.dead_lettered == 1)
        [failed] = await DeadLetters(bus.transport, bus.service).list()
    return attempts, failed.fault.attempts


@settings(max_examples=30, deadline=None)
@given(immediate=st.integers(min_value=0, max_value=4), delayed=st.integers(min_value=0, max_value=3))
def test_calls_and_attempt_numbers_follow_the_policy(immediate: int, delayed: int) -> None:
    policy = RetryPolicy(immediate=immediate, delays=(0.0,) * delayed, jitter=0.0)
    attempts, recorded = asyncio.run(_attempts_until_dead_lettered(policy))
    expected = (immediate + 1) * (delayed + 1)
    assert attempts == list(range(1, expected + 1))
    assert recorded == expected
