"""Who may replay and purge: the same origin always, and the token when the dashboard has one.

On 127.0.0.1 only this machine reaches the page, and the origin check keeps another site open in
the same browser from posting to it. Listening on any other address, the dashboard needs a token
(`--token`, else one is made and printed at start), asked for on each confirmation page.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request

__all__ = ["Guard", "is_loopback", "new_token"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(18)


class Guard:
    """Checks a replay or purge request."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    @property
    def needs_token(self) -> bool:
        return self.token is not None

    def refusal(self, request: Request, given: str | None) -> str | None:
        """Why this request may not act, or None when it may."""
        origin = request.headers.get("origin")
        host = request.headers.get("host")
        if origin and origin != "null" and urlsplit(origin).netloc != host:
            return f"a request from {origin} may not act on this dashboard"
        if self.token is not None and not hmac.compare_digest((given or "").encode(), self.token.encode()):
            return "the token is missing or wrong"
        return None
