"""A bus running in the background of another task, under supervision: `Bus.running()`.

    async with bus.running():   # started; consuming, and relaying the outbox, in the background
        ...                     # serve HTTP, or whatever the task is there for
    # stopped: in-flight handlers finished and settled their messages, then disconnected

On entry the bus starts (connects, declares its queue and bindings); an error there is raised at
once, so an app that cannot reach its broker fails at startup rather than serving without it. Then
a background task runs `run()` (the consumer, with a database the relay and the inbox clean-up)
and watches how it ends:

- it returned: `stop()` or `close()` was called; nothing to do.
- a transient error (`is_transient`: the transport or a dependency failed, `TransportError` or
  `Unavailable`): logged with its traceback, and after a capped exponential wait (`restart_delay`
  doubling up to `max_restart_delay`; back to the first wait after a run that lasted that longest
  wait) the service's queue and bindings are declared again and `run()` starts again. A deleted
  queue comes back; a broker that is still down fails the next round, and the wait grows.
- any other error is fatal (`ConfigurationError`, `TransportClosed`, a bug: restarting would meet
  it again): the task in the `async with` block is cancelled, as `asyncio.TaskGroup` does, and the
  error is raised out of the block in place of that cancellation, the bus stopped and closed.

On exit the bus is closed as `Bus.close()` does it: no new message is taken, in-flight handlers
finish and settle theirs (within `shutdown_grace`), the relay ships what they wrote, then the
transport is closed. A fatal error that came while stopping is raised from the exit.

This module knows nothing of `Bus`: it gets the bus's lifecycle as callables.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from tidings.backoff import capped_exponential
from tidings.errors import ConfigurationError, TransportClosed, TransportError, Unavailable
from tidings.logs import logger

__all__ = ["Supervisor", "is_transient"]

log = logger("tidings.supervision")

Step = Callable[[], Awaitable[None]]


def is_transient(error: BaseException) -> bool:
    """Whether a consumer that ended with `error` is worth starting again after a wait.

    The transport or a dependency failing (`TransportError`, `Unavailable`) may pass. A transport
    closed under the running bus (`TransportClosed`) will not reopen by itself, and anything else
    (`ConfigurationError`, an error that is no `TidingsError`: a bug) would only happen again.
    """
    if isinstance(error, TransportClosed):
        return False
    return isinstance(error, TransportError | Unavailable)


class Supervisor:
    """`async with` it to run a bus in the background of the current task (see the module)."""

    def __init__(
        self,
        service: str,
        *,
        start: Step,
        run: Step,
        redeclare: Step,
        close: Step,
        restart_delay: float = 0.5,
        max_restart_delay: float = 30.0,
    ) -> None:
        if not 0 < restart_delay <= max_restart_delay:
            raise ConfigurationError("running() needs 0 < restart_delay <= max_restart_delay")
        self.service = service
        self._start, self._run, self._redeclare, self._close = start, run, redeclare, close
        self._restart_delay = restart_delay
        self._max_restart_delay = max_restart_delay
        #: How many times `run()` was started again after a transient failure.
        self.restarts = 0
        self._entered = False
        self._host: asyncio.Task[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wake = asyncio.Event()
        self._fatal: BaseException | None = None
        # Whether the host task was cancelled to end the block on a fatal error.
        self._cancelled_host = False

    async def __aenter__(self) -> Self:
        if self._entered:
            raise ConfigurationError("each bus.running() is entered once; call bus.running() again")
        self._entered = True
        self._host = asyncio.current_task()
        try:
            await self._start()
        except BaseException:
            # Half started (connected, not declared): disconnect before the error goes up.
            with contextlib.suppress(Exception):
                await self._close()
            raise
        self._task = asyncio.create_task(self._supervise(), name=f"tidings {self.service}: running")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        self._wake.set()
        # Take back the cancellation this supervisor asked for: one from elsewhere still counts.
        cancelled_elsewhere = False
        if self._cancelled_host and self._host is not None:
            cancelled_elsewhere = self._host.uncancel() > 0
        try:
            # Stops the run() going on gracefully (in-flight handlers settle), then disconnects.
            await self._close()
        finally:
            if self._task is not None:
                if not self._task.done():
                    # Only when close() was cut short (cancelled): no task is left behind.
                    self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        fatal = self._fatal
        if fatal is None:
            return
        ours = self._cancelled_host and isinstance(exc, asyncio.CancelledError) and not cancelled_elsewhere
        if exc is None or ours:
            # The block ended because of this error (in place of the cancellation that ended it),
            # or the error came while stopping: raise it.
            raise fatal
        # The block's own exception (or an outside cancellation) goes on; say what else happened.
        log.error("%s: the bus had failed too: %r", self.service, fatal, exc_info=fatal)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        restarting = False
        while not self._closing:
            began = loop.time()
            try:
                if restarting:
                    # A deleted queue or a lost binding comes back (declaring is idempotent).
                    await self._redeclare()
                    if self._closing:
                        return
                    self.restarts += 1
                await self._run()
                return  # stopped: stop() or close()
            except Exception as error:
                if self._closing and isinstance(error, TransportClosed):
                    return  # closed for the exit while a restart was under way: nothing lost
                if not is_transient(error):
                    self._fail(error)
                    return
                if self._closing:
                    log.warning("%s: consuming failed while stopping: %r", self.service, error)
                    return
                if loop.time() - began >= self._max_restart_delay:
                    failures = 0  # it ran well for a while: a new failure starts from the first wait
                delay = capped_exponential(self._restart_delay, self._max_restart_delay, failures)
                failures += 1
                log.warning(
                    "%s: consuming failed (%r); starting again in %.3g s",
                    self.service,
                    error,
                    delay,
                    exc_info=error,
                    extra={"restart_delay": delay},
                )
                restarting = True
                # Woken early by the exit: no restart after the block has ended.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    def _fail(self, error: BaseException) -> None:
        self._fatal = error
        if self._closing:
            return  # the exit is under way: it raises the error once the bus is closed
        log.error("%s: consuming failed for good (%r): ending bus.running()", self.service, error)
        host = self._host
        if host is not None and not host.done():
            self._cancelled_host = True
            host.cancel(f"tidings {self.service}: the bus failed")
