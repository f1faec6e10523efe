"""Retry policy and handler intent (the issue's points 1 and 3), on every transport."""

from __future__ import annotations

from collections.abc import Callable

from tests.helpers import eventually, running
from tests.recoverability.app import Job, Other
from tidings import Bus, Context, DeadLetters, Reject, Retry, RetryPolicy


async def test_immediate_then_delayed_retries_then_the_error_queue(make_bus: Callable[..., Bus]) -> None:
    bus = make_bus(retry=RetryPolicy(immediate=2, delays=(0.05, 0.1), jitter=0.0))
    attempts: list[int] = []

    @bus.handle(Job)
    async def always_fails(job: Job, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        raise ValueError(f"cannot do job {job.n}")

    async with running(bus):
        await bus.send(Job(n=1))
        await eventually(lambda: bus.stats.dead_lettered == 1)
        [failed] = await DeadLetters(bus.transport, bus.service).list()

    # 3 rounds (the first delivery and 2 delayed retries) of 3 calls (1 + 2 immediate retries).
    assert attempts == list(range(1, 10))
    assert bus.stats.retries_scheduled == 2
    assert failed.fault.reason == "handler-failed"
    assert failed.fault.attempts == 9
    assert failed.fault.exception_type == "builtins.ValueError"
    assert failed.fault.message == "cannot do job 1"


async def test_a_handler_that_recovers_on_a_later_round_is_acked(make_bus: Callable[..., Bus]) -> None:
    bus = make_bus(retry=RetryPolicy(immediate=1, delays=(0.05, 0.05), jitter=0.0))
    attempts: list[int] = []

    @bus.handle(Job)
    async def flaky(job: Job, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 4:
            raise ConnectionResetError("the warehouse hung up")

    async with running(bus):
        await bus.send(Job(n=1))
        await eventually(lambda: bus.stats.handled == 1)
        assert await DeadLetters(bus.transport, bus.service).list() == []
    assert attempts == [1, 2, 3, 4]  # round 1: 1, 2; round 2: 3, 4 (succeeds)


async def test_exceptions_of_never_retry_types_go_to_the_error_queue_at_once(
    make_bus: Callable[..., Bus],
) -> None:
    bus = make_bus(retry=RetryPolicy(immediate=3, delays=(0.05,), never_retry=(LookupError,)))
    calls = 0

    @bus.handle(Job)
    async def missing(job: Job, ctx: Context) -> None:
        nonlocal calls
        calls += 1
        raise KeyError("no such customer")  # a LookupError: subclasses count too

    async with running(bus):
        await bus.send(Job(n=1))
        await eventually(lambda: bus.stats.dead_lettered == 1)
        [failed] = await DeadLetters(bus.transport, bus.service).list()
    assert calls == 1
    assert bus.stats.retries_scheduled == 0
    assert (failed.fault.reason, failed.fault.attempts) == ("not-retryable", 1)
    assert failed.fault.exception_type == "builtins.KeyError"


async def test_a_handler_policy_overrides_the_bus_default(make_bus: Callable[..., Bus]) -> None:
    bus = make_bus(retry=RetryPolicy(immediate=4, delays=(), jitter=0.0))
    calls = {"default": 0, "override": 0}

    @bus.handle(Job)
    async def with_bus_default(job: Job, ctx: Context) -> None:
        calls["default"] += 1
        raise ValueError("no")

    @bus.handle(Other, retry=RetryPolicy.none())
    async def with_its_own(other: Other, ctx: Context) -> None:
        calls["override"] += 1
        raise ValueError("no")

    async with running(bus):
        await bus.send(Job(n=1))
        await bus.send(Other(n=1))
        await eventually(lambda: bus.stats.dead_lettered == 2)
        failed = await DeadLetters(bus.transport, bus.service).list()
    assert calls == {"default": 5, "override": 1}
    assert sorted(f.fault.attempts for f in failed) == [1, 5]


async def test_a_message_waiting_for_its_delayed_retry_does_not_hold_up_the_others(
    make_bus: Callable[..., Bus],
) -> None:
    # One handler at a time: if the waiting message blocked its consumer, nothing else could run.
    # Its retry is an hour away, so it cannot have come round again before the others are done.
    bus = make_bus(concurrency=1, retry=RetryPolicy(immediate=0, delays=(3600.0,), jitter=0.0))
    handled: list[int] = []
    bad_calls = 0

    @bus.handle(Job)
    async def handle(job: Job, ctx: Context) -> None:
        nonlocal bad_calls
        if job.n == 0:
            bad_calls += 1
            raise ValueError("the bad one")
        handled.append(job.n)

    async with running(bus):
        await bus.send(Job(n=0))
        for n in range(1, 51):
            await bus.send(Job(n=n))
        await eventually(lambda: len(handled) == 50)
        assert await DeadLetters(bus.transport, bus.service).list() == []
    assert sorted(handled) == list(range(1, 51))
    assert bad_calls == 1
    assert bus.stats.retries_scheduled == 1


async def test_a_delayed_retry_survives_a_restart_of_the_consumer(transport_url: str, service: str) -> None:
    first = Bus(service, transport_url, retry=RetryPolicy(immediate=0, delays=(0.5,), jitter=0.0))
    seen: list[tuple[str, int, str]] = []

    @first.handle(Job)
    async def fails(job: Job, ctx: Context) -> None:
        seen.append(("first", ctx.attempt, ctx.message_id))
        raise ValueError("try me later")

    async with running(first):
        await first.send(Job(n=7))
        await eventually(lambda: first.stats.retries_scheduled == 1)
    # The first consumer is gone (closed, its transport object with it); the retry is the
    # transport's to keep. A second consumer, made from the URL alone, gets it.
    second = Bus(service, transport_url, retry=RetryPolicy(immediate=0, delays=(0.5,), jitter=0.0))

    @second.handle(Job)
    async def succeeds(job: Job, ctx: Context) -> None:
        seen.append(("second", ctx.attempt, ctx.message_id))

    async with running(second):
        await eventually(lambda: second.stats.handled == 1)
    assert [(who, attempt) for who, attempt, _ in seen] == [("first", 1), ("second", 2)]
    assert seen[0][2] == seen[1][2]  # the same message


async def test_retry_intent_tries_again_later_without_counting_a_failure(
    make_bus: Callable[..., Bus],
) -> None:
    # No retries at all in the policy: only the intent can bring the message back.
    bus = make_bus(retry=RetryPolicy.none())
    calls = 0

    @bus.handle(Job)
    async def not_yet(job: Job, ctx: Context) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise Retry(delay=0.05, reason="the stock count is not in yet")

    async with running(bus):
        await bus.send(Job(n=1))
        await eventually(lambda: bus.stats.handled == 1)
        assert await DeadLetters(bus.transport, bus.service).list() == []
    assert calls == 3
    assert bus.stats.failed_attempts == 0
    assert bus.stats.retries_scheduled == 2


async def test_reject_intent_goes_straight_to_the_error_queue_with_its_reason(
    make_bus: Callable[..., Bus],
) -> None:
    bus = make_bus(retry=RetryPolicy(immediate=5, delays=(0.05, 0.05)))
    calls = 0

    @bus.handle(Job)
    async def refuse(job: Job, ctx: Context) -> None:
        nonlocal calls
        calls += 1
        raise Reject("job 1 belongs to a closed account")

    async with running(bus):
        await bus.send(Job(n=1))
        await eventually(lambda: bus.stats.dead_lettered == 1)
        [failed] = await DeadLetters(bus.transport, bus.service).list()
    assert calls == 1
    assert bus.stats.retries_scheduled == 0
    assert failed.fault.reason == "rejected"
    assert failed.fault.message == "job 1 belongs to a closed account"
    assert failed.fault.attempts == 1
