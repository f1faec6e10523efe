"""Telemetry is on by default and free when absent: without opentelemetry nothing is imported and a
bus runs as before; with the API and no SDK nothing is recorded; an SDK set globally, before or
after the bus was made, is used. Each case runs in a process of its own (the global providers can
be set once per process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import ROOT

ROUND_TRIP = textwrap.dedent(
    """
    import asyncio, sys
    from tidings import Bus, Context, Event

    class Hello(Event):
        n: int

    def round_trip(bus, messages=(1,)):
        seen = []

        @bus.subscribe(Hello)
        async def hello(event, ctx):
            seen.append(event.n)
            if len(seen) == len(messages):
                bus.stop()

        async def go():
            async with bus:
                for n in messages:
                    await bus.publish(Hello(n=n))
                    await asyncio.sleep(PAUSE)
                await asyncio.wait_for(bus.run(), 30)

        asyncio.run(go())
        assert seen == list(messages), seen

    PAUSE = 0
    """
)


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_without_opentelemetry_a_bus_runs_silently_and_imports_none_of_it() -> None:
    out = run(
        """
        import importlib.abc

        class Hide(importlib.abc.MetaPathFinder):
            # As if opentelemetry were not installed.
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, Hide())
        from tidings.telemetry import NO_TELEMETRY
        bus = Bus("bare", "memory://bare")
        assert bus.telemetry is NO_TELEMETRY
        round_trip(bus)
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    assert out == "[]"


def test_telemetry_false_imports_nothing_of_opentelemetry() -> None:
    out = run(
        """
        round_trip(Bus("off", "memory://off", telemetry=False))
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    assert out == "[]"


def test_with_the_api_and_no_sdk_nothing_is_recorded() -> None:
    out = run(
        """
        from tidings.telemetry.otel import OpenTelemetry
        bus = Bus("api-only", "memory://api-only")
        assert isinstance(bus.telemetry, OpenTelemetry)
        round_trip(bus)
        print(bus.telemetry.live_tracer(), bus.telemetry.live_instruments())
        """
    )
    assert out == "None None"


def test_a_global_sdk_set_after_the_bus_was_made_is_used_from_then_on() -> None:
    out = run(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        bus = Bus("late", "memory://late")
        seen = []

        @bus.subscribe(Hello)
        async def hello(event, ctx):
            seen.append(event.n)

        async def until(count):
            while len(seen) < count:
                await asyncio.sleep(0.01)

        async def go():
            async with bus:
                running = asyncio.create_task(bus.run())
                await bus.publish(Hello(n=1))  # no SDK yet: nothing recorded
                await until(1)
                exporter = InMemorySpanExporter()
                provider = TracerProvider()
                provider.add_span_processor(SimpleSpanProcessor(exporter))
                trace.set_tracer_provider(provider)
                # While it has none, the bus looks for a global SDK at most once a second.
                await asyncio.sleep(1.1)
                await bus.publish(Hello(n=2))
                await until(2)
                await asyncio.sleep(0.05)
                bus.stop()
                await running
            return exporter

        exporter = asyncio.run(go())
        print(sorted(span.name for span in exporter.get_finished_spans()))
        """
    )
    assert out == "['ack late', 'process late', 'publish Hello']"
