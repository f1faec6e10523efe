"""The one message of a verification run, and the names of its services.

A command, sent to the consumers' queue: a run names its services after itself, so it never meets
another run's messages nor the user's own services on a shared broker.
"""

from __future__ import annotations

from tidings.messages import Command

__all__ = ["Apply", "consumer_service", "producer_service"]


class Apply(Command, name="tidings-verify.apply"):
    """Apply effect `seq` of producer `producer` (the consumer records it in the ledger)."""

    producer: int
    seq: int


def consumer_service(run: str) -> str:
    """The service (and queue) whose instances apply the effects."""
    return f"tidings-verify-{run}"


def producer_service(run: str) -> str:
    """The service the producers send from, and whose outbox rows they write."""
    return f"tidings-verify-{run}-producer"
