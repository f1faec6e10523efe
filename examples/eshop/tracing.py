"""Tracing the eshop: every process records its spans as JSON lines, the demo draws one checkout.

`--trace-dir DIR` (which `run.py --trace` gives every service) makes a service process set up the
OpenTelemetry SDK as an application would, with an exporter that appends each finished span to
`DIR/<service>.jsonl`; tidings picks the global provider up like any instrumented library. The
gateway adds a SERVER span for each HTTP call (`HttpSpans`), so one checkout is one trace: the
HTTP call, the request to basket, the outbox rows and their relays, and everything the order's
messages cause in ordering, catalog and payment. `read_spans` gathers every file and `draw`
renders a trace as a text tree.

To send the spans to an OTLP collector instead (Jaeger, Grafana Tempo, Honeycomb), a real service
would add `BatchSpanProcessor(OTLPSpanExporter())`: docs/observability.md.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "HttpSpans",
    "JsonLinesExporter",
    "SpanRecord",
    "checkout_root",
    "children_of",
    "draw",
    "read_spans",
    "start_tracing",
    "trace_of",
]

SpanRecord = Mapping[str, Any]


class JsonLinesExporter(SpanExporter):
    """Appends each span as one JSON line to a file (one file per process: no interleaving)."""

    def __init__(self, path: Path) -> None:
        self._file: TextIO = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(_record(span), default=str) + "\n" for span in spans)
        with self._lock:
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def _record(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "service": span.resource.attributes.get("service.name"),
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "start": span.start_time,
        "end": span.end_time,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": event.name, "attributes": dict(event.attributes or {})} for event in span.events],
        "links": [f"{link.context.span_id:016x}" for link in span.links],
        "error": span.status.status_code is StatusCode.ERROR,
    }


def start_tracing(trace_dir: Path | None, service: str) -> None:
    """With a directory, record this process's spans there (`<service>.jsonl`); else do nothing."""
    if trace_dir is None:
        return
    trace_dir.mkdir(parents=True, exist_ok=True)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    # Simple, not batched: each span is on disk when it ends, so a stopped process leaves all its
    # spans behind. A real service batches (and exports to a collector).
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(trace_dir / f"{service}.jsonl")))
    trace.set_tracer_provider(provider)


class HttpSpans:
    """ASGI middleware: a SERVER span per HTTP call, named by its route (`POST /baskets/{buyer}/...`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.tracer = trace.get_tracer("examples.eshop.gateway")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _route_of(self.app, scope) or scope["path"]
        method = scope["method"]
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        status: list[int] = []

        async def send_and_note(message: Any) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        # A caller's traceparent (an instrumented client) makes this call part of its trace.
        with self.tracer.start_as_current_span(
            f"{method} {route}",
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route, "url.path": scope["path"]},
        ) as span:
            await self.app(scope, receive, send_and_note)
            if status:
                span.set_attribute("http.response.status_code", status[0])
                if status[0] >= 500:
                    span.set_status(StatusCode.ERROR)


def _route_of(app: Any, scope: Scope) -> str | None:
    for route in getattr(app, "routes", ()):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(route.path)
    return None


def read_spans(trace_dir: Path) -> list[dict[str, Any]]:
    """Every span every process recorded in `trace_dir`."""
    spans = []
    for path in sorted(trace_dir.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


def checkout_root(spans: Sequence[SpanRecord], buyer: str) -> SpanRecord | None:
    """The gateway's SERVER span of `buyer`'s checkout call: the root of its trace."""
    for span in spans:
        if span["kind"] == "SERVER" and span["attributes"].get("url.path") == f"/baskets/{buyer}/checkout":
            return span
    return None


def trace_of(spans: Sequence[SpanRecord], root: SpanRecord) -> list[SpanRecord]:
    """The spans of `root`'s trace."""
    return [span for span in spans if span["trace_id"] == root["trace_id"]]


def children_of(spans: Sequence[SpanRecord]) -> dict[str | None, list[SpanRecord]]:
    """The spans under each span id (None: the roots), each list in start order."""
    out: dict[str | None, list[SpanRecord]] = {}
    for span in sorted(spans, key=lambda s: s["start"]):
        out.setdefault(span["parent_id"], []).append(span)
    return out


def draw(spans: Sequence[SpanRecord], root: SpanRecord, *, short: Any = str) -> list[str]:
    """`root`'s trace as a text tree: start offset, duration, service, span, message type, notes.

    Settling (the CLIENT spans `ack q`, `retry q`, `dead_letter q` under a `process q`) is shown
    as a note on the processing it ends. `short` shortens service names (the demo drops the
    deployment's suffix).
    """
    under = children_of(trace_of(spans, root))
    t0 = root["start"]
    rows: list[tuple[str, ...]] = []

    def visit(span: SpanRecord, lead: str, tail: str) -> None:
        attributes = span["attributes"]
        kids = under.get(span["span_id"], [])
        settles = [kid for kid in kids if kid["attributes"].get("messaging.operation.type") == "settle"]
        kids = [kid for kid in kids if kid not in settles]
        notes = [_note(event) for event in span["events"] if _note(event)]
        if "error.type" in attributes:
            notes.append(f"error {attributes['error.type'].rsplit('.', 1)[-1]}")
        notes += [f"then {kid['attributes']['messaging.operation.name']}" for kid in settles]
        rows.append(
            (
                f"{(span['start'] - t0) / 1e6:.1f}",
                f"{(span['end'] - span['start']) / 1e6:.1f} ms",
                short(span["service"] or "?"),
                f"{lead}{span['name']}",
                span["kind"].lower(),
                attributes.get("tidings.message.type", ""),
                "; ".join(notes),
            )
        )
        for index, child in enumerate(kids):
            last = index == len(kids) - 1
            visit(child, tail + ("└─ " if last else "├─ "), tail + ("   " if last else "│  "))

    visit(root, "", "")
    header = ("+ms", "took", "service", "span", "kind", "message", "notes")
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if column < 2 else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _note(event: Mapping[str, Any]) -> str:
    attributes = event["attributes"]
    if event["name"] == "tidings.retry_scheduled":
        delay = float(attributes.get("tidings.retry.delay", 0))
        return f"retry scheduled ({attributes.get('tidings.retry.reason')}, in {delay:.2f} s)"
    if event["name"] == "tidings.dead_lettered":
        return f"dead-lettered ({attributes.get('tidings.fault.reason')})"
    if event["name"] == "tidings.duplicate":
        return "duplicate: acknowledged, not handled again"
    if event["name"] == "exception":
        return f"raised {str(attributes.get('exception.type', '?')).rsplit('.', 1)[-1]}"
    return ""
