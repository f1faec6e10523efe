"""The trace and span ids of the work going on, for log records and error reports.

    ids = trace_ids(ctx.headers)   # the current span's, else the handled message's traceparent
    if ids is not None:
        record.trace_id, record.span_id = ids.trace_id, ids.span_id

OpenTelemetry is consulted only when something in the process imported it already: without it,
or before anything traced, there is no current span, and the message's `traceparent` header (the
W3C Trace Context that every envelope may carry) is the only source of ids.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["TRACEPARENT", "TraceIds", "current_trace_ids", "parse_traceparent", "trace_ids"]

#: The header (a CloudEvents attribute of the envelope) that carries the message's creation context.
TRACEPARENT = "traceparent"

# version-traceid-parentid-flags (W3C Trace Context); all-zero ids are invalid, version ff is too.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


class TraceIds(NamedTuple):
    """A span's identity in W3C Trace Context form: lower-case hex."""

    trace_id: str
    span_id: str
    sampled: bool

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def parse_traceparent(value: str | None) -> TraceIds | None:
    """The ids in a `traceparent` value; None when it is missing or malformed."""
    if not value:
        return None
    found = _TRACEPARENT.match(value.strip())
    if found is None:
        return None
    version, trace_id, span_id, flags, rest = found.groups()
    # Version 00 has exactly four fields; later versions may add some, ff is forbidden.
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceIds(trace_id, span_id, bool(int(flags, 16) & 1))


def current_trace_ids() -> TraceIds | None:
    """The current OpenTelemetry span's ids, if OpenTelemetry is in use and a span is current."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # nothing imported it: nothing can have started a span
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return TraceIds(f"{context.trace_id:032x}", f"{context.span_id:016x}", bool(context.trace_flags & 0x01))


def trace_ids(headers: Mapping[str, str] | None = None) -> TraceIds | None:
    """The current span's ids, else those of the `traceparent` in `headers` (a message's)."""
    current = current_trace_ids()
    if current is not None or headers is None:
        return current
    return parse_traceparent(headers.get(TRACEPARENT))
