"""Observability: traces and metrics of what a bus does, on OpenTelemetry when it is installed.

    Bus("basket", transport)                    # telemetry=True: OpenTelemetry's global providers
    Bus("basket", transport, telemetry=False)   # nothing recorded, nothing imported

`port` is what the parts of a bus call (`Telemetry`, silent by default); `otel` implements it on
OpenTelemetry, and is imported only when a bus asks for telemetry and `opentelemetry-api` is
installed (`pip install 'tidings[otel]'`): without it a bus runs exactly as with
`telemetry=False`. `ids` gives the trace and span ids of the work going on, for log records.
docs/observability.md says what is emitted.
"""

from __future__ import annotations

from tidings.errors import ConfigurationError
from tidings.telemetry.ids import TraceIds, current_trace_ids, parse_traceparent, trace_ids
from tidings.telemetry.port import (
    NO_TELEMETRY,
    Operation,
    OutboxGauges,
    Processing,
    Sending,
    Telemetry,
    traced,
)

__all__ = [
    "NO_TELEMETRY",
    "Operation",
    "OutboxGauges",
    "Processing",
    "Sending",
    "Telemetry",
    "TraceIds",
    "current_trace_ids",
    "parse_traceparent",
    "telemetry_for",
    "trace_ids",
    "traced",
]


def telemetry_for(setting: bool | Telemetry) -> Telemetry:
    """The telemetry of `Bus(..., telemetry=setting)`: a `Telemetry` as given, True for
    OpenTelemetry's global providers (silent when `opentelemetry-api` is not installed), False
    for none."""
    if isinstance(setting, Telemetry):
        return setting
    if setting is False:
        return NO_TELEMETRY
    if setting is not True:
        raise ConfigurationError(f"telemetry= takes True, False or a Telemetry, not {setting!r}")
    try:
        from tidings.telemetry.otel import OpenTelemetry
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] == "opentelemetry":
            return NO_TELEMETRY  # not installed: on by default means on where it can be
        raise
    return OpenTelemetry()
