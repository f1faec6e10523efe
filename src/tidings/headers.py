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

#: How many times the handler has been tried on this message so far, counting this try.
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
