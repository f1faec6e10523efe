"""`Context`: what a handler knows about the message it handles, and how it talks back.

Messages a handler publishes or sends through its context carry the conversation on: the same
correlation id, and the handled message's id as their causation id. When the bus has a database,
they go through the outbox in the handler's transaction (`session`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Unpack

from tidings.envelope import Envelope
from tidings.messages import Command, Event, Reply
from tidings.sending import PublishOptions, Sender, SendOptions

__all__ = ["Context"]


@dataclass(slots=True)
class Context:
    """The handled message's envelope, and this service's sender, for one handler call."""

    envelope: Envelope
    #: Which call of the handler on this message this is (1 = the first try).
    attempt: int
    queue: str
    #: How messages leave this service (envelopes, routes, transport or outbox).
    sender: Sender
    #: The handler's database session when the bus has a database (the inbox transaction).
    session: Any = None
    items: dict[str, Any] = field(default_factory=dict)

    @property
    def service(self) -> str:
        """The service handling the message (the one its sender sends from)."""
        return self.sender.service

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

    async def publish(self, event: Event, **options: Unpack[PublishOptions]) -> None:
        """Publish an event as part of this conversation (and of this handler's transaction)."""
        conversation: PublishOptions = {**self._conversation(), **options}
        await self.sender.publish(event, **conversation)

    async def send(self, command: Command, **options: Unpack[SendOptions]) -> None:
        """Send a command as part of this conversation (and of this handler's transaction)."""
        conversation: SendOptions = {**self._conversation(), **options}
        await self.sender.send(command, **conversation)

    async def reply(self, reply: Reply) -> None:
        """Answer the request being handled; the reply goes to the instance that asked."""
        await self.sender.reply(self.envelope, reply, session=self.session)

    def _conversation(self) -> PublishOptions:
        """Defaults that carry the conversation on; options the handler gives win."""
        return {
            "session": self.session,
            "correlation_id": self.correlation_id,
            "causation_id": self.message_id,
        }
