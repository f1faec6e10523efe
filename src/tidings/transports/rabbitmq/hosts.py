"""Several brokers in one URL: `amqp://user:pass@h1:5701,h2:5702,h3:5703/vhost`.

The nodes of one cluster share the user, password, vhost and options, so one URL names them all,
the hosts separated by commas, as other AMQP clients write it. Here the list is split into one
ordinary URL per host: everything else (the AMQP client, the redacted URL in messages) only ever
sees a URL with one host.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["split_hosts", "with_host"]


def split_hosts(url: str) -> tuple[str, tuple[str, ...]]:
    """`url` with its first host only, and every host of its list (`host` or `host:port`).

    A URL with one host comes back as it is, with no hosts. An empty entry (`h1,,h2`, a trailing
    comma) is a `ValueError`: it is a typo, not a host.
    """
    hostlist = urlsplit(url).netloc.rpartition("@")[2]
    if "," not in hostlist:
        return url, ()
    hosts = tuple(host.strip() for host in hostlist.split(","))
    if not all(hosts):
        raise ValueError(f"an empty host in the list {hostlist!r}")
    return with_host(url, hosts[0]), hosts


def with_host(url: str, host: str) -> str:
    """`url` naming `host` (`host` or `host:port`) instead of its own host and port."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}"))
