"""The small parts: the crash-point hook, the relay command's refusal, settings validation."""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import pytest

from tidings import Bus, ConfigurationError
from tidings.cli.worker import run_relay
from tidings.inbox import InboxSettings
from tidings.outbox import OutboxSettings
from tidings.storage import crashpoints


def test_a_crash_point_kills_on_the_nth_pass_only_when_named(monkeypatch: pytest.MonkeyPatch) -> None:
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(crashpoints.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    monkeypatch.setattr(crashpoints, "_hits", {})
    monkeypatch.setenv("TIDINGS_CRASH_AT", "relay-after-confirm:3")
    crashpoints.crash_point("inbox-after-commit")
    crashpoints.crash_point("relay-after-confirm")
    crashpoints.crash_point("relay-after-confirm")
    assert kills == []
    crashpoints.crash_point("relay-after-confirm")
    assert kills == [(os.getpid(), signal.SIGKILL)]


def test_without_the_variable_a_crash_point_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crashpoints.os, "kill", lambda pid, sig: pytest.fail("killed"))
    monkeypatch.delenv("TIDINGS_CRASH_AT", raising=False)
    crashpoints.crash_point("relay-after-confirm")


async def test_the_relay_command_needs_a_bus_with_a_database() -> None:
    with pytest.raises(ConfigurationError, match="has no database"):
        await run_relay(Bus("plain", transport="memory://relay-command"))


async def test_create_tables_needs_a_database() -> None:
    bus = Bus("plain", transport="memory://create-tables")
    with pytest.raises(ConfigurationError, match="needs a bus with a database"):
        await bus.create_tables()


def test_database_must_be_an_async_engine() -> None:
    with pytest.raises(ConfigurationError, match="AsyncEngine"):
        Bus("plain", transport="memory://engine", database="sqlite:///x.db")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda: OutboxSettings(batch_size=0),
        lambda: OutboxSettings(poll_interval=0),
        lambda: OutboxSettings(linger=-1),
        lambda: InboxSettings(retention=timedelta(0)),
        lambda: InboxSettings(cleanup_batch_size=0),
    ],
)
def test_unusable_settings_are_refused(make: object) -> None:
    with pytest.raises(ConfigurationError):
        make()  # type: ignore[operator]
