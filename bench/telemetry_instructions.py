"""Instructions per message on the bus path with and without telemetry (memory transport, callgrind).

One bus publishes events to itself and handles them (publish, consume, handler, ack), one message
at a time, on the memory transport so that no broker or disk adds noise. Counted like
`rabbitmq_instructions.py`: each contender runs twice under `valgrind --tool=callgrind`, with a
small and a large message count, and the difference divided by the difference in messages is one
message's cost, start-up and imports left out. The contenders:

- `absent`: opentelemetry cannot be imported (hidden, as if not installed): the port's no-op;
- `off`: `Bus(..., telemetry=False)` with opentelemetry installed;
- `api`: the default, `opentelemetry-api` installed and no SDK configured;
- `sdk`: the SDK set globally, spans through a `BatchSpanProcessor` to an exporter that drops
  them, metrics through a `PeriodicExportingMetricReader` (every 10 s) to one that drops them
  too: the cost of recording, batching and exporting, with no I/O.

    .venv/bin/python bench/telemetry_instructions.py
    .venv/bin/python bench/telemetry_instructions.py --only absent --only api

Slow: valgrind runs Python ~50x slower; each contender takes a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.abc
import sys
from collections.abc import Sequence
from typing import Any

from callgrind import instructions_of

CONTENDERS = ("absent", "off", "api", "sdk")


class _HideOpenTelemetry(importlib.abc.MetaPathFinder):
    """As if opentelemetry were not installed."""

    def find_spec(self, name: str, path: Sequence[str] | None = None, target: Any = None) -> None:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _set_up_sdk() -> None:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricExportResult,
        MetricsData,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class DropSpans(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    class DropMetrics(MetricExporter):
        def export(
            self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
        ) -> MetricExportResult:
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
            pass

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(DropSpans()))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(DropMetrics(), export_interval_millis=10_000)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


async def workload(contender: str, messages: int) -> None:
    """Publish `messages` events to this bus one at a time, each handled before the next goes.

    One message in flight and one handler slot: the same interleaving in every run, so that the
    count depends on the code and not on how the tasks happened to be scheduled.
    """
    from tidings import Bus, Context, Event

    class Tick(Event):
        n: int

    bus = Bus("bench", "memory://bench", telemetry=contender != "off", concurrency=1, prefetch=1)
    handled = asyncio.Event()

    @bus.subscribe(Tick)
    async def on_tick(event: Tick, ctx: Context) -> None:
        handled.set()

    async with bus:
        running = asyncio.create_task(bus.run())
        for n in range(messages):
            handled.clear()
            await bus.publish(Tick(n=n))
            await handled.wait()
        bus.stop()
        await running


def run_one(contender: str, messages: int) -> None:
    if contender == "absent":
        sys.meta_path.insert(0, _HideOpenTelemetry())
    elif contender == "sdk":
        _set_up_sdk()
    asyncio.run(workload(contender, messages))
    if contender == "absent":
        assert not any(name.startswith("opentelemetry") for name in sys.modules), "opentelemetry was imported"


def instructions(contender: str, messages: int) -> int:
    return instructions_of(
        [__file__, "--run", contender, "--messages", str(messages)],
        what=f"{contender} with {messages} messages",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=3000)
    parser.add_argument("--only", action="append", choices=CONTENDERS)
    parser.add_argument("--run", choices=CONTENDERS, help=argparse.SUPPRESS)  # one measured process
    parser.add_argument("--messages", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run is not None:
        run_one(args.run, args.messages)
        return
    per_message: dict[str, float] = {}
    for contender in args.only or CONTENDERS:
        small = instructions(contender, args.small)
        large = instructions(contender, args.large)
        per_message[contender] = (large - small) / (args.large - args.small)
        print(f"{contender:<7} {per_message[contender] / 1e3:8.1f} k instructions per message", flush=True)
    base = per_message.get("absent")
    if base:
        for contender, cost in per_message.items():
            if contender != "absent":
                print(f"{contender} / absent: {cost / base:.3f}x the instructions per message")


if __name__ == "__main__":
    main()
