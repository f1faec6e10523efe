"""Bad configuration fails at construction or registration, never at the first message."""

from __future__ import annotations

from pathlib import Path

import pytest

import tidings
from tidings import (
    Bus,
    Command,
    ConfigurationError,
    Context,
    DuplicateHandler,
    Event,
    InvalidMessageType,
    UnknownTransport,
)
from tidings.transports import DEFAULT_TRANSPORT


class PlaceOrder(Command):
    order_id: str


class OrderPlaced(Event):
    order_id: str


@pytest.mark.parametrize("url", ["kafka://localhost:9092", "nonsense", "redis://x"])
def test_an_unknown_transport_url_is_refused_at_construction(url: str) -> None:
    with pytest.raises(UnknownTransport, match=f"no transport for URL '{url}'"):
        Bus("basket", transport=url)


def test_the_unknown_scheme_error_shows_the_whole_url_but_the_password() -> None:
    with pytest.raises(UnknownTransport) as caught:
        Bus("basket", transport="kafka://user:secret@host:9092/shop?acks=all")
    assert "'kafka://user:***@host:9092/shop?acks=all' (unknown scheme 'kafka')" in str(caught.value)
    assert "secret" not in str(caught.value)


def test_an_empty_tidings_transport_is_treated_as_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIDINGS_TRANSPORT", "")
    bus = Bus("basket")
    assert bus.transport.url == DEFAULT_TRANSPORT
    assert not (tmp_path / "tidings.db").exists()  # made, not opened


@pytest.mark.parametrize("service", ["", "   ", "has space"])
def test_a_bus_needs_a_usable_service_name(service: str) -> None:
    with pytest.raises(ConfigurationError):
        Bus(service, transport="memory://")


def test_a_second_handler_for_one_command_is_refused() -> None:
    bus = Bus("ordering", transport="memory://")

    @bus.handle(PlaceOrder)
    async def first(command: PlaceOrder, ctx: Context) -> None: ...

    with pytest.raises(DuplicateHandler, match="PlaceOrder"):

        @bus.handle(PlaceOrder)
        async def second(command: PlaceOrder, ctx: Context) -> None: ...


def test_subscribe_and_handle_check_what_they_are_given() -> None:
    bus = Bus("ordering", transport="memory://")
    with pytest.raises(InvalidMessageType):
        bus.subscribe(PlaceOrder)  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageType):
        bus.handle(OrderPlaced)  # type: ignore[arg-type]
    with pytest.raises(InvalidMessageType):
        bus.subscribe(dict)  # type: ignore[arg-type]


def test_the_default_transport_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIDINGS_TRANSPORT", "memory://from-env")
    assert Bus("basket").transport.url == "memory://from-env"


def test_the_public_api_is_what_all_says() -> None:
    exported = set(tidings.__all__)
    assert {"Bus", "Context", "Event", "Command", "Reply", "RetryPolicy"} <= exported
    for name in tidings.__all__:
        assert hasattr(tidings, name), name
    public = {n for n in vars(tidings) if not n.startswith("_")} - {"annotations"}
    modules = {n for n in public if type(getattr(tidings, n)).__name__ == "module"}
    assert public - modules == exported
