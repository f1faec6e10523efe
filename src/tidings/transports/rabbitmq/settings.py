"""The RabbitMQ transport's settings, read from its URL.

    amqp://user:password@host:5672/vhost?namespace=shop&queue_type=quorum&delivery_limit=20
    amqps://user:password@h1:5701,h2:5702,h3:5703/vhost?cafile=/etc/ca.pem    (a cluster, TLS)

The query options tidings reads are the fields of `RabbitMQSettings` and, on `amqps://`, those of
`TLSSettings` (`cafile`, `capath`, `certfile`, `keyfile`, `check_hostname`, `no_verify_ssl`);
`heartbeat`, `frame_max` and `channel_max` go to the AMQP client as they are. Anything else is
refused, so a misspelt option fails loudly instead of being ignored. Several hosts, separated by
commas, are the nodes of one cluster (`hosts`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from tidings.errors import ConnectionFailed
from tidings.transports.rabbitmq.hosts import split_hosts, with_host
from tidings.transports.rabbitmq.tls import TLS_OPTIONS, TLSSettings
from tidings.transports.urls import has_ambiguous_authority, redact_url

__all__ = ["QueueType", "RabbitMQSettings", "TLSSettings", "redact_url"]

# Becomes part of every exchange and queue name, so it stays within AMQP's safe characters.
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$")
_CLIENT_OPTIONS = frozenset({"heartbeat", "frame_max", "channel_max"})


class QueueType(StrEnum):
    """What kind of RabbitMQ queue a service's queue is."""

    #: Replicated, durable, with a broker-enforced delivery limit. The default.
    QUORUM = "quorum"
    #: A single-node classic queue: for brokers or tests that cannot afford quorum queues.
    CLASSIC = "classic"


@dataclass(frozen=True, slots=True, kw_only=True)
class RabbitMQSettings:
    """Where the broker is and how tidings lays out its topology there."""

    #: The broker URL handed to the AMQP client: tidings' own options removed; of several
    #: hosts, the first. Left out of the repr: it holds the password.
    broker_url: str = field(repr=False)
    #: The nodes of a cluster to connect to, in order, as `host` or `host:port`, in place of
    #: `broker_url`'s host: the first that answers is used, and after losing it the next
    #: (docs/rabbitmq.md). Empty: `broker_url`'s host alone.
    hosts: tuple[str, ...] = ()
    #: TLS for `amqps://` (None: the system's CAs, hostname checking, no client certificate).
    tls: TLSSettings | None = None
    #: Refuse a plain `amqp://` URL (before any network I/O): for deployments where a broker
    #: URL without TLS can only be a mistake.
    require_tls: bool = False
    #: Prefix of every exchange and queue name, so several systems can share a vhost.
    namespace: str = "tidings"
    queue_type: QueueType = QueueType.QUORUM
    #: Deliveries a quorum queue allows a message before the broker moves it to the error queue.
    delivery_limit: int = 20
    #: Seconds to wait for the first connection before `ConnectionFailed`.
    connect_timeout: float = 10.0
    #: Seconds a publish may wait for the connection and the broker's confirm together.
    publish_timeout: float = 30.0
    #: Seconds between two reconnection attempts after the connection was lost.
    reconnect_interval: float = 1.0

    def __post_init__(self) -> None:
        if not self.uses_tls:
            if self.require_tls:
                raise ConnectionFailed(
                    f"refusing {redact_url(self.broker_url)!r}: TLS is required (require_tls), "
                    "and an amqp:// URL would send the password in the clear; use amqps://"
                )
            if self.tls is not None:
                raise ConnectionFailed(
                    f"TLS settings given for {redact_url(self.broker_url)!r}, which is not amqps://"
                )

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.broker_url).scheme.lower() == "amqps"

    @property
    def broker_urls(self) -> tuple[str, ...]:
        """One URL per node to try, in order (`broker_url` alone when there is one host)."""
        if not self.hosts:
            return (self.broker_url,)
        return tuple(with_host(self.broker_url, host) for host in self.hosts)

    @property
    def redacted_url(self) -> str:
        if not self.hosts:
            return redact_url(self.broker_url)
        return redact_url(with_host(self.broker_url, ",".join(self.hosts)))

    @property
    def vhost(self) -> str:
        """The vhost the URL names, decoded; `/` when it names none (as the AMQP client reads it)."""
        return unquote(urlsplit(self.broker_url).path[1:]) or "/"

    @property
    def user(self) -> str:
        """The user name the URL names, decoded; the AMQP client's `guest` when it names none."""
        return unquote(urlsplit(self.broker_url).username or "") or "guest"

    @classmethod
    def from_url(
        cls, url: str, *, tls: TLSSettings | None = None, require_tls: bool = False
    ) -> RabbitMQSettings:
        """Read the settings from an `amqp://` or `amqps://` URL; `ConnectionFailed` if unusable.

        `tls` replaces the URL's TLS options; `require_tls` refuses an `amqp://` URL.
        """
        shown = redact_url(url)

        def invalid(detail: str) -> ConnectionFailed:
            return ConnectionFailed(f"invalid RabbitMQ URL {shown!r}: {detail}")

        try:
            parts = urlsplit(url)
        except ValueError as error:
            raise invalid(str(error)) from None
        if has_ambiguous_authority(parts):
            # Before the port: what looks like one may be a piece of the password.
            raise invalid("an '@' after the host: percent-encode '@', '/', '?' and '#' in the user name "
                          "and password (%40, %2F, %3F, %23), and '@' in the vhost and options")  # fmt: skip
        if parts.scheme.lower() not in ("amqp", "amqps"):
            raise invalid("the scheme must be amqp:// or amqps://")
        try:
            first, hosts = split_hosts(url)
        except ValueError as error:
            raise invalid(str(error)) from None
        for host in hosts or (parts.netloc.rpartition("@")[2],):
            try:
                one = urlsplit(with_host(url, host))
                port = one.port  # reading it validates it
            except ValueError as error:
                raise invalid(f"host {host!r}: {error}") from None
            if not one.hostname:
                raise invalid("no host")
            if port == 0:
                raise invalid("port 0")
        options: dict[str, str] = {}
        tls_options: dict[str, str] = {}
        client_options: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in _CLIENT_OPTIONS:
                client_options.append((key, value))
            elif key in TLS_OPTIONS:
                tls_options[key] = value
            elif key in _OPTION_PARSERS:
                options[key] = value
            else:
                known = sorted({*_OPTION_PARSERS, *_CLIENT_OPTIONS, *TLS_OPTIONS})
                raise invalid(f"unknown option {key!r}; known options: {', '.join(known)}")
        parsed: dict[str, object] = {}
        for key, value in options.items():
            try:
                parsed[key] = _OPTION_PARSERS[key](value)
            except ValueError as error:
                raise invalid(f"option {key}={value!r}: {error}") from None
        if tls_options and parts.scheme.lower() != "amqps":
            raise invalid(f"TLS options ({', '.join(sorted(tls_options))}) need an amqps:// URL")
        if tls is None and tls_options:
            try:
                tls = TLSSettings.from_options(tls_options)
            except ValueError as error:
                raise invalid(str(error)) from None
        broker_url = urlunsplit(urlsplit(first)._replace(query=urlencode(client_options), fragment=""))
        return cls(broker_url=broker_url, hosts=hosts, tls=tls, require_tls=require_tls, **parsed)  # type: ignore[arg-type]


def _namespace(value: str) -> str:
    if not _NAMESPACE.match(value):
        raise ValueError("use 1-64 letters, digits and '_.:-', starting with a letter or digit")
    return value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _positive_seconds(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return number


_OPTION_PARSERS = {
    "namespace": _namespace,
    "queue_type": QueueType,
    "delivery_limit": _positive_int,
    "connect_timeout": _positive_seconds,
    "publish_timeout": _positive_seconds,
    "reconnect_interval": _positive_seconds,
}
