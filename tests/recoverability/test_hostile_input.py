"""Hostile input (the issue's point 5): error queue with a reason code, 0 handler calls, 0 retries,
and the consumer keeps running. On every transport."""

from __future__ import annotations

import asyncio
import builtins
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import eventually, running
from tests.recoverability.app import Job
from tests.recoverability.hostile import CANARY_MODULE, Hostile, hostile_messages
from tests.recoverability.raw import RawInjector
from tidings import Bus, Context, DeadLetters, RetryPolicy
from tidings.dead_letters import FailedMessage
from tidings.envelope import new_message_id


class Calls:
    """What must never happen while hostile messages are consumed."""

    def __init__(self) -> None:
        self.system: list[Any] = []
        self.eval: list[Any] = []


@pytest.fixture
def forbidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    """A canary module that is importable but must never be imported, and recorders on
    `os.system` and `eval`: a type header naming a Python path must reach none of them."""
    marker = tmp_path / "canary-imported"
    (tmp_path / f"{CANARY_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Job:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = Calls()
    real_eval = builtins.eval

    def recording_eval(*args: Any, **kwargs: Any) -> Any:
        calls.eval.append(args)
        return real_eval(*args, **kwargs)

    def recording_system(*args: Any) -> int:
        calls.system.append(args)
        return 0

    monkeypatch.setattr(os, "system", recording_system)
    monkeypatch.setattr(builtins, "eval", recording_eval)
    yield calls
    assert CANARY_MODULE not in sys.modules
    assert not marker.exists(), "a type header made tidings import a module"


async def _consume_hostile(
    bus: Bus, raw: RawInjector, hostile: list[Hostile]
) -> tuple[list[int], list[FailedMessage]]:
    handled: list[int] = []

    @bus.handle(Job)
    async def handle(job: Job, ctx: Context) -> None:
        handled.append(job.n)

    async with running(bus):
        await bus.send(Job(n=1))
        for message in hostile:
            await raw.put(bus.queue, message.headers, message.body)
        await bus.send(Job(n=2))  # the consumer is still running after all of them
        await eventually(lambda: len(handled) == 2 and bus.stats.dead_lettered == len(hostile))
        failed = await DeadLetters(bus.transport, bus.service).list(limit=1_000)
    return handled, failed


async def test_each_kind_of_hostile_message_is_dead_lettered_with_its_reason(
    make_bus: Callable[..., Bus], raw: RawInjector, forbidden: Calls
) -> None:
    bus = make_bus(retry=RetryPolicy(immediate=3, delays=(0.05,)))
    hostile = hostile_messages()

    handled, failed = await _consume_hostile(bus, raw, hostile)

    assert sorted(handled) == [1, 2]  # no handler call for any of the hostile ones
    dead = {f.headers["x-case"]: (f.fault.reason, f.fault.attempts) for f in failed}
    assert dead == {message.name: (message.reason, 0) for message in hostile}
    assert bus.stats.retries_scheduled == 0
    assert bus.stats.failed_attempts == 0
    assert forbidden.system == []
    assert not any("system" in repr(args) or CANARY_MODULE in repr(args) for args in forbidden.eval)


async def test_a_dead_lettered_hostile_message_keeps_its_headers_and_body(
    make_bus: Callable[..., Bus], raw: RawInjector
) -> None:
    bus = make_bus()
    [message] = [m for m in hostile_messages() if m.name == "not-utf8"]

    _, [failed] = await _consume_hostile(bus, raw, [message])

    assert failed.body == message.body
    assert {k: failed.headers.get(k) for k in message.headers} == message.headers
    assert failed.fault.message is not None  # what was wrong, for the operator
    assert failed.fault.exception_type is None  # no exception of a handler caused it


async def test_the_size_limit_is_configurable_and_checked_before_parsing(
    make_bus: Callable[..., Bus], raw: RawInjector
) -> None:
    bus = make_bus(max_body_size=1_000)
    padding = 1_000 - len(b'{"n": 1, "note": ""}')
    fits = b'{"n": 1, "note": "' + b"a" * padding + b'"}'
    assert len(fits) == 1_000
    # One byte over the limit, and not even UTF-8: refused for its size, so never parsed.
    too_big = b"\xff" * 1_001
    headers = {
        "id": new_message_id(),
        "source": "mallory",
        "type": "rec.job",
        "specversion": "1.0",
        "x-case": "too-big",
    }
    handled: list[int] = []

    @bus.handle(Job)
    async def handle(job: Job, ctx: Context) -> None:
        handled.append(len(job.note))

    async with running(bus):
        await raw.put(bus.queue, headers, too_big)
        await raw.put(bus.queue, {**headers, "id": new_message_id(), "x-case": "fits"}, fits)
        await eventually(lambda: handled != [] and bus.stats.dead_lettered == 1)
        [failed] = await DeadLetters(bus.transport, bus.service).list()
    assert handled == [padding]
    assert (failed.headers["x-case"], failed.fault.reason) == ("too-big", "too-large")


@pytest.mark.slow
async def test_a_corpus_of_hostile_messages_among_ten_thousand_good_ones(
    make_bus: Callable[..., Bus], raw: RawInjector
) -> None:
    goods = 10_000
    bus = make_bus(concurrency=64, prefetch=256)
    handled: set[int] = set()

    @bus.handle(Job)
    async def handle(job: Job, ctx: Context) -> None:
        handled.add(job.n)

    # Every 40th message is hostile, cycling through every kind: 250 of them.
    hostile: list[Hostile] = []
    kinds = len(hostile_messages())
    for cycle in range(-(-goods // 40 // kinds)):
        hostile.extend(hostile_messages(tag=f"-{cycle}"))
    hostile = hostile[: goods // 40]
    assert len(hostile) >= 200

    async def send_good(n: int) -> None:
        await bus.send(Job(n=n))

    async def send_hostile(message: Hostile) -> None:
        await raw.put(bus.queue, message.headers, message.body)

    async with running(bus):
        batch: list[Any] = []
        for n in range(goods):
            batch.append(send_good(n))
            if n % 40 == 39:
                batch.append(send_hostile(hostile[n // 40]))
            if len(batch) >= 200:  # sends run concurrently, in batches, so that they are quick
                await asyncio.gather(*batch)
                batch = []
        await asyncio.gather(*batch)
        await eventually(
            lambda: len(handled) == goods and bus.stats.dead_lettered == len(hostile), timeout=90
        )
        failed = await DeadLetters(bus.transport, bus.service).list(limit=10_000)

    assert handled == set(range(goods))
    assert {f.headers["x-case"]: f.fault.reason for f in failed} == {m.name: m.reason for m in hostile}
    assert bus.stats.retries_scheduled == 0
    assert bus.stats.failed_attempts == 0
