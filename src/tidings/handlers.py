"""What a service registers: handlers, the middleware around them, and the registrations of both.

    async def handler(message, ctx) -> Reply | None
    async def middleware(ctx, message, call_next) -> Any   # returns await call_next(ctx, message)

`Handlers` holds a service's registrations and middleware. The bus changes it; the pipeline reads
it at each message, so a handler or middleware added to a running bus applies from the next one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tidings.context import Context
from tidings.messages import Message
from tidings.retry import RetryPolicy

__all__ = ["Handler", "Handlers", "Middleware", "Next", "Registration"]


class Handler(Protocol):
    """A user's handler: `async def handle(message, ctx) -> Reply | None`."""

    def __call__(self, message: Any, ctx: Context, /) -> Awaitable[Any]: ...


Next = Callable[[Context, Message], Awaitable[Any]]
#: Middleware wraps the next step: `async def mw(ctx, message, call_next): return await call_next(...)`.
Middleware = Callable[[Context, Message, Next], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Registration:
    """A handler bound to one message type, with an optional retry policy of its own."""

    message_type: type[Message]
    handler: Handler
    retry: RetryPolicy | None = None


@dataclass(slots=True)
class Handlers:
    """One service's handlers by wire name, and its middleware (outermost first)."""

    by_type: dict[str, Registration] = field(default_factory=dict)
    middleware: list[Middleware] = field(default_factory=list)
