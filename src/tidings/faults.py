"""Fault headers: what the error queue says about why a message is there.

Every dead letter keeps its id, body and headers, plus these (see `tidings.headers.FAULT_PREFIX`):
`reason` (a stable code, below), `type` and `message` of the exception, a truncated `traceback`,
`attempts` (handler calls), `first-time` and `last-time` (RFC 3339), `service` and `queue`.

Reason codes: `handler-failed` (retries used up), `rejected` (the handler raised `Reject`),
`not-retryable` (an exception of a `never_retry` type), `delivery-limit` (delivered too often
without being settled: the process died on it), `unknown-type` (no handler for its wire name),
`invalid-payload` (the model's validation failed), and the decode reasons of
`tidings.envelope.decode_body` / `Envelope.from_headers` (`too-large`, `not-utf8`, `not-json`,
`not-finite`, `number-too-large`, `too-deep`, `unsupported-content-type`, `missing-attribute`,
`bad-attribute`).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from datetime import UTC, datetime

from tidings.headers import FAULT_PREFIX

__all__ = ["fault_headers", "first_failure_time"]

MAX_MESSAGE = 1_000
MAX_TRACEBACK = 4_000


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _traceback(error: BaseException) -> str:
    # Cut each long piece (an exception line with a huge message) first, so that it cannot push
    # every frame out; then keep the end: the frame that raised is the one worth reading.
    pieces = traceback.TracebackException.from_exception(error).format()
    trace = "".join(p if len(p) <= MAX_MESSAGE else p[:MAX_MESSAGE] + "...\n" for p in pieces)
    return trace[-MAX_TRACEBACK:]


def first_failure_time(headers: Mapping[str, str]) -> str:
    """When this message first failed: carried over from an earlier round, else now."""
    return headers.get(FAULT_PREFIX + "first-time") or _now()


def fault_headers(
    headers: Mapping[str, str],
    *,
    reason: str,
    service: str,
    queue: str,
    attempts: int,
    error: BaseException | None = None,
    detail: str | None = None,
) -> dict[str, str]:
    """`headers` with the fault headers for this failure set (replacing any earlier ones)."""
    out = {k: v for k, v in headers.items() if not k.startswith(FAULT_PREFIX)}
    out[FAULT_PREFIX + "reason"] = reason
    if error is not None:
        out[FAULT_PREFIX + "type"] = f"{type(error).__module__}.{type(error).__qualname__}"
        out[FAULT_PREFIX + "message"] = str(error)[:MAX_MESSAGE]
        out[FAULT_PREFIX + "traceback"] = _traceback(error)
    elif detail is not None:
        out[FAULT_PREFIX + "message"] = detail[:MAX_MESSAGE]
    out[FAULT_PREFIX + "attempts"] = str(attempts)
    out[FAULT_PREFIX + "first-time"] = first_failure_time(headers)
    out[FAULT_PREFIX + "last-time"] = _now()
    out[FAULT_PREFIX + "service"] = service
    out[FAULT_PREFIX + "queue"] = queue
    return out
