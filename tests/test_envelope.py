from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings import DecodeError, Envelope
from tidings.envelope import decode_body, new_message_id

header_keys = st.from_regex(r"[a-z][a-z0-9]{0,8}-[a-z0-9-]{1,10}", fullmatch=True)
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
envelopes = st.builds(
    Envelope,
    type=st.from_regex(r"[A-Za-z][A-Za-z0-9_.:-]{0,30}", fullmatch=True),
    source=st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
    body=st.binary(max_size=200),
    time=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)),
    datacontenttype=st.sampled_from(["application/json", "application/cloudevents+json"]),
    subject=st.none() | text.filter(bool),
    correlation_id=st.none() | st.uuids().map(str),
    causation_id=st.none() | st.uuids().map(str),
    headers=st.dictionaries(header_keys, text, max_size=5),
)


@given(envelopes)
def test_an_envelope_survives_the_trip_through_its_header_map(envelope: Envelope) -> None:
    headers = envelope.to_headers()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    assert Envelope.from_headers(headers, envelope.body) == envelope


def test_the_header_map_holds_the_cloudevents_attributes() -> None:
    envelope = Envelope(type="OrderPlaced", source="ordering", body=b"{}", correlation_id="c-1")
    headers = envelope.to_headers()
    assert headers["specversion"] == "1.0"
    assert headers["type"] == "OrderPlaced"
    assert headers["source"] == "ordering"
    assert headers["datacontenttype"] == "application/json"
    assert headers["correlationid"] == "c-1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", headers["time"])


def test_message_ids_are_uuid7_and_ordered_by_time() -> None:
    ids = [new_message_id() for _ in range(50)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert len(set(ids)) == 50
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)  # the millisecond prefix


@pytest.mark.parametrize("missing", ["id", "source", "type", "specversion"])
def test_a_missing_required_attribute_is_a_decode_error(missing: str) -> None:
    headers = Envelope(type="X", source="s", body=b"{}").to_headers()
    del headers[missing]
    with pytest.raises(DecodeError) as caught:
        Envelope.from_headers(headers, b"{}")
    assert caught.value.reason == "missing-attribute"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe\x00", "not-utf8"),
        (b'{"a": 1', "not-json"),
        (b"[" * 100_000 + b"]" * 100_000, "too-deep"),
        (b'{"n": ' + b"9" * 5000 + b"}", "number-too-large"),
        (b'{"n": NaN}', "not-finite"),
        (b'{"n": -Infinity}', "not-finite"),
    ],
)
def test_hostile_bodies_get_a_reason_code(body: bytes, reason: str) -> None:
    envelope = Envelope(type="X", source="s", body=body)
    with pytest.raises(DecodeError) as caught:
        decode_body(envelope)
    assert caught.value.reason == reason


def test_a_body_over_the_limit_is_refused_before_it_is_parsed() -> None:
    envelope = Envelope(type="X", source="s", body=b"not even json" * 100)
    with pytest.raises(DecodeError) as caught:
        decode_body(envelope, max_size=100)
    assert caught.value.reason == "too-large"
