"""tidings' log records: the message's fields on every record about one, JSON lines, outages once.

Fields come from the message a delivery carries (tidings.logs.about); a field given in `extra=`
wins; JSON lines keep every extra and the traceback; an outage is one WARNING and one INFO.
"""

from __future__ import annotations

import json
import logging
import sys

import pytest

from tests.conftest import unique
from tests.helpers import eventually, running
from tidings import Bus, Context, Envelope, Event, RetryPolicy
from tidings.logs import JsonLines, MessageFields, Outage, about, logger


class Ping(Event, name="logs.ping"):
    n: int


async def test_every_tidings_record_about_a_message_carries_its_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    url = f"memory://{unique()}"
    bus = Bus("fields", url, retry=RetryPolicy(immediate=1, delays=()))

    @bus.subscribe(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        raise RuntimeError(f"ping {event.n} failed")

    async with running(bus):
        await bus.transport.publish(
            Envelope(type="logs.ping", source="elsewhere", body=b'{"n": 7}', correlation_id="order-42")
        )
        await eventually(lambda: bus.stats.dead_lettered == 1)

    about_it = [r for r in caplog.records if r.name == "tidings.pipeline"]
    assert len(about_it) == 3  # two failed attempts, then the dead letter
    ids = {r.__dict__["message_id"] for r in about_it}
    assert len(ids) == 1
    for record in about_it:
        assert record.__dict__["type"] == "logs.ping"
        assert record.__dict__["correlation_id"] == "order-42"
        assert record.__dict__["service"] == "fields"
    dead = about_it[-1]
    assert dead.levelno == logging.WARNING
    assert dead.getMessage() == (
        f"fields: dead-lettering logs.ping {ids.pop()} from queue fields: "
        "handler-failed (RuntimeError('ping 7 failed'))"
    )


def test_a_field_given_in_extra_wins(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log = logger("tidings.tests")
    with about({"id": "m-1", "type": "t", "correlationid": "c-1"}, "svc"):
        log.info("given", extra={"message_id": "mine"})
        log.info("taken")
    given, taken = caplog.records[-2:]
    assert given.__dict__["message_id"] == "mine"
    assert taken.__dict__["message_id"] == "m-1"
    assert (taken.__dict__["correlation_id"], taken.__dict__["service"]) == ("c-1", "svc")


def test_a_json_line_has_the_fields_the_extras_and_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failure = sys.exc_info()
    record = logging.getLogger("tidings.tests.json").makeRecord(
        "tidings.tests.json", logging.ERROR, __file__, 1, "failed %s", ("x",), failure, extra={"attempt": 2}
    )
    with about({"id": "m-2", "type": "t2"}, "svc2"):
        MessageFields().filter(record)
    text = JsonLines().format(record)
    assert "\n" not in text  # one line, the traceback inside the object
    line = json.loads(text)
    assert line["message"] == "failed x"
    assert line["level"] == "ERROR"
    assert line["logger"] == "tidings.tests.json"
    assert line["attempt"] == 2
    assert (line["message_id"], line["type"], line["service"]) == ("m-2", "t2", "svc2")
    assert "correlation_id" not in line  # the message had none
    assert "ValueError: boom" in line["exception"]


def test_an_outage_is_one_warning_and_one_info_however_many_attempts_fail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    outage = Outage(logging.getLogger("tidings.tests.outage"), "the database")
    assert outage.up() is None  # nothing was down
    assert outage.down(ConnectionError("refused")) is True
    for _ in range(5):
        assert outage.down(ConnectionError("refused")) is False
    duration = outage.up()
    assert duration is not None
    assert outage.up() is None
    loud = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert loud == [
        ("WARNING", "the database is unavailable: refused"),
        ("INFO", f"the database is available again after {duration:.1f} s (6 failed attempts)"),
    ]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 5
