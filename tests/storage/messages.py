"""The messages of the outbox and inbox tests and of their crash-test processes."""

from __future__ import annotations

from tidings import Command, Event, Reply


class Deposited(Event, name="storage-test.deposited"):
    account: str
    seq: int


class Credit(Command, name="storage-test.credit"):
    account: str
    seq: int


class Ask(Command, name="storage-test.ask"):
    question: str


class Answer(Reply, name="storage-test.answer"):
    text: str
