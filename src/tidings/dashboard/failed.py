"""Failed messages: every service's error queue, grouped, and replay and purge — all through
`tidings.dead_letters.DeadLetters`, the code behind `tidings dead-letters`.

Groups are by service, reason code and exception type: one bug makes one group however many
messages it failed, and a group is replayed at once once the bug is fixed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tidings.dead_letters import DeadLetters, FailedMessage
from tidings.errors import NoRoute, TransportError
from tidings.transports.base import Transport

__all__ = ["FailedMessages", "Group"]

#: Dead letters read per service for the page; the counts say when there are more.
LIMIT = 500
#: Seconds the services page may reuse the error queues' sizes (each look reads the queues).
COUNT_TTL = 5.0


@dataclass(slots=True)
class Group:
    service: str
    reason: str
    exception_type: str | None
    messages: list[FailedMessage] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.reason}|{self.exception_type or ''}"

    @property
    def example(self) -> str:
        message = self.messages[0].fault.message or ""
        return message.strip().partition("\n")[0][:200]


class FailedMessages:
    """The error queues of the services on one open transport."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._counts: tuple[float, dict[str, int | None]] | None = None

    def of(self, service: str) -> DeadLetters:
        return DeadLetters(self.transport, service)

    async def dead_letters(self, service: str) -> list[FailedMessage]:
        """The service's dead letters (none when its queue was never declared here)."""
        try:
            return await self.of(service).list(limit=LIMIT)
        except NoRoute:
            return []

    async def groups(self, services: Sequence[str]) -> list[Group]:
        groups: dict[tuple[str, str, str | None], Group] = {}
        for service in services:
            for failed in await self.dead_letters(service):
                key = (service, failed.fault.reason, failed.fault.exception_type)
                group = groups.setdefault(key, Group(*key))
                group.messages.append(failed)
        return sorted(groups.values(), key=lambda g: (g.service, -len(g.messages), g.reason))

    async def counts(self, services: Sequence[str]) -> dict[str, int | None]:
        """How many dead letters each service has now (up to `LIMIT`; None: unreadable)."""
        now = time.monotonic()
        if self._counts is not None and now - self._counts[0] < COUNT_TTL:
            cached = self._counts[1]
            if all(service in cached for service in services):
                return cached
        counts: dict[str, int | None] = {}
        for service in services:
            try:
                counts[service] = len(await self.of(service).list(limit=LIMIT))
            except NoRoute:
                counts[service] = 0
            except TransportError:
                counts[service] = None
        self._counts = (now, counts)
        return counts

    def forget_counts(self) -> None:
        self._counts = None

    async def get(self, service: str, message_id: str) -> FailedMessage | None:
        try:
            return await self.of(service).get(message_id)
        except NoRoute:
            return None

    async def replay(self, service: str, message_ids: Sequence[str]) -> int:
        self.forget_counts()
        return await self.of(service).replay(list(message_ids))

    async def replay_group(self, service: str, key: str) -> int:
        ids = [m.id for g in await self.groups([service]) if g.key == key for m in g.messages]
        return await self.replay(service, ids) if ids else 0

    async def replay_all(self, services: Sequence[str]) -> int:
        self.forget_counts()
        moved = 0
        for service in services:
            try:
                moved += await self.of(service).replay_all()
            except NoRoute:
                continue
        return moved

    async def purge(self, services: Sequence[str]) -> int:
        self.forget_counts()
        purged = 0
        for service in services:
            try:
                purged += await self.of(service).purge()
            except NoRoute:
                continue
        return purged
