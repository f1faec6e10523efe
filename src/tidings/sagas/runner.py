"""Running one saga step: find the instance, load it, call the step, save it, or run again.

A step is an ordinary handler to the bus, so it runs inside the inbox transaction
(`ctx.session`): the inbox record, the saga's row and the outbox rows of what the step sends
commit together or not at all. Within that transaction each try of the step is a savepoint:

1. the message's key (`Step.find`); none is a bad message (`Reject`);
2. the row: none and the step does not start the saga, or a completed one: the missing policy
   (ignore and count, or the error queue); a timeout for either is always ignored and counted;
3. a `during=` the instance is not in: ignored and counted (`out_of_state`);
4. the step's method on a fresh `Saga` object; then its `to=` state, if it named one;
5. INSERT (new) or UPDATE .. WHERE version = <read> (existing). Another instance saved first (no
   row updated, or the key inserted meanwhile): the savepoint rolls back, with whatever the step
   wrote and sent, and the step runs again at once on the new state (`SagaStats.conflicts`; not a
   failure of the handler). After `max_conflict_retries` the message goes back for later (`Retry`).

An exception of the step itself propagates: the inbox rolls everything back and the pipeline's
retry policy applies, as for any handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from tidings.context import Context
from tidings.errors import ConfigurationError, Reject, Retry
from tidings.logs import logger
from tidings.messages import Command, Message, wire_name_of
from tidings.sagas.context import SagaContext
from tidings.sagas.declarations import Saga, SagaDefinition, Step, new_state
from tidings.sagas.headers import SAGA_TIMEOUT
from tidings.sagas.settings import SagaSettings
from tidings.sagas.stats import SagaStats, Transition
from tidings.sagas.store import SagaRow, SagaStore

__all__ = ["Listener", "SagaRunner"]

log = logger("tidings.sagas")


Listener = Callable[[Transition], None]


class _Conflict(Exception):
    """Another instance saved the saga first: roll the savepoint back and run the step again."""


class SagaRunner:
    """The handlers of one saga type, one per step, run against the store."""

    def __init__(
        self,
        saga_type: type[Saga[Any]],
        store: SagaStore,
        stats: SagaStats,
        settings: SagaSettings,
        listeners: list[Listener],
    ) -> None:
        self.saga_type = saga_type
        self.definition: SagaDefinition = saga_type.__saga__
        self.store = store
        self.stats = stats
        self.settings = settings
        # Read at each step (the registry's list): a listener added later is told from then on.
        self.listeners = listeners
        self._has_states = bool(self.definition.states)
        # SQLite has one writer at a time, and the inbox's insert made the step's transaction the
        # writer before the saga is read: no other step can save in between, so no conflict can
        # arise and a savepoint (two more statements a step) would buy nothing. Should one arise
        # all the same, the whole transaction goes back, and the message with it (`Retry`).
        self._one_writer = store.engine.dialect.name == "sqlite"
        self._timeouts = frozenset(
            step.message_type for step in self.definition.steps.values() if step.kind == "timeout"
        )

    def handlers(self) -> list[tuple[type[Message], Callable[[Message, Context], Any]]]:
        """(message type, handler) for every step, for the bus to register."""
        return [(step.message_type, self._handler(step)) for step in self.definition.steps.values()]

    def _handler(self, step: Step) -> Callable[[Message, Context], Any]:
        async def handle(message: Message, ctx: Context) -> None:
            await self.run(step, message, ctx)

        handle.__qualname__ = f"{self.saga_type.__qualname__}.{step.method}"
        return handle

    async def run(self, step: Step, message: Message, ctx: Context) -> None:
        session = ctx.session
        if not isinstance(session, AsyncSession):
            raise ConfigurationError("a saga runs in the inbox transaction: Bus(..., database=engine)")
        key = step.find(message, ctx.envelope)
        if key is None or key == "":
            raise Reject(f"{wire_name_of(type(message))} carries no key for saga {self.definition.name}")
        if self._one_writer:
            try:
                await self._try(step, message, ctx, session, key)
            except _Conflict:
                self.stats.conflicts += 1
                self.stats.conflicts_deferred += 1
                raise Retry(0.0, f"saga {self.definition.name} {key!r}: conflict") from None
            return
        for _ in range(self.settings.max_conflict_retries + 1):
            try:
                async with session.begin_nested():
                    await self._try(step, message, ctx, session, key)
                return
            except _Conflict:
                self.stats.conflicts += 1
                log.debug(
                    "saga %s %r: conflict on %s, running the step again",
                    self.definition.name,
                    key,
                    ctx.message_id,
                )
        self.stats.conflicts_deferred += 1
        raise Retry(self.settings.conflict_delay, f"saga {self.definition.name} {key!r}: too many conflicts")

    async def _try(self, step: Step, message: Message, ctx: Context, session: AsyncSession, key: str) -> None:
        name = self.definition.name
        row = await self.store.load(session, name, key)
        if (row is None and not step.starts) or (row is not None and row.completed):
            self._missing(step, ctx, key, row)
            return
        if row is None:
            saga = self.saga_type(key, new_state(self.definition), None)
        else:
            saga = self.saga_type(key, self.definition.state_type.model_validate_json(row.state), row.status)
        before = saga.status
        if row is not None and not step.acts_in(before, has_states=self._has_states):
            self.stats.out_of_state += 1
            log.info(
                "saga %s %r is %s: %s ignored (taken %s)",
                name,
                key,
                before,
                ctx.envelope.type,
                f"during {sorted(step.during)}" if step.during is not None else "by a new instance only",
            )
            return
        sctx = SagaContext(ctx, saga=name, key=key, takes=self._takes)
        await getattr(saga, step.method)(message, sctx)
        self._apply_to(step, saga, before)
        if not saga.has_state:
            raise ConfigurationError(
                f"{type(saga).__name__}.{step.method} started {key!r} without assigning self.state"
            )
        state = saga.state.model_dump_json()
        if row is None:
            try:
                await self.store.insert(
                    session, name, key, status=saga.status, state=state, completed=saga.completed
                )
            except IntegrityError:
                # Only the saga's own insert: another start won the race for this key. (The
                # service's own statements in the step raise as they would in any handler.)
                raise _Conflict() from None
            version = 1
        else:
            saved = await self.store.update(
                session,
                name,
                key,
                version=row.version,
                status=saga.status,
                state=state,
                completed=saga.completed,
            )
            if not saved:
                raise _Conflict()
            version = row.version + 1
        self.stats.steps += 1
        self.stats.started += row is None
        self.stats.completed += saga.completed
        self.stats.timeouts_scheduled += sctx.scheduled
        transition = Transition(
            name, key, ctx.envelope.type, before, saga.status, row is None, saga.completed, version
        )
        for listener in self.listeners:
            listener(transition)

    def _apply_to(self, step: Step, saga: Saga[Any], before: str | None) -> None:
        """Take the step's one `to=` state if the method chose none; refuse one it does not declare."""
        if saga.status == before:
            if len(step.to) == 1:
                saga.become(step.to[0])
            return
        if step.to and saga.status not in step.to:
            raise ConfigurationError(
                f"{type(saga).__name__}.{step.method} moved to {saga.status!r}, not one of {list(step.to)}"
            )

    def _missing(self, step: Step, ctx: Context, key: str, row: SagaRow | None) -> None:
        name = self.definition.name
        what = "completed" if row is not None else "no instance"
        if ctx.headers.get(SAGA_TIMEOUT) == name:
            self.stats.timeouts_ignored += 1
            log.info("saga %s %r: timeout %s ignored (%s)", name, key, ctx.envelope.type, what)
            return
        policy = step.missing or self.definition.missing
        if policy == "dead-letter":
            self.stats.dead_lettered += 1
            raise Reject(f"saga {name} {key!r}: {what} for {ctx.envelope.type}")
        if row is not None:
            self.stats.ignored_completed += 1
        else:
            self.stats.ignored_missing += 1
        log.info("saga %s %r: %s for %s %s, ignored", name, key, what, ctx.envelope.type, ctx.message_id)

    def _takes(self, message_type: type[Command]) -> bool:
        return message_type in self._timeouts
