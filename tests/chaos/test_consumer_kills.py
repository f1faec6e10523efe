"""Consumers SIGKILLed again and again, before and after their handler's commit: effects exactly once.

Each consumer process is started with a crash point armed at a random count (`verify-before-commit`:
the effect written, the transaction not committed; `inbox-after-commit`: committed, not
acknowledged), and on top a random live consumer is SIGKILLed about every second while the stream
flows; the harness starts each dead one again. The negative controls take the inbox away (the
effect is committed on its own, then acknowledged: a kill in between applies it twice) or
acknowledge before the effect (a kill in between loses it), and the checker must see it.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.chaos.conftest import SYSTEMS, System, full_only
from tests.chaos.ledger import finish, ledger_run
from tests.sizes import FULL, size
from tidings.verify import Report, Run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

POINTS = ("verify-before-commit", "inbox-after-commit")


def crash_points(rng: random.Random, points: tuple[str, ...], unarmed: float) -> str | None:
    """A crash point for the next consumer start (none for a share `unarmed` of the starts)."""
    if rng.random() < unarmed:
        return None
    return f"{rng.choice(points)}:{rng.randint(1, 40)}"


async def kill_while_streaming(run: Run, rng: random.Random) -> None:
    """SIGKILL a random live consumer every 0.5-1.5 s until the producers are done."""
    while not run.producers_done:
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        run.kill_consumer()


async def stream(
    tmp_path: Path,
    system: System,
    messages: int,
    *,
    patience: float = 20.0,
    points: tuple[str, ...] = POINTS,
    kills: bool = True,
    **settings: object,
) -> tuple[Report, Run]:
    """A stream with consumers dying at crash points (armed on two starts in three, or on every
    start without `kills`), and with `kills` SIGKILLed at random moments too."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    async with ledger_run(
        tmp_path, transport=system.transport, database=system.database, messages=messages,
        rate=100, consumers=2, crash_at=lambda: crash_points(rng, points, 1 / 3 if kills else 0),
        **settings,
    ) as run:  # fmt: skip
        if kills:
            await kill_while_streaming(run, rng)
        report = await finish(run, patience=patience, what="consumer kills")
    return report, run


@pytest.mark.parametrize("system", SYSTEMS if FULL else SYSTEMS[:1], indirect=True)
async def test_consumers_killed_before_and_after_their_commit_apply_each_effect_once(
    tmp_path: Path, system: System
) -> None:
    report, run = await stream(tmp_path, system, size(200, 6000))
    assert run.kills + run.restarts["consumer"] > 2  # the faults did happen
    assert report.lost == 0
    assert report.duplicate_effects == 0
    assert report.dead_lettered == 0
    assert report.handled == report.confirmed == report.sent


@pytest.mark.parametrize("system", SYSTEMS[:1], indirect=True)
async def test_negative_control_without_the_inbox_effects_happen_twice(
    tmp_path: Path, system: System
) -> None:
    # Killed only at the inbox's window (committed, not acknowledged): every such death is a duplicate.
    report, run = await stream(
        tmp_path, system, size(150, 2000), consumer_control="no-inbox", points=("inbox-after-commit",),
        kills=False,
    )  # fmt: skip
    assert run.restarts["consumer"] > 0
    assert report.duplicate_effects > 0


@full_only  # one control of this scenario in the smoke set
@pytest.mark.parametrize("system", SYSTEMS[:1], indirect=True)
async def test_negative_control_acknowledging_before_the_effect_loses_effects(
    tmp_path: Path, system: System
) -> None:
    report, _ = await stream(
        tmp_path,
        system,
        size(300, 2000),
        consumer_control="ack-before-effect",
        points=("inbox-after-commit",),
    )
    assert report.lost > 0
