"""`tidings topology`: what a service declares, derived without a connection, and true to the broker."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from tests.cli.shop import Checkout, PriceChanged, tidings, write_shop
from tests.conftest import rabbitmqctl
from tidings import Bus, Context
from tidings.cli.topology import describe


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    write_shop(tmp_path)
    return tmp_path


def test_on_sqlite_it_prints_the_queues_and_the_event_bindings(shop: Path) -> None:
    result = tidings("topology", "shop.basket:bus", cwd=shop)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"service basket on sqlite:///tidings.db ({shop.resolve() / 'tidings.db'})"
    assert "  basket" in lines
    assert "  basket.error" in lines
    assert "  shop.price-changed  -> basket" in lines
    assert "commands handled (sent to queue basket): shop.checkout" in lines
    assert not (shop / "tidings.db").exists()  # described, not connected to


def test_json_gives_the_same_as_data(shop: Path) -> None:
    result = tidings("topology", "shop.basket:bus", "--json", "--transport", "memory://x", cwd=shop)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "service": "basket",
        "transport": "memory://x",
        "events": ["shop.price-changed"],
        "commands": ["shop.checkout"],
        "queues": [{"name": "basket"}, {"name": "basket.error"}],
        "bindings": [{"event_type": "shop.price-changed", "queue": "basket"}],
        "reply_queue": "basket.replies.<12 hex digits>",
    }


def test_on_rabbitmq_it_prints_exchanges_queue_arguments_and_bindings(shop: Path) -> None:
    # Described from the URL alone: no broker needed.
    url = "amqp://app:s3cret@rabbit.example:5672/shop?namespace=eshop&delivery_limit=5"
    result = tidings("topology", "shop.basket:bus", "--transport", url, cwd=shop)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.splitlines()[0] == (
        "service basket on amqp://app:***@rabbit.example:5672/shop?namespace=eshop&delivery_limit=5 "
        "(vhost shop, namespace eshop)"
    )
    assert "s3cret" not in text
    assert "  eshop.events    topic" in text
    assert "x-queue-type=quorum x-delivery-limit=5 x-dead-letter-exchange=eshop.errors" in text
    assert "  eshop.events    -> eshop.basket: shop.price-changed" in text
    assert "eshop.delay.v2.00 ... eshop.delay.v2.31" in text


def _broker_state(vhost: str, namespace: str) -> dict[str, Any]:
    """What the broker has in `vhost` under `namespace`, less the per-instance reply queues."""

    def listing(*args: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = json.loads(rabbitmqctl(*args, "-p", vhost, "--formatter", "json"))
        return rows

    def ours(name: str) -> bool:
        return name.startswith(f"{namespace}.") and ".replies." not in name

    exchanges = {(e["name"], e["type"]) for e in listing("list_exchanges", "name", "type") if ours(e["name"])}
    queues = {
        q["name"]: dict(_arguments(q["arguments"]))
        for q in listing("list_queues", "name", "arguments")
        if ours(q["name"])
    }
    bindings = {
        (b["source_name"], b["destination_name"], b["routing_key"], b["destination_kind"])
        for b in listing(
            "list_bindings", "source_name", "destination_name", "routing_key", "destination_kind"
        )
        if ours(b["source_name"]) and ours(b["destination_name"])
    }
    return {"exchanges": exchanges, "queues": queues, "bindings": bindings}


def _arguments(arguments: Any) -> list[tuple[str, Any]]:
    # rabbitmqctl's JSON gives a queue's arguments as [name, AMQP type, value] triples.
    return [(name, value) for name, _, value in arguments]


def _described(declared: dict[str, Any]) -> dict[str, Any]:
    return {
        "exchanges": {(e["name"], e["type"]) for e in declared["exchanges"]},
        "queues": {q["name"]: q["arguments"] for q in declared["queues"]},
        "bindings": {
            (b["source"], b["destination"], b["key"], b["destination_type"]) for b in declared["bindings"]
        },
    }


async def test_the_description_is_what_the_broker_has_once_the_bus_started(rabbitmq_url: str) -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed (it lists what the broker has)")
    bus = Bus("basket", rabbitmq_url)

    @bus.subscribe(PriceChanged)
    async def reprice(event: PriceChanged, ctx: Context) -> None: ...

    @bus.handle(Checkout)
    async def checkout(command: Checkout, ctx: Context) -> None: ...

    description = describe(bus)
    parts = urlsplit(rabbitmq_url)
    vhost, namespace = unquote(parts.path[1:]) or "/", description["namespace"]
    async with bus:
        assert _broker_state(vhost, namespace) == _described(description)
        # The delay cascade comes with the first delayed message.
        await bus.send(Checkout(buyer="later"), at=datetime.now(UTC) + timedelta(hours=1))
        expected = _described(description)
        cascade = _described(description["delay_cascade"])
        for key in ("exchanges", "bindings"):
            expected[key] |= cascade[key]
        expected["queues"].update(cascade["queues"])
        assert _broker_state(vhost, namespace) == expected
