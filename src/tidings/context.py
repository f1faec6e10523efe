"""`Context`: what a handler knows about the message it handles, and how it talks back.

Messages a handler publishes or sends through its context carry the conversation on: the same
correlation id, and the handled message's id as their causation id. When the bus has a database,
they go through the outbox in the handler's transaction (`session`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from tidings.envelope import Envelope
from tidings.messages import Command, Event, Reply

if TYPE_CHECKING:
    from tidings.bus import Bus

__all__ = ["Context"]


@dataclass(slots=True)
class Context:
    """The handled message's envelope and the bus, for one handler call."""

    bus: Bus
    envelope: Envelope
    #: Which call of the handler on this message this is (1 = the first try).
    attempt: int
    queue: str
    #: The caller's database session when the bus has a database (the inbox transaction).
    session: Any = None
    items: dict[str, Any] = field(default_factory=dict)

    @property
    def service(self) -> str:
        return self.bus.service

    @property
    def message_id(self) -> str:
        return self.envelope.id

    @property
    def correlation_id(self) -> str:
        return self.envelope.correlation_id or self.envelope.id

    @property
    def causation_id(self) -> str | None:
        return self.envelope.causation_id

    @property
    def headers(self) -> Mapping[str, str]:
        return self.envelope.headers

    async def publish(
        self,
        event: Event,
        *,
        at: datetime | None = None,
        subject: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish an event as part of this conversation."""
        await self.bus.publish(
            event,
            at=at,
            subject=subject,
            headers=headers,
            session=self.session,
            correlation_id=self.correlation_id,
            causation_id=self.message_id,
        )

    async def send(
        self,
        command: Command,
        *,
        to: str | None = None,
        delay: timedelta | None = None,
        at: datetime | None = None,
        subject: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send a command as part of this conversation."""
        await self.bus.send(
            command,
            to=to,
            delay=delay,
            at=at,
            subject=subject,
            headers=headers,
            session=self.session,
            correlation_id=self.correlation_id,
            causation_id=self.message_id,
        )

    async def reply(self, reply: Reply) -> None:
        """Answer the request being handled; the reply goes to the instance that asked."""
        await self.bus.reply_to(self, reply)
