"""`tidings tables create` and `tidings relay`: a producer-only service's tables and outbox."""

from __future__ import annotations

import asyncio
import io
import signal
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from tests.cli.shop import COMMAND, PriceChanged, environment, tidings, write_shop
from tests.conftest import unique
from tests.helpers import eventually, running
from tests.sagas.sagas import Counting
from tidings import Bus, Context, NoRoute
from tidings.cli.tables import create_tables
from tidings.transports import transport_from_url


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    write_shop(tmp_path)
    return tmp_path


def test_tables_create_creates_what_is_missing_and_says_so(shop: Path) -> None:
    env = environment(APP_DB=str(shop / "web.db"))
    created = tidings("tables", "create", "shop.web:bus", cwd=shop, env=env)
    assert created.returncode == 0, created.stderr
    assert (
        created.stdout == f"created tidings_inbox, tidings_outbox in sqlite+aiosqlite:///{shop / 'web.db'}\n"
    )
    again = tidings("tables", "create", "shop.web:bus", cwd=shop, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("tidings_inbox, tidings_outbox already exist in ")


def test_tables_create_needs_a_bus_with_a_database(shop: Path) -> None:
    result = tidings("tables", "create", "shop.basket:bus", cwd=shop)
    assert result.returncode == 2
    assert "service 'basket' has no database: Bus(..., database=engine)" in result.stderr


async def test_relay_ships_the_outbox_of_a_service_that_does_not_run(shop: Path) -> None:
    bus_url = f"sqlite:///{shop / 'bus.db'}"
    env = environment(APP_DB=str(shop / "web.db"), TIDINGS_TRANSPORT=bus_url)
    assert tidings("tables", "create", "shop.web:bus", cwd=shop, env=env).returncode == 0

    watcher = Bus("watcher", bus_url)
    seen: list[int] = []

    @watcher.subscribe(PriceChanged)
    async def watch(event: PriceChanged, ctx: Context) -> None:
        seen.append(event.product_id)

    # What the web app does in a request: the event goes into the outbox with its transaction.
    engine = create_async_engine(f"sqlite+aiosqlite:///{shop / 'web.db'}")
    web = Bus("web", bus_url, database=engine)
    async with AsyncSession(engine) as session, session.begin():
        await web.publish(PriceChanged(product_id=7), session=session)
    await engine.dispose()

    async with running(watcher):
        relay = await asyncio.create_subprocess_exec(
            *COMMAND, "relay", "shop.web:bus", cwd=shop, env=env, stderr=asyncio.subprocess.PIPE
        )
        try:
            await eventually(lambda: seen == [7])
        finally:
            relay.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                _, stderr = await relay.communicate()
    log = stderr.decode()
    assert relay.returncode == 0, log
    assert (
        f"relay for web started: outbox in sqlite+aiosqlite:///{shop / 'web.db'}, transport {bus_url}" in log
    )
    assert "relay for web stopped after" in log
    assert ": 1 sent, 0 refusals, 0 outages" in log

    # The relay only ships: it declared no queue for the web service.
    async with transport_from_url(bus_url) as transport:
        with pytest.raises(NoRoute):
            await transport.dead_letters("web")


async def test_tables_create_names_the_saga_table_of_a_bus_with_sagas(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    bus = Bus("counter", f"memory://{unique()}", database=engine)
    bus.saga(Counting)
    out = io.StringIO()
    assert await create_tables(bus, out) == 0
    assert out.getvalue().startswith("created tidings_inbox, tidings_outbox, tidings_sagas in sqlite")
    again = io.StringIO()
    await create_tables(bus, again)
    assert again.getvalue().startswith("tidings_inbox, tidings_outbox, tidings_sagas already exist")
