"""The error queue (the issue's point 2): the message unchanged, plus the fault headers."""

from __future__ import annotations

from collections.abc import Callable

from tests.helpers import eventually, running
from tests.recoverability.app import Job
from tidings import Bus, Context, DeadLetters, RetryPolicy
from tidings.faults import MAX_MESSAGE, MAX_TRACEBACK
from tidings.headers import FAULT_PREFIX


class InventoryError(Exception):
    pass


def _check_stock(job: Job) -> None:
    raise InventoryError(f"no stock for job {job.n}: " + "x" * 5_000)


async def test_a_dead_letter_is_the_message_unchanged_plus_its_fault(make_bus: Callable[..., Bus]) -> None:
    bus = make_bus(retry=RetryPolicy(immediate=1, delays=(0.05,), jitter=0.0))

    @bus.handle(Job)
    async def reserve(job: Job, ctx: Context) -> None:
        _check_stock(job)

    envelope = bus.sender.envelope_for(
        Job(n=3, note="gift wrap"),
        subject="order-17",
        headers={"x-user": "alice", "x-tenant": "eu-1"},
        correlation_id="conversation-1",
        causation_id="cause-1",
    )
    async with running(bus):
        await bus.transport.send(envelope, bus.queue)
        await eventually(lambda: bus.stats.dead_lettered == 1)
        [failed] = await DeadLetters(bus.transport, bus.service).list()

    sent = envelope.to_headers()
    assert failed.id == envelope.id
    assert failed.body == envelope.body
    # Every header it was sent with is still there, with the same value.
    assert {k: failed.headers.get(k) for k in sent} == sent
    fault = failed.fault
    assert fault.reason == "handler-failed"
    assert fault.exception_type == f"{__name__}.InventoryError"
    assert fault.message is not None
    assert fault.message.startswith("no stock for job 3: xxx")
    assert len(fault.message) <= MAX_MESSAGE
    assert fault.traceback is not None
    assert len(fault.traceback) <= MAX_TRACEBACK
    # The end of the traceback is kept: the frame that raised and the exception line.
    assert "_check_stock" in fault.traceback
    assert "InventoryError: no stock for job 3" in fault.traceback
    assert fault.attempts == 4  # 2 rounds of 1 call + 1 immediate retry
    assert fault.first_failure is not None
    assert fault.last_failure is not None
    # The first failure was in the first round, the last in the second, after a delayed retry.
    assert fault.first_failure < fault.last_failure
    assert (fault.service, fault.queue) == (bus.service, bus.queue)


async def test_fault_headers_of_an_earlier_failure_are_replaced_not_piled_up(
    make_bus: Callable[..., Bus],
) -> None:
    bus = make_bus(retry=RetryPolicy.none())

    @bus.handle(Job)
    async def fails(job: Job, ctx: Context) -> None:
        raise ValueError("the second failure")

    # As if replayed by hand from another system's error queue, fault headers and all.
    envelope = bus.sender.envelope_for(Job(n=1)).with_headers(
        **{"tidings_fault_reason": "rejected", "tidings_fault_message": "the first failure"}
    )
    async with running(bus):
        await bus.transport.send(envelope, bus.queue)
        await eventually(lambda: bus.stats.dead_lettered == 1)
        [failed] = await DeadLetters(bus.transport, bus.service).list()
    assert failed.headers[FAULT_PREFIX + "reason"] == "handler-failed"
    assert failed.headers[FAULT_PREFIX + "message"] == "the second failure"
    assert failed.fault.attempts == 1
