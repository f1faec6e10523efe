"""The RabbitMQ codec: message properties encoded byte for byte as pamqp encodes them."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given
from pamqp.commands import Basic

from tidings.transports.rabbitmq.codec import encode_message
from tidings.transports.rabbitmq.properties import Properties

header_keys = st.text(min_size=1, max_size=140)
header_values = st.text(max_size=300)
short_texts = st.none() | st.text(max_size=300)


@given(
    headers=st.none() | st.dictionaries(header_keys, header_values, max_size=8),
    content_type=short_texts,
    message_id=short_texts,
    delivery_mode=st.sampled_from([None, 1, 2]),
)
def test_the_common_properties_encode_exactly_as_pamqp_encodes_them(
    headers: dict[str, str] | None,
    content_type: str | None,
    message_id: str | None,
    delivery_mode: int | None,
) -> None:
    fields = {"headers": headers, "content_type": content_type, "message_id": message_id,
              "delivery_mode": delivery_mode}  # fmt: skip
    try:
        expected: bytes | type[Exception] = Basic.Properties(**fields).marshal()
    except TypeError:  # a string too long for AMQP: pamqp refuses it, and so must we
        expected = TypeError
    try:
        actual: bytes | type[Exception] = Properties(**fields).marshal()
    except TypeError:
        actual = TypeError
    assert actual == expected


@given(
    headers=st.dictionaries(
        header_keys, st.integers(-(2**63), 2**63 - 1) | st.booleans() | st.text(), max_size=5
    )
)
def test_other_properties_and_header_types_are_left_to_pamqp(headers: dict[str, object]) -> None:
    fields = {"headers": headers, "correlation_id": "c-1", "priority": 3, "delivery_mode": 2}
    assert Properties(**fields).marshal() == Basic.Properties(**fields).marshal()


def test_a_tidings_message_is_persistent_and_carries_its_attributes() -> None:
    message = encode_message(
        {"id": "m-1", "type": "Thing", "source": "s", "datacontenttype": "application/json", "x-user": "1"},
        b"{}",
    )
    properties = message.properties
    assert isinstance(properties, Properties)
    assert (properties.delivery_mode, properties.message_id, properties.content_type) == (
        2,
        "m-1",
        "application/json",
    )
    assert properties.headers == {
        "cloudEvents_id": "m-1",
        "cloudEvents_type": "Thing",
        "cloudEvents_source": "s",
        "x-user": "1",
    }
    assert properties.marshal() == Basic.Properties(**{
        name: getattr(properties, name) for name in Basic.Properties.__slots__
    }).marshal()  # fmt: skip
