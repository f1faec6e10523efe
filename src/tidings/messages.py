"""Message types: `Event`, `Command`, `Reply`, and their wire names.

A message class has a stable wire name, independent of its Python module path: the class name by
default, or the `name=` class keyword::

    class PlaceOrder(Command, name="ordering.place-order"):
        order_id: str

Receivers are tolerant readers: fields their class does not declare are ignored, so two services may
each hold their own class for one wire name.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from tidings.errors import InvalidMessageType

__all__ = ["Command", "Event", "Message", "Reply", "validate_wire_name", "wire_name_of"]

# Letters, digits and a little punctuation: safe as an AMQP routing key, a SQL value and a header.
_WIRE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,199}$")


def validate_wire_name(name: object) -> str:
    """Return `name` if it can be a wire name, else raise `InvalidMessageType`."""
    if not isinstance(name, str) or not _WIRE_NAME.match(name):
        raise InvalidMessageType(
            f"unusable wire name {name!r}: use 1-200 characters of letters, digits and '_.:-', "
            "starting with a letter or digit"
        )
    return name


class Message(BaseModel):
    """Base of every message. Subclass `Event`, `Command` or `Reply`, not this."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    wire_name: ClassVar[str]
    kind: ClassVar[str] = "message"

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__ in {"Event", "Command", "Reply"} and cls.__module__ == __name__:
            return
        # An explicit name is never inherited: a subclass without one takes its own class name.
        cls.wire_name = validate_wire_name(name if name is not None else cls.__name__)


class Event(Message):
    """A fact that happened (past tense: `OrderPlaced`); published to every subscribing service."""

    kind: ClassVar[str] = "event"


class Command(Message):
    """An order to one service (imperative: `PlaceOrder`); sent to the service that owns it."""

    kind: ClassVar[str] = "command"


class Reply(Message):
    """The answer to a command sent with `Bus.request`; travels back as a message of its own."""

    kind: ClassVar[str] = "reply"


def wire_name_of(message_type: object) -> str:
    """The wire name of a message class, or `InvalidMessageType` for anything else."""
    if not (
        isinstance(message_type, type)
        and issubclass(message_type, Message)
        and message_type not in (Message, Event, Command, Reply)
    ):
        raise InvalidMessageType(f"{message_type!r} is not an Event, Command or Reply class")
    return validate_wire_name(getattr(message_type, "wire_name", None))
