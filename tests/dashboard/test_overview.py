"""The services page's figures: instances alive, silent or stopped by their heartbeats; rates,
percentiles, retries and dead letters from the records; the outbox backlog of the live ones."""

from __future__ import annotations

from tidings.audit import Heartbeat
from tidings.dashboard.overview import overview, percentile


def beat(instance: str, sent_at: float, *, stopping: bool = False, backlog: int | None = None) -> Heartbeat:
    return Heartbeat(
        service="payment",
        instance=instance,
        host="h",
        pid=1,
        version="0.1.0",
        started_at=0.0,
        sent_at=sent_at,
        interval=5.0,
        outbox_backlog=backlog,
        stopping=stopping,
    )


def test_instances_rates_and_percentiles() -> None:
    now = 1000.0
    beats = [beat("a", now - 2, backlog=3), beat("b", now - 16, backlog=7), beat("c", now - 1, stopping=True)]
    counts = [("payment", "handled", 290), ("payment", "retried", 8), ("payment", "dead-lettered", 2)]
    durations = [("payment", float(ms)) for ms in range(1, 101)]
    (view,) = overview(
        ["payment"], beats, counts, durations, {"payment": 2}, {"payment": 5}, now=now, span=300
    )
    assert [(i.beat.instance, i.state) for i in view.instances] == [
        ("a", "alive"),
        ("b", "silent"),
        ("c", "stopped"),
    ]
    assert (view.alive, view.silent) == (1, 1)
    assert view.processed == 300
    assert view.per_second == 1.0
    assert (view.retries, view.dead_lettered) == (8, 2)
    assert (view.p50_ms, view.p99_ms) == (50.0, 99.0)
    assert view.outbox_backlog == 3  # the silent instance's last word is not counted
    assert (view.error_queue, view.queue_depth) == (2, 5)
    assert percentile([], 0.5) is None
