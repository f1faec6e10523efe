"""Logs joined to traces: a record written inside a handler's span carries that span's ids."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import unique
from tests.helpers import eventually, running
from tests.telemetry.conftest import Recorded
from tidings import Bus, Context, Event, RetryPolicy
from tidings.logs import JsonLines, MessageFields


class Ping(Event, name="log-records.ping"):
    n: int


async def test_records_inside_the_consumer_span_carry_its_trace_and_span_ids(
    recorded: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app_log = logging.getLogger("app")
    fields = MessageFields()  # what an application adds to its handler to get the fields too
    app_log.addFilter(fields)
    bus = Bus("joined", f"memory://{unique()}", telemetry=recorded.telemetry, retry=RetryPolicy.none())

    @bus.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        app_log.info("pinged %d", event.n)
        raise ValueError("no")

    try:
        async with running(bus):
            await bus.publish(Ping(n=1))
            await eventually(lambda: bus.stats.dead_lettered == 1)
    finally:
        app_log.removeFilter(fields)

    process = recorded.one("process joined")
    assert process.context is not None
    trace_id, span_id = f"{process.context.trace_id:032x}", f"{process.context.span_id:016x}"
    mine = next(r for r in caplog.records if r.name == "app")
    failed = next(r for r in caplog.records if r.name == "tidings.pipeline" and "failed" in r.getMessage())
    dead = next(r for r in caplog.records if "dead-lettering" in r.getMessage())
    for record in (mine, failed, dead):
        assert (record.__dict__["trace_id"], record.__dict__["span_id"]) == (trace_id, span_id)
        assert record.__dict__["service"] == "joined"
        assert record.__dict__["type"] == "log-records.ping"
    # A JSON line can be found from the trace.
    line = json.loads(JsonLines().format(dead))
    assert line["trace_id"] == trace_id
    assert line["span_id"] == span_id
    assert line["reason"] == "handler-failed"


async def test_records_outside_any_message_carry_no_message_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log = logging.getLogger("app.outside")
    log.addFilter(MessageFields())
    log.info("nothing going on")
    (record,) = [r for r in caplog.records if r.name == "app.outside"]
    assert not {"message_id", "type", "correlation_id", "service", "trace_id"} & set(record.__dict__)
