"""`tidings asyncapi`: the eshop's AsyncAPI 3.0.0 document, checked against AsyncAPI's own schema.

The schema is `@asyncapi/specs` 6.11.1's `schemas/3.0.0.json`, vendored in `tests/asyncapi_spec/`
with its licence (see the README there), so the check needs no network.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry
from referencing.jsonschema import DRAFT7

from examples.eshop import messages as m
from examples.eshop.buses import build_all
from examples.eshop.service import Names
from tidings import Bus, Command, Context, Event, Reply
from tidings.asyncapi import asyncapi_document
from tidings.cli.asyncapi import to_yaml
from tidings.errors import ConfigurationError, InvalidMessageType

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).with_name("asyncapi_spec") / "asyncapi-3.0.0.json"
AMQP = "amqp://guest:s3cret@rabbit.example:5672/shop?namespace=eshop"
ESHOP = [f"examples.eshop.buses:{name}" for name in ("gateway", "catalog", "basket", "ordering", "payment")]


@functools.cache
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    # The bundled schema carries every definition it refers to, each under its own $id.
    registry: Registry[Any] = Registry().with_resources(
        (uri, DRAFT7.create_resource(definition)) for uri, definition in schema["definitions"].items()
    )
    return jsonschema.Draft7Validator(
        schema, registry=registry, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )


def check_valid(document: dict[str, Any]) -> None:
    errors = sorted(validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])
    # The schema cannot see references: every one must point at something in the document, and an
    # operation's messages must be its channel's (AsyncAPI 3.0: "a subset of the channel's").
    for pointer in _references(document):
        assert _resolve(document, pointer) is not None, pointer
    for key, operation in document["operations"].items():
        channel = operation["channel"]["$ref"]
        for message in operation.get("messages", []):
            assert message["$ref"].startswith(channel + "/messages/"), (key, message)
        reply = operation.get("reply")
        if reply:
            for message in reply["messages"]:
                assert message["$ref"].startswith(reply["channel"]["$ref"] + "/messages/"), key


def _references(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _references(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _references(value)]
    return []


def _resolve(document: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = document
    for part in pointer[2:].split("/"):
        node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
    return node


def eshop_document(transport: str) -> dict[str, Any]:
    return asyncapi_document(list(build_all(Names(), transport).values()))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    environment.pop("TIDINGS_TRANSPORT", None)
    return subprocess.run(
        [sys.executable, "-m", "tidings", "--log-level", "warning", "asyncapi", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- the eshop's document ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", [AMQP, "sqlite:///eshop-bus.db", "memory://eshop"])
def test_the_eshop_document_is_valid_asyncapi_3(transport: str) -> None:
    document = eshop_document(transport)
    assert document["asyncapi"] == "3.0.0"
    check_valid(document)


def test_the_schema_check_catches_what_is_wrong() -> None:
    # A check that passes everything proves nothing: a wrong action and a dangling channel fail.
    document = eshop_document(AMQP)
    document["operations"]["basket.receive.basket.checkout"]["action"] = "consume"
    assert any(validator().iter_errors(document))
    document = eshop_document(AMQP)
    document["operations"]["basket.receive.basket.checkout"]["channel"] = {"$ref": "#/channels/nowhere"}
    with pytest.raises(AssertionError):
        check_valid(document)


def test_basket_receives_checkout_on_its_queue_and_replies_with_the_result() -> None:
    document = eshop_document(AMQP)
    queue = document["channels"]["queue.basket"]
    assert queue["address"] == "eshop.basket"
    assert queue["bindings"]["amqp"]["is"] == "queue"
    assert queue["bindings"]["amqp"]["queue"]["name"] == "eshop.basket"
    assert queue["bindings"]["amqp"]["queue"]["vhost"] == "shop"
    assert set(queue["messages"]) == {"basket.add-item", "basket.get", "basket.checkout"}

    checkout = document["operations"]["basket.receive.basket.checkout"]
    assert checkout["action"] == "receive"
    assert checkout["channel"] == {"$ref": "#/channels/queue.basket"}
    assert checkout["messages"] == [{"$ref": "#/channels/queue.basket/messages/basket.checkout"}]
    # CheckoutResult is what the handler's return annotation names; any request may get a fault.
    assert checkout["reply"]["address"] == {
        "location": "$message.header#/tidings-reply-to",
        "description": "the requesting instance's reply queue",
    }
    assert checkout["reply"]["messages"] == [
        {"$ref": "#/channels/replies/messages/basket.checkout-result"},
        {"$ref": "#/channels/replies/messages/tidings.fault"},
    ]
    assert document["channels"]["replies"]["address"] is None  # named at run time

    # The gateway sends it there: through the commands exchange, routing key = the queue's name.
    sent = document["operations"]["gateway.send.basket.checkout"]
    assert sent["action"] == "send"
    assert sent["channel"] == {"$ref": "#/channels/queue.basket"}
    assert sent["bindings"]["amqp"] == {
        "cc": ["basket"],
        "deliveryMode": 2,
        "mandatory": True,
        "bindingVersion": "0.3.0",
    }
    assert "eshop.commands" in sent["description"]

    message = document["components"]["messages"]["basket.checkout"]
    assert message["name"] == "basket.checkout"
    assert message["title"] == "CheckoutBasket"
    assert message["payload"] == {"$ref": "#/components/schemas/CheckoutBasket"}
    assert document["components"]["schemas"]["CheckoutBasket"]["required"] == ["buyer"]


def test_ordering_subscribes_to_the_stock_and_payment_events_on_the_events_exchange() -> None:
    document = eshop_document(AMQP)
    subscribed = {
        key: operation["channel"]["$ref"]
        for key, operation in document["operations"].items()
        if key.startswith("ordering.receive.") and "/channels/event." in operation["channel"]["$ref"]
    }
    assert sorted(subscribed.values()) == [
        "#/channels/event.PaymentFailed",
        "#/channels/event.PaymentSucceeded",
        "#/channels/event.StockReservationFailed",
        "#/channels/event.StockReserved",
    ]
    channel = document["channels"]["event.PaymentSucceeded"]
    assert channel["address"] == "PaymentSucceeded"  # the routing key
    assert channel["bindings"]["amqp"]["is"] == "routingKey"
    assert channel["bindings"]["amqp"]["exchange"] == {
        "name": "eshop.events",
        "type": "topic",
        "durable": True,
        "autoDelete": False,
        "vhost": "shop",
    }
    # Its publisher declared it: payment sends on the same channel, routing key = the wire name.
    published = document["operations"]["payment.send.PaymentSucceeded"]
    assert published["channel"] == {"$ref": "#/channels/event.PaymentSucceeded"}
    assert published["bindings"]["amqp"]["cc"] == ["PaymentSucceeded"]
    # And ordering's routed commands go to the owners' queues.
    assert document["operations"]["ordering.send.payment.charge"]["channel"] == {
        "$ref": "#/channels/queue.payment"
    }


def test_payloads_are_the_models_json_schema_as_tidings_writes_them() -> None:
    document = eshop_document(AMQP)
    schemas = document["components"]["schemas"]
    place_order = schemas["PlaceOrder"]
    assert place_order["properties"]["lines"]["items"] == {"$ref": "#/components/schemas/Line"}
    assert schemas["Line"]["properties"]["unit_price"]["type"] == "string"  # a Decimal, as text
    assert schemas["Line"]["description"] == m.Line.__doc__
    # `#/components/schemas/...` resolves inside the schema given: the components ride along.
    payload = {**place_order, "components": document["components"]}
    line = m.Line(product_id=1, product_name="Tea", unit_price=Decimal("2.50"), quantity=2)
    body = json.loads(m.PlaceOrder(order_id="o-1", buyer="ada", lines=[line]).model_dump_json())
    jsonschema.validate(body, payload)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**body, "lines": [{"product_id": 1}]}, payload)


def test_headers_are_the_cloudevents_attributes_as_each_transport_carries_them() -> None:
    amqp = eshop_document(AMQP)
    headers = amqp["components"]["schemas"]["tidings.Headers"]
    assert headers["required"] == [
        "cloudEvents_id",
        "cloudEvents_source",
        "cloudEvents_type",
        "cloudEvents_specversion",
    ]
    assert "datacontenttype" not in headers["properties"]  # AMQP's content_type property
    message = amqp["components"]["messages"]["ProductPriceChanged"]
    assert message["headers"]["allOf"][1]["properties"] == {
        "cloudEvents_type": {"const": "ProductPriceChanged"}
    }
    assert message["correlationId"]["location"] == "$message.header#/cloudEvents_correlationid"
    server = amqp["servers"]["rabbitmq"]
    assert server["host"] == "rabbit.example:5672"
    assert server["pathname"] == "/shop"
    assert "s3cret" not in json.dumps(amqp)  # the password never reaches the document

    sqlite = eshop_document("sqlite:///eshop-bus.db")
    assert sqlite["components"]["schemas"]["tidings.Headers"]["required"] == [
        "id",
        "source",
        "type",
        "specversion",
    ]
    assert "servers" not in sqlite
    assert all("bindings" not in channel for channel in sqlite["channels"].values())
    assert sqlite["channels"]["queue.basket"]["address"] == "basket"
    assert sqlite["x-tidings-transport"] == "sqlite"


# -- what the document is made from --------------------------------------------------------------


class Pinged(Event):
    n: int


class Ping(Command, name="t.ping"):
    n: int


class Pong(Reply, name="t.pong"):
    n: int


def test_only_declared_publishes_make_send_operations() -> None:
    bus = Bus("pinger", "memory://declared")
    assert "pinger.send.Pinged" not in asyncapi_document([bus])["operations"]
    bus.declare_publishes(Pinged)
    document = asyncapi_document([bus])
    assert document["operations"]["pinger.send.Pinged"]["action"] == "send"
    assert dict(bus.publishes) == {"Pinged": Pinged}
    check_valid(document)
    with pytest.raises(InvalidMessageType):
        bus.declare_publishes(Ping)


def test_a_reply_comes_from_the_handlers_return_annotation_only_when_it_resolves() -> None:
    bus = Bus("ponger", "memory://replies")

    @bus.handle(Ping)
    async def ping(command: Ping, ctx: Context) -> Pong | None:
        return Pong(n=command.n)

    class Handler:
        async def __call__(self, command: Unresolvable, ctx: Context) -> Unresolvable:  # noqa: F821
            raise NotImplementedError

    class Other(Command, name="t.other"):
        pass

    bus.handle(Other)(Handler())
    document = asyncapi_document([bus])
    assert document["operations"]["ponger.receive.t.ping"]["reply"]["messages"][0] == {
        "$ref": "#/channels/replies/messages/t.pong"
    }
    assert "reply" not in document["operations"]["ponger.receive.t.other"]
    check_valid(document)


def test_buses_of_different_systems_or_one_service_twice_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="different systems"):
        asyncapi_document([Bus("a", AMQP), Bus("b", AMQP.replace("namespace=eshop", "namespace=other"))])
    with pytest.raises(ConfigurationError, match="one bus per service"):
        asyncapi_document([Bus("a", "memory://twice"), Bus("a", "memory://twice")])
    with pytest.raises(ConfigurationError):
        asyncapi_document([])


def test_yaml_without_pyyaml_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(ConfigurationError, match=r"pip install 'tidings\[asyncapi\]'"):
        to_yaml({"asyncapi": "3.0.0"})


# -- the command -------------------------------------------------------------------------------


def test_the_command_prints_the_valid_document_of_the_buses_named() -> None:
    done = run_cli(*ESHOP, "--transport", AMQP, "--title", "eshop", "--api-version", "2.1.0")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    check_valid(printed)
    expected = asyncapi_document(list(build_all(Names(), AMQP).values()), title="eshop", version="2.1.0")
    assert printed == json.loads(json.dumps(expected))


def test_the_command_prints_yaml_that_reads_back_as_the_same_document() -> None:
    yaml = pytest.importorskip("yaml")
    as_json = run_cli(*ESHOP, "--transport", AMQP)
    as_yaml = run_cli(*ESHOP, "--transport", AMQP, "--yaml")
    assert as_json.returncode == 0, as_json.stderr
    assert as_yaml.returncode == 0, as_yaml.stderr
    assert not as_yaml.stdout.lstrip().startswith("{")
    assert yaml.safe_load(as_yaml.stdout) == json.loads(as_json.stdout)


def test_the_command_says_what_is_wrong_with_a_bus_path() -> None:
    done = run_cli("examples.eshop.buses:nothing")
    assert done.returncode == 2
    assert "no attribute 'nothing'" in done.stderr
