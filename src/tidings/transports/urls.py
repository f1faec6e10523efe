"""Transport URLs in messages and logs: the password replaced by `***`.

Here rather than in the RabbitMQ package, which imports aio-pika: an unknown scheme or a failing
transport of any kind names its URL through this, with or without the `rabbitmq` extra.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit, urlunsplit

__all__ = ["has_ambiguous_authority", "redact_url"]


def redact_url(url: str) -> str:
    """`url` with its password replaced by `***`, safe for messages and logs.

    Read from the parsed URL, not by pattern: the password is what follows the user name's `:`
    up to the last `@` of the authority. An `@` after the authority (in the path, query or
    fragment) means an unencoded `/`, `?` or `#` in the password cut the authority short: then
    nothing after the scheme is shown, since any of it may be part of the password.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if has_ambiguous_authority(parts):
        return f"{parts.scheme}://***" if parts.scheme else "***"
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url  # no password to hide
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def has_ambiguous_authority(parts: SplitResult) -> bool:
    """Whether an `@` comes after the authority, so the authority may hold only part of it."""
    # An unencoded `/`, `?` or `#` in the password ends the authority early, leaving the rest of
    # the password (and the real host) in the path, query or fragment, with the `@` after it.
    return "@" in parts.path or "@" in parts.query or "@" in parts.fragment
