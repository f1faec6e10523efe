"""`tidings dead-letters` from a shell: it looks without creating, says where it looked, asks
before a purge. (The listing, showing and replaying on every transport: tests/recoverability.)"""

from __future__ import annotations

import argparse
import asyncio
import io
from pathlib import Path

import pytest

from tests.cli.shop import Checkout, environment, tidings
from tests.helpers import eventually, running
from tidings import Bus, ConfigurationError, Context, RetryPolicy
from tidings.cli.dead_letters import run_command_async
from tidings.transports import transport_from_url


@pytest.mark.parametrize("variable", [{}, {"TIDINGS_TRANSPORT": ""}], ids=["unset", "empty"])
def test_a_missing_sqlite_file_is_named_and_not_created(tmp_path: Path, variable: dict[str, str]) -> None:
    # An empty $TIDINGS_TRANSPORT is unset, as for a Bus: the default, not a URL without a scheme.
    result = tidings("dead-letters", "list", "--service", "basket", cwd=tmp_path, env=environment(**variable))
    assert result.returncode == 2
    assert (
        f"no SQLite database at {tmp_path.resolve() / 'tidings.db'} (sqlite:///tidings.db)" in result.stderr
    )
    assert "service 'basket'" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_missing_queue_names_the_file_looked_in(tmp_path: Path) -> None:
    async def declare_another_service() -> None:
        async with transport_from_url(f"sqlite:///{tmp_path / 'tidings.db'}") as transport:
            await transport.declare_queue("ordering")

    asyncio.run(declare_another_service())
    result = tidings("dead-letters", "list", "--service", "basket", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        f"no queue 'basket.error' in sqlite:///tidings.db ({tmp_path.resolve() / 'tidings.db'}): "
        "has service 'basket' run on this transport?"
    ) in result.stderr


def test_a_missing_queue_on_rabbitmq_names_the_broker(rabbitmq_url: str, tmp_path: Path) -> None:
    result = tidings("dead-letters", "list", "--service", "nobody", "--transport", rabbitmq_url, cwd=tmp_path)
    assert result.returncode == 2
    assert "no queue 'nobody' at amqp://guest:***@127.0.0.1:" in result.stderr


@pytest.fixture
async def dead_letter(tmp_path: Path) -> str:
    """A SQLite system in `tmp_path/tidings.db` whose service `basket` has one dead letter."""
    bus = Bus("basket", f"sqlite:///{tmp_path / 'tidings.db'}", retry=RetryPolicy.none())

    @bus.handle(Checkout)
    async def checkout(command: Checkout, ctx: Context) -> None:
        raise ValueError(f"no basket for {command.buyer}\nsecond line")

    async with running(bus):
        await bus.send(Checkout(buyer="mallory"))
        await eventually(lambda: bus.stats.dead_lettered == 1)
    return "basket"


def test_list_shows_the_reason_and_the_message(tmp_path: Path, dead_letter: str) -> None:
    result = tidings("dead-letters", "list", "--service", dead_letter, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split()[-2:] == ["SERVICE", "MESSAGE"]
    assert row.split()[2] == "handler-failed"
    assert row.endswith(" no basket for mallory")  # the first line of it


@pytest.mark.parametrize("answer", ["n\n", "", "whatever\n"])
def test_purge_asks_and_anything_but_yes_keeps_them(tmp_path: Path, dead_letter: str, answer: str) -> None:
    result = tidings("dead-letters", "purge", "--service", dead_letter, cwd=tmp_path, stdin=answer)
    assert result.returncode == 1
    assert f"delete every dead letter of service 'basket' in sqlite:///tidings.db ({tmp_path.resolve()}" in (
        result.stderr
    )
    assert "nothing purged" in result.stderr
    assert (
        "no basket for mallory"
        in tidings("dead-letters", "list", "--service", dead_letter, cwd=tmp_path).stdout
    )


@pytest.mark.parametrize(("flag", "answer"), [((), "y\n"), ((), "YES\n"), (("--yes",), ""), (("-y",), "")])
def test_purge_deletes_once_confirmed(
    tmp_path: Path, dead_letter: str, flag: tuple[str, ...], answer: str
) -> None:
    result = tidings("dead-letters", "purge", "--service", dead_letter, *flag, cwd=tmp_path, stdin=answer)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "purged 1 dead letter(s)\n"
    assert ("delete every dead letter" in result.stderr) == (not flag)
    listed = tidings("dead-letters", "list", "--service", dead_letter, cwd=tmp_path, env=environment())
    assert listed.stdout == "no dead letters\n"


async def test_the_async_entry_asks_nothing_and_purges_only_with_yes(
    tmp_path: Path, dead_letter: str
) -> None:
    args = argparse.Namespace(
        action="purge", service=dead_letter, transport=f"sqlite:///{tmp_path / 'tidings.db'}", json=False
    )
    with pytest.raises(ConfigurationError, match="pass --yes"):
        await run_command_async(args, io.StringIO())
    args.yes = True
    out = io.StringIO()
    assert await run_command_async(args, out) == 0
    assert out.getvalue() == "purged 1 dead letter(s)\n"
