"""Running the package's ledger harness (`tidings.verify`) in a chaos test, and reading its figures.

    async with ledger_run(tmp_path, transport=url, database=db, messages=2000) as run:
        ...                           # faults, each `async with run.fault("name")`
        report = await finish(run)    # settle, stop the processes, check; prints the figures

Every run removes what it created (queues, rows, tables) and stops its processes, whatever the
test did; a test that changed the system (a broker stopped, an alarm) restores it in its own
`finally`, inside this block.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from tidings.verify import Report, Run, RunSettings


@contextlib.asynccontextmanager
async def ledger_run(
    directory: Path, *, crash_at: Callable[[], str | None] | None = None, **settings: Any
) -> AsyncIterator[Run]:
    """Set up a run of the harness, start its processes; stop and remove everything after.

    `crash_at` gives each consumer start its `TIDINGS_CRASH_AT` (the first ones included).
    """
    run = Run(RunSettings(directory=directory / "logs", **settings))
    run.crash_at = crash_at
    await run.setup()
    try:
        await run.start()
        yield run
    finally:
        await run.stop()
        await run.teardown()


async def finish(run: Run, *, patience: float = 20.0, what: str = "") -> Report:
    """Wait for the run to settle (or stall for `patience` s), stop its processes, check the ledger.

    Prints the checker's line and the details (`pytest -s` shows them; docs/guarantees.md quotes
    them), with the kills and restarts the run saw.
    """
    complete = await run.settle(patience=patience)
    await run.stop()
    report = await run.report()
    label = f"{what}: " if what else ""
    print(f"\n{label}{report.line()}")
    for line in report.details():
        print(f"{label}{line}")
    print(f"{label}consumers killed {run.kills}, restarts {run.restarts}, settled {complete}")
    return report


async def made_progress(run: Run, messages: int = 20) -> None:
    """Until `messages` more messages were handled (or the producers are done): the system works.

    Scenarios wait for this before each fault, so that processes a fault caught while they started
    (a first connection that fails ends the process; the harness starts it again) come up first.
    """
    before = (await run.progress()).handled
    while not run.producers_done and (await run.progress()).handled < before + messages:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
