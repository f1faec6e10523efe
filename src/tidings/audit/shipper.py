"""`Shipper`: turns settled deliveries into audit records and sends them in batches.

The handler path calls `take` (an append, and a wake-up once a batch is full); `run`, a task of the
bus's run, sends what has gathered every `flush_interval` seconds or as soon as a batch is full,
one transport send per batch. While the transport is down the notes wait (up to `capacity`; then
new ones are dropped and counted) and the sends are retried with a capped backoff. When the run
ends, what is left is sent once more before the task ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tidings.audit.records import RECORDS_TYPE, SHIPPED_FIELDS, encode_records
from tidings.audit.settings import AuditSettings
from tidings.audit.telemetry import Settled
from tidings.backoff import capped_exponential
from tidings.envelope import Envelope
from tidings.headers import ATTEMPT, FAULT_PREFIX
from tidings.logs import logger
from tidings.transports.base import Transport

__all__ = ["Shipper"]

log = logger("tidings.audit")

#: How long the last send at the end of a run may take before the rest is given up.
FINAL_FLUSH_TIMEOUT = 5.0
_MAX_BACKOFF = 10.0
_MAX_ERROR_MESSAGE = 500


class Shipper:
    """The audit records of one bus instance on their way to the audit queue."""

    def __init__(self, service: str, instance: str, settings: AuditSettings) -> None:
        self.service = service
        self.instance = instance
        self.settings = settings
        self._waiting: list[Settled] = []
        self._full: asyncio.Event | None = None
        #: Records sent, and dropped for want of room while the transport could not take them.
        self.sent = 0
        self.dropped = 0

    def take(self, settled: Settled) -> None:
        """A delivery is over (called on the handler path: keep it short)."""
        waiting = self._waiting
        if len(waiting) >= self.settings.capacity:
            self.dropped += 1
            return
        waiting.append(settled)
        if len(waiting) == self.settings.batch_size and self._full is not None:
            self._full.set()

    async def run(self, transport: Transport) -> None:
        """Send batches until cancelled; then send what is left, within `FINAL_FLUSH_TIMEOUT`."""
        self._full = asyncio.Event()
        failures = 0
        try:
            while True:
                if len(self._waiting) < self.settings.batch_size:
                    self._full.clear()
                    try:
                        async with asyncio.timeout(self.settings.flush_interval):
                            await self._full.wait()
                    except TimeoutError:
                        pass
                try:
                    await self._send_waiting(transport)
                except Exception as error:
                    failures += 1
                    if failures == 1:
                        log.warning(
                            "audit of %s: cannot send records (%s); holding them", self.service, error
                        )
                    await asyncio.sleep(capped_exponential(0.5, _MAX_BACKOFF, failures - 1))
                else:
                    failures = 0
        except asyncio.CancelledError:
            try:
                async with asyncio.timeout(FINAL_FLUSH_TIMEOUT):
                    await self._send_waiting(transport)
            except Exception as error:
                log.warning(
                    "audit of %s: %d records not sent at the end: %s", self.service, len(self._waiting), error
                )
            raise
        finally:
            self._full = None

    async def _send_waiting(self, transport: Transport) -> None:
        size = self.settings.batch_size
        while self._waiting:
            batch = self._waiting[:size]
            body = encode_records([self.row(settled) for settled in batch], SHIPPED_FIELDS)
            envelope = Envelope(type=RECORDS_TYPE, source=self.service, body=body)
            await transport.send(envelope, self.settings.queue)
            # Only once the transport has it: a failed send keeps the batch for the next try.
            del self._waiting[: len(batch)]
            self.sent += len(batch)

    def row(self, settled: Settled) -> list[Any]:
        """The record of a settled delivery as a row, its values in `SHIPPED_FIELDS` order.

        Every message audited goes through here, on the bus's event loop: what the headers say
        already (id, type, correlation, ...) is not copied out of them, and the common case (no
        error, a first delivery) does no more than read the fields.
        """
        headers = settled.headers
        body = settled.body
        error = settled.error
        attempt = headers.get(ATTEMPT)
        return [
            settled.service,
            settled.queue,
            self.instance,
            settled.outcome,
            settled.reason,
            None if error is None else _qualified(error),  # error_type
            None if error is None else str(error)[:_MAX_ERROR_MESSAGE],  # error_message
            settled.arrived,  # processed_at
            # In µs, rounded, then ms: round() with digits costs five times as much (it formats).
            round((settled.duration or 0.0) * 1e6) / 1e3,  # duration_ms
            1 if attempt is None else _int(attempt, 1),  # round
            settled.failures,
            _message_headers(headers, attempt is not None),
            body[: self.settings.max_body].decode("utf-8", errors="replace"),
            len(body),  # body_size
        ]


def _qualified(error: BaseException) -> str:
    kind = type(error)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text else default
    except ValueError:
        return default


def _message_headers(headers: Any, retried: bool) -> dict[str, str]:
    # The fault headers of a replayed message are gone already; those of the first delivery's
    # retries are the bus's own bookkeeping, which the record says in its own fields.
    # Only a delayed retry carries them (a dead letter is never delivered; a replay has them
    # stripped), and it always carries the attempt header.
    if not retried:
        return headers if type(headers) is dict else dict(headers)
    return {k: v for k, v in headers.items() if k != ATTEMPT and not k.startswith(FAULT_PREFIX)}
