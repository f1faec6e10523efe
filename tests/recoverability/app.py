"""Message types of the recoverability tests, shared with the worker processes they start."""

from __future__ import annotations

from pydantic import Field

from tidings import Command, Event


class Job(Command, name="rec.job"):
    n: int = Field(ge=0)
    note: str = ""


class Other(Command, name="rec.other"):
    n: int


class Happened(Event, name="rec.happened"):
    n: int
