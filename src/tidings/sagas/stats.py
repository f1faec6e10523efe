"""What a service's sagas report: `SagaStats`, counted by the runner (`bus.sagas.stats`), and the
`Transition` of each saved step, told to listeners (`bus.sagas.on_transition`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SagaStats", "Transition"]


@dataclass(slots=True)
class SagaStats:
    """Counters of a service's saga steps, for tests, the demo and health checks."""

    #: Instances created by a starting message.
    started: int = 0
    #: Steps that saved their instance's state (counted at the save: a rollback of the transaction
    #: after it, the commit failing, is not subtracted).
    steps: int = 0
    completed: int = 0
    #: Steps that found their saga's row changed by another instance meanwhile and ran again at once.
    conflicts: int = 0
    #: Conflicted steps that ran out of `max_conflict_retries` and went back to the queue for later.
    conflicts_deferred: int = 0
    #: Messages for a saga that completed, ignored (the `"ignore"` policy).
    ignored_completed: int = 0
    #: Non-starting messages for a saga that does not exist (not started yet, or deleted), ignored.
    ignored_missing: int = 0
    #: Messages for no instance sent to the error queue (the `"dead-letter"` policy).
    dead_lettered: int = 0
    #: Messages the saga took in a state its step does not take them in (`during=`), ignored.
    out_of_state: int = 0
    timeouts_scheduled: int = 0
    #: Timeouts that came for a saga that completed (or is gone) meanwhile: always ignored.
    timeouts_ignored: int = 0


@dataclass(frozen=True, slots=True)
class Transition:
    """A saved step, as told to the listeners (`Sagas.on_transition`): for logs, traces, demos."""

    saga: str
    key: str
    #: The wire name of the message the step took.
    message_type: str
    before: str | None
    after: str | None
    started: bool
    completed: bool
    version: int
