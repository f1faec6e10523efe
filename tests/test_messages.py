from __future__ import annotations

from decimal import Decimal

import pytest

from tidings import Command, Event, InvalidMessageType, Reply
from tidings.messages import wire_name_of


class ProductPriceChanged(Event):
    product_id: int
    new_price: Decimal


class PlaceOrder(Command, name="ordering.place-order"):
    order_id: str


class Quote(Reply):
    price: Decimal


def test_the_wire_name_defaults_to_the_class_name() -> None:
    assert ProductPriceChanged.wire_name == "ProductPriceChanged"
    assert Quote.wire_name == "Quote"


def test_the_name_keyword_sets_the_wire_name() -> None:
    assert PlaceOrder.wire_name == "ordering.place-order"
    assert wire_name_of(PlaceOrder) == "ordering.place-order"


def test_an_explicit_name_is_not_inherited() -> None:
    class PlaceRushOrder(PlaceOrder):
        pass

    assert PlaceRushOrder.wire_name == "PlaceRushOrder"


@pytest.mark.parametrize("bad", ["", "has space", "-leading", "a" * 201, "ünïcode", "x/y"])
def test_an_unusable_wire_name_is_refused_when_the_class_is_made(bad: str) -> None:
    with pytest.raises(InvalidMessageType, match="unusable wire name"):

        class Broken(Event, name=bad):
            pass


def test_the_base_classes_have_no_wire_name() -> None:
    with pytest.raises(InvalidMessageType):
        wire_name_of(Event)
    with pytest.raises(InvalidMessageType):
        wire_name_of(int)


def test_fields_the_receiver_does_not_know_are_ignored() -> None:
    # The sender's class has a field the receiver's class does not: a tolerant reader.
    class SendersOrderPlaced(Event, name="OrderPlaced"):
        order_id: str
        coupon: str

    class ReceiversOrderPlaced(Event, name="OrderPlaced"):
        order_id: str

    body = SendersOrderPlaced(order_id="o-1", coupon="SPRING").model_dump_json()
    assert ReceiversOrderPlaced.model_validate_json(body) == ReceiversOrderPlaced(order_id="o-1")


def test_messages_are_immutable() -> None:
    event = ProductPriceChanged(product_id=1, new_price=Decimal("2.50"))
    with pytest.raises(ValueError, match="frozen"):
        event.product_id = 2  # type: ignore[misc]
