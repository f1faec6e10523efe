"""The eshop scenario end to end: five OS processes, driven over HTTP, on SQLite and on RabbitMQ.

Each test runs the same scenario as `scripts/demo`, then reads every service's database after the
processes have stopped and checks what is in it, row by row.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest

from examples.eshop.run import Result, run_demo
from examples.eshop.scenario import NOTICE, PAYMENT_TIMEOUT, read_state

pytestmark = pytest.mark.slow

SERVICES = ("catalog", "basket", "ordering", "payment")


async def run(transport: str, workdir: Path, suffix: str = "") -> tuple[Result, dict[str, dict[str, object]]]:
    out = io.StringIO()
    result = await run_demo(transport, workdir, suffix=suffix, out=out)
    trace = out.getvalue()
    assert result.problems == [], trace
    # The trace shows the duplicate and the failed attempt where they happened, and the summary.
    lines = trace.splitlines()
    assert any("basket" in line and "ProductPriceChanged" in line and "DUPLICATE" in line for line in lines)
    assert any("payment" in line and "FAILED attempt 1: ProviderTimeout" in line for line in lines)
    assert any(line.split() == ["result", "everything", "as", "expected"] for line in lines), trace
    # ordering's order process shows its transitions, frank's payment timeout among them.
    assert any(
        "saga" in line and "charging payment -> cancelled (completed) on ordering.payment-timed-out" in line
        for line in lines
    ), trace
    # Read again now that every process has stopped: the state is on disk, not in flight.
    state = read_state({name: workdir / f"{name}.db" for name in SERVICES}, result.outcome.orders)
    return result, state


def check(result: Result, state: dict[str, dict[str, object]]) -> None:
    assert set(result.outcome.orders) == {"alice", "bob", "carol", "dave", "frank"}
    assert result.exit_codes == dict.fromkeys(("gateway", "payment", "ordering", "basket", "catalog"), 0)

    # catalog: tea repriced; stock out for the confirmed orders, back for carol's cancelled one.
    assert state["catalog"]["products"] == {
        "Tea": ("3.50", 100 - 2 - 3),
        "Coffee": ("9.00", 50 - 1 - 2),  # frank's coffee held, then given back
        "Espresso machine": ("450.00", 5),
    }
    assert state["catalog"]["reservations"] == {
        ("alice", "Tea"): (2, "sold"),
        ("alice", "Coffee"): (1, "sold"),
        ("bob", "Coffee"): (2, "sold"),
        ("carol", "Espresso machine"): (1, "released"),
        ("dave", "Tea"): (3, "sold"),
        ("frank", "Coffee"): (1, "released"),  # the saga's compensation after the payment timeout
    }
    # basket: checked-out baskets are empty; erin's still holds tea at the new price. Each buyer who
    # held tea was told once, though ProductPriceChanged was delivered twice.
    assert state["basket"]["lines"] == {("erin", "Tea"): (1, "3.50")}
    assert state["basket"]["notices"] == {"alice": [NOTICE], "dave": [NOTICE], "erin": [NOTICE]}
    # ordering: totals at the price each basket held at checkout (after the price change).
    assert state["ordering"]["orders"] == {
        "alice": ("confirmed", "16.00", None),
        "bob": ("confirmed", "18.00", None),
        "carol": ("cancelled", "450.00", "amount 450.00 is over the limit of 300"),
        "dave": ("confirmed", "10.50", None),
        "frank": ("cancelled", "9.00", f"no answer from payment within {PAYMENT_TIMEOUT} s"),
    }
    assert state["payment"]["payments"] == {
        "alice": ("succeeded", "16.00"),
        "bob": ("succeeded", "18.00"),
        "carol": ("declined", "450.00"),
        "dave": ("succeeded", "10.50"),
        "frank": ("pending", "9.00"),  # the provider never answered
    }

    # The counters: one duplicate suppressed by basket's inbox, dave's charge failed once and was
    # retried later, nothing dead-lettered.
    assert result.stats["basket"]["duplicates"] == 1
    assert sum(stats["duplicates"] for stats in result.stats.values() if "duplicates" in stats) == 1
    assert result.stats["payment"]["failed_attempts"] == 1
    assert result.stats["payment"]["retries_scheduled"] == 1
    assert all(stats.get("dead_lettered", 0) == 0 for stats in result.stats.values())
    # dave's order was seen pending before it was confirmed: the retry took a while.
    assert result.outcome.statuses["dave"][-1] == "confirmed"
    assert any(status.startswith("pending") for status in result.outcome.statuses["dave"])
    assert result.outcome.statuses["carol"][-1].startswith("cancelled")
    assert result.outcome.statuses["frank"][-2:] == [
        "pending (charging payment)",
        f"cancelled: no answer from payment within {PAYMENT_TIMEOUT} s",
    ]


async def test_scenario_on_sqlite(tmp_path: Path) -> None:
    result, state = await run(f"sqlite:///{tmp_path / 'bus.db'}", tmp_path)
    check(result, state)


@pytest.mark.rabbitmq
async def test_scenario_on_rabbitmq(rabbitmq_url: str, name: Callable[[str], str], tmp_path: Path) -> None:
    # The namespace keeps exchanges apart; queues are named after services, hence the suffix.
    result, state = await run(rabbitmq_url, tmp_path, suffix=name(""))
    check(result, state)
