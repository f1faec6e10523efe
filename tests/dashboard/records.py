"""Audit records made for the store and diagram tests: what a bus would send, with chosen fields."""

from __future__ import annotations

import time
from typing import Any

from tidings.audit import AuditRecord


def record(**fields: Any) -> AuditRecord:
    now = time.time()
    defaults: dict[str, Any] = {
        "message_id": "m",
        "type": "t",
        "source": "a",
        "service": "b",
        "queue": "b",
        "instance": "i-1",
        "outcome": "handled",
        "sent_at": now,
        "processed_at": now,
        "duration_ms": 1.0,
        "body": "{}",
        "body_size": 2,
    }
    defaults.update(fields)
    return AuditRecord(**defaults)
