"""`SagaContext`: what a saga step sees besides its state, and how it talks to the world.

It is the handler's `Context` (the conversation carried on, everything through the outbox in the
step's transaction) with one more verb: `timeout`, a message the saga schedules to itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Unpack

from tidings.context import Context
from tidings.envelope import Envelope
from tidings.errors import ConfigurationError
from tidings.messages import Command, Event, Reply
from tidings.sagas.headers import SAGA, SAGA_KEY, SAGA_TIMEOUT
from tidings.sending import PublishOptions, SendOptions

__all__ = ["SagaContext"]


class SagaContext:
    """The step's message context (`Context`) and the saga instance it acts for."""

    def __init__(
        self,
        context: Context,
        *,
        saga: str,
        key: str,
        takes: Callable[[type[Command]], bool],
    ) -> None:
        self.context = context
        #: The saga's name and the instance's key.
        self.saga = saga
        self.key = key
        # Whether this saga has a timeout step for a message type (a timeout nobody takes would
        # arrive as an unknown type).
        self._takes = takes
        #: Timeouts this try of the step scheduled (counted once the step's state is saved).
        self.scheduled = 0

    @property
    def session(self) -> Any:
        """The step's database session: the inbox transaction the saga's state is saved in."""
        return self.context.session

    @property
    def envelope(self) -> Envelope:
        return self.context.envelope

    @property
    def message_id(self) -> str:
        return self.context.message_id

    @property
    def correlation_id(self) -> str:
        return self.context.correlation_id

    @property
    def headers(self) -> Mapping[str, str]:
        return self.context.headers

    @property
    def attempt(self) -> int:
        return self.context.attempt

    @property
    def service(self) -> str:
        return self.context.service

    async def send(self, command: Command, **options: Unpack[SendOptions]) -> None:
        """Send a command, in this step's transaction (it leaves only if the step's state commits)."""
        await self.context.send(command, **options)

    async def publish(self, event: Event, **options: Unpack[PublishOptions]) -> None:
        """Publish an event, in this step's transaction."""
        await self.context.publish(event, **options)

    async def reply(self, reply: Reply) -> None:
        """Answer the request being handled, in this step's transaction."""
        await self.context.reply(reply)

    async def timeout(
        self, message: Command, *, after: timedelta | None = None, at: datetime | None = None
    ) -> None:
        """Schedule `message` to this saga instance, `after` from now or `at` a time.

        It is written to the outbox in this step's transaction and delivered later by the
        transport's scheduled delivery (SQLite rows with a due time, RabbitMQ delay queues), so it
        survives a restart of the service. Its step is declared with `@timeout(type(message))`.
        A timeout that arrives after the saga completed is ignored and counted. There is no
        cancelling one: when it may have become moot, the step's `during=` (or its own check)
        says so.
        """
        if after is None and at is None:
            raise ConfigurationError("timeout() needs after= or at=")
        if not isinstance(message, Command) or not self._takes(type(message)):
            raise ConfigurationError(
                f"saga {self.saga} has no @timeout step for {type(message).__name__}: "
                "declare one, or send the message instead"
            )
        headers = {SAGA: self.saga, SAGA_KEY: self.key, SAGA_TIMEOUT: self.saga}
        await self.context.send(message, to=self.service, delay=after, at=at, headers=headers)
        self.scheduled += 1

    def __repr__(self) -> str:
        return f"SagaContext({self.saga} {self.key!r}, {self.envelope.type} {self.message_id})"
