"""Dead-letter tooling: list, inspect, replay and purge a service's error queue.

    async with transport_from_url("sqlite:///shop.db") as transport:
        dead_letters = DeadLetters(transport, "basket")
        for failed in await dead_letters.list():
            print(failed.id, failed.fault.reason, failed.fault.message)
        await dead_letters.replay([failed.id])    # back onto "basket", same id, attempts from 1
        await dead_letters.purge()                # gone for good

The same from a shell: `tidings dead-letters list|show ID|replay ID...|replay --all|purge`
(`--transport URL --service NAME`, `--json`; `tidings.cli.dead_letters`). The moving is the
transport's (`Transport.replay`); this module reads the fault headers (`tidings.faults`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from tidings.headers import ATTEMPT, FAULT_PREFIX
from tidings.transports.base import DeadLetter, Transport

__all__ = ["DeadLetters", "FailedMessage", "Fault"]

#: How many dead letters `DeadLetters.get` looks through for one id. The port lists oldest first and
#: has no lookup by id; an error queue longer than this wants purging more than browsing.
GET_SCAN_LIMIT = 10_000


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None  # headers of a dead letter are whatever arrived: never trust their shape


def _int(text: str | None) -> int:
    try:
        return int(text or "0")
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """Why a message is in the error queue, read back from its fault headers."""

    #: A stable code: `handler-failed`, `rejected`, `not-retryable`, `delivery-limit`,
    #: `unknown-type`, `invalid-payload`, `too-large`, `not-utf8`, ... (see `tidings.faults`).
    reason: str
    #: The exception's qualified type, when an exception caused it (`builtins.ValueError`).
    exception_type: str | None
    #: The exception's message, or what was wrong with the input.
    message: str | None
    #: The end of the traceback, when an exception caused it.
    traceback: str | None
    #: Handler calls made on the message (0 for input refused before any handler).
    attempts: int
    first_failure: datetime | None
    last_failure: datetime | None
    #: The service and queue the message failed in.
    service: str | None
    queue: str | None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Fault:
        def fault(name: str) -> str | None:
            return headers.get(FAULT_PREFIX + name)

        return cls(
            reason=fault("reason") or "unknown",
            exception_type=fault("type"),
            message=fault("message"),
            traceback=fault("traceback"),
            attempts=_int(fault("attempts")),
            first_failure=_time(fault("first-time")),
            last_failure=_time(fault("last-time")),
            service=fault("service"),
            queue=fault("queue"),
        )


@dataclass(frozen=True, slots=True)
class FailedMessage:
    """A message in an error queue: the message as it arrived, and its fault."""

    id: str
    #: The wire name from the `type` header ("" when the message had none).
    type: str
    #: Every header as stored, the fault headers included.
    headers: Mapping[str, str]
    body: bytes
    fault: Fault

    @classmethod
    def from_dead_letter(cls, dead_letter: DeadLetter) -> FailedMessage:
        headers = dead_letter.headers
        return cls(
            id=dead_letter.message_id,
            type=headers.get("type", ""),
            headers=headers,
            body=dead_letter.body,
            fault=Fault.from_headers(headers),
        )

    @property
    def message_headers(self) -> dict[str, str]:
        """The headers the message itself carried: without the fault and attempt headers."""
        return {k: v for k, v in self.headers.items() if k != ATTEMPT and not k.startswith(FAULT_PREFIX)}


def _first_of_each_id(letters: Sequence[DeadLetter]) -> Sequence[DeadLetter]:
    """`letters` (oldest first) less the later copies of an id; letters without an id all stay."""
    seen: set[str] = set()
    kept = []
    for letter in letters:
        if letter.message_id:
            if letter.message_id in seen:
                continue
            seen.add(letter.message_id)
        kept.append(letter)
    return kept


class DeadLetters:
    """The error queue of one service on an open transport."""

    def __init__(self, transport: Transport, service: str) -> None:
        self.transport = transport
        self.service = service

    @property
    def queue(self) -> str:
        """The service's input queue (a `Bus`'s queue is named after its service)."""
        return self.service

    async def list(self, *, limit: int = 100) -> list[FailedMessage]:
        """The oldest `limit` dead letters, without removing them; each message id once.

        A transport may hold two copies of one dead letter (RabbitMQ: a crash between storing
        the copy and acknowledging the original, docs/recoverability.md): the oldest is shown,
        and `replay` moves the message back once. So a listing can be shorter than `limit`.
        """
        letters = await self.transport.dead_letters(self.queue, limit=limit)
        return [FailedMessage.from_dead_letter(letter) for letter in _first_of_each_id(letters)]

    async def get(self, message_id: str) -> FailedMessage | None:
        """The dead letter with this id, or None when there is none."""
        for letter in await self.transport.dead_letters(self.queue, limit=GET_SCAN_LIMIT):
            if letter.message_id == message_id:
                return FailedMessage.from_dead_letter(letter)
        return None

    async def replay(self, message_ids: Sequence[str]) -> int:
        """Move these dead letters back onto the service's queue; returns how many moved.

        Each keeps its id, body and headers; the fault and attempt headers are dropped, so the
        handler sees it as attempt 1 again. Two copies of one dead letter (see `list`) go back
        once; on RabbitMQ the other copy leaves the error queue too.
        """
        if isinstance(message_ids, str):
            # A lone id would otherwise be read as a sequence of one-character ids.
            raise TypeError("replay() takes a sequence of message ids; use replay([message_id])")
        if not message_ids:
            return 0
        return await self.transport.replay(self.queue, list(message_ids))

    async def replay_all(self) -> int:
        """Move every dead letter back onto the service's queue; returns how many moved."""
        return await self.transport.replay(self.queue, None)

    async def purge(self) -> int:
        """Delete every dead letter of the service for good; returns how many."""
        return await self.transport.purge_dead_letters(self.queue)
