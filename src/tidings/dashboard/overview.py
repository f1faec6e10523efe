"""The services page's figures: each service's instances, rates, timings, retries and failures.

Rates and counts come from the audit records of the last minutes (`WINDOW`), the percentiles
from the newest of them (`Store.window`), the instances and
the outbox backlog from the heartbeats, the error queues and queue depths from the transport
(`failed.py`, `depth.py`). An
instance is alive while its heartbeats keep coming: silent after `SILENT_AFTER` missed beats,
stopped once its last beat said so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tidings.audit import Heartbeat
from tidings.audit.records import DEAD_LETTERED, RETRIED

__all__ = ["InstanceView", "ServiceView", "overview", "percentile"]

#: Seconds of records the rates and timings are computed over.
WINDOW = 300.0
#: Beats an instance may miss before it is called silent.
SILENT_AFTER = 3


@dataclass(slots=True)
class InstanceView:
    beat: Heartbeat
    state: str  # alive, silent or stopped
    age: float  # seconds since its last beat


@dataclass(slots=True)
class ServiceView:
    name: str
    instances: list[InstanceView] = field(default_factory=list)
    processed: int = 0
    per_second: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    retries: int = 0
    dead_lettered: int = 0
    #: Messages in its queue now, and dead letters in its error queue (None: unknown).
    queue_depth: int | None = None
    error_queue: int | None = None
    outbox_backlog: int | None = None

    @property
    def alive(self) -> int:
        return sum(1 for view in self.instances if view.state == "alive")

    @property
    def silent(self) -> int:
        return sum(1 for view in self.instances if view.state == "silent")


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of values sorted ascending (None for none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _state(beat: Heartbeat, now: float) -> InstanceView:
    age = max(0.0, now - beat.sent_at)
    if beat.stopping:
        state = "stopped"
    elif age > beat.interval * SILENT_AFTER:
        state = "silent"
    else:
        state = "alive"
    return InstanceView(beat, state, age)


def overview(
    services: Sequence[str],
    beats: Sequence[Heartbeat],
    counts: Sequence[tuple[str, str, int]],
    durations: Sequence[tuple[str, float]],
    error_queues: Mapping[str, int | None],
    depths: Mapping[str, int | None] | None = None,
    *,
    now: float | None = None,
    span: float = WINDOW,
) -> list[ServiceView]:
    """One view per service, by name."""
    now = time.time() if now is None else now
    views = {name: ServiceView(name) for name in services}
    for beat in beats:
        view = views.setdefault(beat.service, ServiceView(beat.service))
        instance = _state(beat, now)
        view.instances.append(instance)
        if instance.state == "alive" and beat.outbox_backlog is not None:
            view.outbox_backlog = (view.outbox_backlog or 0) + beat.outbox_backlog
    for service, outcome, count in counts:
        view = views.setdefault(service, ServiceView(service))
        view.processed += count
        if outcome == RETRIED:
            view.retries += count
        elif outcome == DEAD_LETTERED:
            view.dead_lettered += count
    by_service: dict[str, list[float]] = {}
    for service, duration in durations:
        by_service.setdefault(service, []).append(duration)
    for name, view in views.items():
        values = sorted(by_service.get(name, ()))
        view.per_second = view.processed / span
        view.p50_ms = percentile(values, 0.50)
        view.p99_ms = percentile(values, 0.99)
        view.error_queue = error_queues.get(name)
        view.queue_depth = (depths or {}).get(name)
    return [views[name] for name in sorted(views)]
