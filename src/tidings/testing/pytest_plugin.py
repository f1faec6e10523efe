"""The pytest plugin of `tidings.testing`: the `tidings_harness` fixture and `--tidings-transport`.

It is registered as the `pytest11` entry point `tidings`, so installing tidings is enough:

    async def test_checkout(tidings_harness: HarnessFactory) -> None:
        async with tidings_harness(build_basket_bus()) as h:
            ...

    pytest                                                     # on a private memory broker each
    pytest --tidings-transport amqp://guest:guest@localhost/   # the same tests on RabbitMQ

With `--tidings-transport URL` every harness the fixture makes runs on a fresh, empty system of that
transport (`fresh_system_url`): a RabbitMQ namespace of its own in the URL's vhost, a SQLite file of
its own in a temporary directory. `memory://` is the default, a private broker per harness.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Protocol, Unpack
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from tidings.bus import Bus
from tidings.testing.harness import Harness, HarnessOptions

__all__ = ["HarnessFactory", "fresh_system_url", "pytest_addoption", "tidings_harness"]

#: The namespace prefix of the RabbitMQ systems made for tests, when the URL names none.
_NAMESPACE = "tidings-test"
# RabbitMQ namespaces are at most 64 characters (tidings.transports.rabbitmq.settings).
_NAMESPACE_ROOM = 64 - 1 - 12


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tidings", "tidings test harness")
    group.addoption(
        "--tidings-transport",
        metavar="URL",
        default=None,
        help=(
            "run the buses of tidings_harness on this transport (amqp://..., sqlite:///...) instead "
            "of a private memory broker; each harness gets a fresh system of it"
        ),
    )


class _MakeDirectory(Protocol):
    def __call__(self) -> Path: ...


class HarnessFactory(Protocol):
    """What the `tidings_harness` fixture is: makes a `Harness` for a bus, with the options of
    `Harness` but `real` (the `--tidings-transport` option decides)."""

    def __call__(self, bus: Bus, **options: Unpack[HarnessOptions]) -> Harness: ...


@pytest.fixture
def tidings_harness(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> HarnessFactory:
    """Makes harnesses: `async with tidings_harness(bus) as h:`, on `--tidings-transport` if given."""
    url: str | None = request.config.getoption("tidings_transport")

    def make(bus: Bus, **options: Unpack[HarnessOptions]) -> Harness:
        real = None if url is None else fresh_system_url(url, lambda: tmp_path_factory.mktemp("tidings"))
        return Harness(bus, real=real, **options)

    return make


def fresh_system_url(url: str, directory: Path | _MakeDirectory) -> str | None:
    """A URL naming a new, empty system on the transport `url` names.

    `amqp://` and `amqps://`: the same broker and vhost, a namespace of its own (the URL's
    namespace, or "tidings-test", plus a random suffix). `sqlite:///`: a new file in `directory`,
    with the URL's options. `memory://`: None, the harness's private broker. Any other URL is
    returned as it is.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    token = uuid.uuid4().hex[:12]
    if scheme == "memory":
        return None
    if scheme == "sqlite":
        folder = directory if isinstance(directory, Path) else directory()
        query = f"?{parts.query}" if parts.query else ""
        return f"sqlite:///{folder / f'bus-{token}.db'}{query}"
    if scheme in ("amqp", "amqps"):
        options = parse_qsl(parts.query, keep_blank_values=True)
        given = dict(options).get("namespace") or _NAMESPACE
        options = [(key, value) for key, value in options if key != "namespace"]
        options.append(("namespace", f"{given[:_NAMESPACE_ROOM]}-{token}"))
        return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(options), parts.fragment))
    return url
