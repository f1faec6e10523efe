"""Dead-letter tooling (the issue's point 6): `tidings.DeadLetters` and `tidings dead-letters`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

import pytest

from tests.helpers import eventually, running
from tests.recoverability.app import Job
from tests.recoverability.raw import RawInjector
from tidings import Bus, Context, DeadLetters, RetryPolicy
from tidings.cli import main
from tidings.envelope import new_message_id
from tidings.headers import ATTEMPT, FAULT_PREFIX


class Service:
    """A service whose handler fails on jobs until `healthy` is set; records what it handled."""

    def __init__(self, make_bus: Callable[..., Bus]) -> None:
        self.make_bus = make_bus
        self.healthy = False
        self.handled: list[tuple[int, str, int, dict[str, str]]] = []

    def bus(self) -> Bus:
        bus = self.make_bus(retry=RetryPolicy.none())

        @bus.handle(Job)
        async def handle(job: Job, ctx: Context) -> None:
            if not self.healthy:
                raise RuntimeError(f"the database is read-only (job {job.n})")
            self.handled.append((job.n, ctx.message_id, ctx.attempt, dict(ctx.headers)))

        return bus

    async def fail(self, *numbers: int) -> dict[int, str]:
        """Send these jobs and let them fail into the error queue; returns their ids by number."""
        bus = self.bus()
        ids = {}
        async with running(bus):
            for n in numbers:
                envelope = bus.sender.envelope_for(Job(n=n), headers={"x-user": "alice"})
                ids[n] = envelope.id
                await bus.transport.send(envelope, bus.queue)
            await eventually(lambda: bus.stats.dead_lettered == len(numbers))
        return ids

    @contextlib.asynccontextmanager
    async def dead_letters(self) -> AsyncIterator[DeadLetters]:
        """The service's `DeadLetters`, on a transport of its own (no consumer running)."""
        async with self.bus() as bus:
            yield DeadLetters(bus.transport, bus.service)

    async def handle_until(self, count: int) -> None:
        self.healthy = True
        bus = self.bus()
        async with running(bus):
            await eventually(lambda: len(self.handled) >= count)


async def test_list_get_replay_and_purge(make_bus: Callable[..., Bus]) -> None:
    service = Service(make_bus)
    ids = await service.fail(1, 2, 3)
    async with service.dead_letters() as dead_letters:
        listed = await dead_letters.list()
        assert sorted(f.id for f in listed) == sorted(ids.values())
        assert {(f.type, f.fault.reason, f.fault.attempts) for f in listed} == {
            ("rec.job", "handler-failed", 1)
        }
        assert (await dead_letters.list(limit=2))[0].id in ids.values()
        assert len(await dead_letters.list(limit=2)) == 2

        found = await dead_letters.get(ids[2])
        assert found is not None
        assert found.fault.message == "the database is read-only (job 2)"
        assert found.message_headers["x-user"] == "alice"
        assert not any(k.startswith(FAULT_PREFIX) for k in found.message_headers)
        assert await dead_letters.get("no-such-id") is None

        assert await dead_letters.replay([ids[2]]) == 1
        assert await dead_letters.replay(["no-such-id"]) == 0
        assert sorted(f.id for f in await dead_letters.list()) == sorted([ids[1], ids[3]])
        with pytest.raises(TypeError):
            await dead_letters.replay(ids[1])  # a string is not a sequence of ids here

    await service.handle_until(1)
    # Replayed: the same id, a fresh attempt count, none of the fault headers.
    [(n, message_id, attempt, headers)] = service.handled
    assert (n, message_id, attempt) == (2, ids[2], 1)
    assert headers["x-user"] == "alice"
    assert ATTEMPT not in headers
    assert not any(k.startswith(FAULT_PREFIX) for k in headers)

    async with service.dead_letters() as dead_letters:
        assert await dead_letters.replay_all() == 2
    await service.handle_until(3)
    assert sorted(n for n, *_ in service.handled) == [1, 2, 3]

    service.healthy = False
    await service.fail(4, 5)
    async with service.dead_letters() as dead_letters:
        assert await dead_letters.purge() == 2
        assert await dead_letters.list() == []


async def cli(*argv: str) -> int:
    # main() runs its own event loop (asyncio.run), so it gets a thread of its own. Nothing else
    # uses the transport meanwhile: the tests run the CLI between consumers, not during one.
    return await asyncio.to_thread(main, list(argv))


async def test_the_command_line_lists_shows_replays_and_purges(
    make_bus: Callable[..., Bus],
    transport_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = Service(make_bus)
    ids = await service.fail(1, 2, 3)
    name = service.bus().service
    where = ["--transport", transport_url, "--service", name]
    capsys.readouterr()

    assert await cli("dead-letters", "list", *where) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ID", "TYPE", "REASON", "ATTEMPTS", "LAST", "FAILURE", "SERVICE", "MESSAGE"]
    assert sorted(line.split()[0] for line in table[1:]) == sorted(ids.values())
    assert all(line.split()[1:4] == ["rec.job", "handler-failed", "1"] for line in table[1:])
    assert all(line.split()[5] == name for line in table[1:])
    # The fault's message, the exception's: why each one failed, without `show`.
    assert sorted(line.split(maxsplit=6)[6] for line in table[1:]) == [
        f"the database is read-only (job {n})" for n in (1, 2, 3)
    ]

    assert await cli("dead-letters", "list", "--json", *where) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(item["id"] for item in listed) == sorted(ids.values())
    assert {item["exception_type"] for item in listed} == {"builtins.RuntimeError"}

    assert await cli("dead-letters", "show", ids[1], *where) == 0
    shown = capsys.readouterr().out
    assert f"id:             {ids[1]}" in shown
    assert "the database is read-only (job 1)" in shown
    assert "x-user: alice" in shown
    assert '{"n":1,"note":""}' in shown  # the body
    assert "RuntimeError" in shown.split("traceback:")[1]

    assert await cli("dead-letters", "show", "--json", ids[1], *where) == 0
    details = json.loads(capsys.readouterr().out)
    assert json.loads(details["body"]) == {"n": 1, "note": ""}
    assert details["headers"]["x-user"] == "alice"
    assert "RuntimeError" in details["traceback"]

    assert await cli("dead-letters", "show", "no-such-id", *where) == 1
    assert "no dead letter" in capsys.readouterr().err

    assert await cli("dead-letters", "replay", ids[1], *where) == 0
    assert "replayed 1 message(s)" in capsys.readouterr().out
    assert await cli("dead-letters", "replay", ids[1], "no-such-id", *where) == 1  # ids[1] is gone
    capsys.readouterr()
    await service.handle_until(1)
    assert [(n, message_id, attempt) for n, message_id, attempt, _ in service.handled] == [(1, ids[1], 1)]

    # The transport comes from $TIDINGS_TRANSPORT when --transport is not given.
    monkeypatch.setenv("TIDINGS_TRANSPORT", transport_url)
    assert await cli("dead-letters", "replay", "--all", "--service", name) == 0
    assert "replayed 2 message(s)" in capsys.readouterr().out
    await service.handle_until(3)
    assert sorted(n for n, *_ in service.handled) == [1, 2, 3]

    service.healthy = False
    await service.fail(4)
    capsys.readouterr()
    assert await cli("dead-letters", "purge", "--yes", "--json", *where) == 0
    assert json.loads(capsys.readouterr().out) == {"purged": 1}
    assert await cli("dead-letters", "list", *where) == 0
    assert capsys.readouterr().out == "no dead letters\n"


async def test_the_command_line_does_not_pass_control_characters_to_the_terminal(
    make_bus: Callable[..., Bus], transport_url: str, raw: RawInjector, capsys: pytest.CaptureFixture[str]
) -> None:
    bus = make_bus()
    headers = {
        "id": new_message_id(),
        "source": "mallory",
        "type": "\x1b]0;pwned\x07\x1b[2J",  # retitle the terminal, clear the screen
        "specversion": "1.0",
    }
    async with running(bus):
        await raw.put(bus.queue, headers, b"{}")
        await eventually(lambda: bus.stats.dead_lettered == 1)
    capsys.readouterr()

    where = ["--transport", transport_url, "--service", bus.service]
    assert await cli("dead-letters", "list", *where) == 0
    assert await cli("dead-letters", "show", headers["id"], *where) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed
    assert "\x07" not in printed
    assert "\\x1b]0;pwned\\x07" in printed


async def test_the_command_line_reports_an_unknown_service(
    transport_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await cli("dead-letters", "list", "--transport", transport_url, "--service", "rec-nobody-here")
    assert code == 2
    assert "rec-nobody-here" in capsys.readouterr().err
