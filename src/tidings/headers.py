"""Names of the headers tidings itself puts on messages (beyond the CloudEvents attributes).

They contain a dash, so they are never mistaken for CloudEvents attributes (see `tidings.envelope`).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "ATTEMPT",
    "FAULT_PREFIX",
    "REPLY_TO",
    "REQUEST_ID",
    "strip_fault_headers",
]

#: The round of delayed retries this delivery belongs to: absent or 1 on the first delivery, one more
#: for each delayed retry. Each round makes `RetryPolicy.immediate + 1` handler calls, so the call
#: number a handler sees (`Context.attempt`) is `(round - 1) * (immediate + 1) + call in round`.
ATTEMPT = "tidings-attempt"
#: Every fault header starts with this: reason, type, message, traceback, attempts, times, where.
FAULT_PREFIX = "tidings-fault-"
#: The queue a reply to this request goes to.
REPLY_TO = "tidings-reply-to"
#: On a reply: the id of the request it answers.
REQUEST_ID = "tidings-request-id"


def strip_fault_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers without the fault and attempt headers: what a replayed message carries."""
    return {k: v for k, v in headers.items() if k != ATTEMPT and not k.startswith(FAULT_PREFIX)}
