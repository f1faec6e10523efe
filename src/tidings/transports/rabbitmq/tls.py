"""TLS for `amqps://`: which CA to trust, the client's certificate, hostname checking.

`TLSSettings` is read from the URL's options (`cafile`, `capath`, `certfile`, `keyfile`,
`check_hostname`, `no_verify_ssl`) or given in `RabbitMQSettings(tls=...)`; tidings makes the
`ssl.SSLContext` itself and hands it to the AMQP client, so that every node of a cluster is
checked the same way and a file that cannot be read is a `ConnectionFailed` saying which.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass

from tidings.errors import ConnectionFailed

__all__ = ["TLS_OPTIONS", "TLSSettings", "describe_tls_error"]

#: The URL options that configure TLS (only on `amqps://`).
TLS_OPTIONS = frozenset({"cafile", "capath", "certfile", "keyfile", "check_hostname", "no_verify_ssl"})

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSSettings:
    """How an `amqps://` connection checks the broker and shows itself to it."""

    #: PEM file of the CAs to trust instead of the system's (with `capath`, in addition to it).
    cafile: str | None = None
    #: Directory of CA certificates (hashed names, `openssl rehash`).
    capath: str | None = None
    #: The client certificate (PEM), for a broker that asks for one (`fail_if_no_peer_cert`).
    certfile: str | None = None
    #: Its private key (PEM); may be in `certfile` instead.
    keyfile: str | None = None
    #: Whether the broker's certificate must name the host connected to (each node its own).
    check_hostname: bool = True
    #: Whether the broker's certificate is checked at all. False is for tests only: anyone in
    #: between can then read the traffic, password included.
    verify: bool = True

    def __post_init__(self) -> None:
        if self.keyfile is not None and self.certfile is None:
            raise ConnectionFailed("TLS: keyfile given without certfile")

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> TLSSettings:
        """From the URL's TLS options; `ValueError` naming a bad value."""
        return cls(
            cafile=options.get("cafile") or None,
            capath=options.get("capath") or None,
            certfile=options.get("certfile") or None,
            keyfile=options.get("keyfile") or None,
            check_hostname=_flag("check_hostname", options.get("check_hostname", "1")),
            verify=not _flag("no_verify_ssl", options.get("no_verify_ssl", "0")),
        )

    def context(self) -> ssl.SSLContext:
        """A client context for these settings; `ConnectionFailed` if a file cannot be used."""
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=self.cafile, capath=self.capath
            )
            if self.certfile is not None:
                context.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as error:
            named = ", ".join(
                f"{key}={value}"
                for key, value in (("cafile", self.cafile), ("capath", self.capath),
                                   ("certfile", self.certfile), ("keyfile", self.keyfile))
                if value is not None
            )  # fmt: skip
            raise ConnectionFailed(f"TLS: cannot use {named or 'the system CAs'}: {error}") from None
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context.check_hostname = self.check_hostname
        return context


def _flag(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"{name} must be true or false, not {value!r}")


def describe_tls_error(error: BaseException, tls: TLSSettings | None) -> str | None:
    """What went wrong in a TLS handshake, said for a person; None if `error` is not a TLS error.

    The AMQP client raises its own error `from` the `ssl` one: the chain of causes is searched.
    `tls` is the connection's settings (None: not `amqps://`).
    """
    chain: list[BaseException] = []
    seen: BaseException | None = error
    while seen is not None and len(chain) < 5:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    error = next((e for e in chain if isinstance(e, ssl.SSLError)), error)
    if tls is not None and not isinstance(error, ssl.SSLError) and _reset(chain):
        return _refused_after_handshake(tls)
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = error.verify_message or str(error)
        if "hostname" in reason.lower() or "IP address mismatch" in reason:
            return f"the broker's certificate does not name this host ({reason}; see check_hostname)"
        return f"the broker's certificate is not trusted ({reason}; check cafile)"
    if isinstance(error, ssl.SSLError):
        reason = error.reason or str(error)
        if "CERTIFICATE_REQUIRED" in reason:
            return f"the broker requires a client certificate ({reason}; set certfile and keyfile)"
        if "ALERT" in reason:
            return f"the broker refused the TLS handshake ({reason}; check certfile, keyfile and their CA)"
        return f"TLS failed ({reason})"
    return None


def _reset(chain: list[BaseException]) -> bool:
    # aiormq names the reset only in its message ("Server connection reset: ConnectionResetError").
    return any(isinstance(e, ConnectionResetError) or "ConnectionResetError" in str(e) for e in chain)


def _refused_after_handshake(tls: TLSSettings) -> str:
    # With TLS 1.3 the broker checks the client's certificate after the handshake, and its alert
    # is usually lost in the reset that follows: the likely reasons, from what was offered.
    closed = "the broker closed the connection right after the TLS handshake"
    if tls.certfile is None:
        return f"{closed}: it probably requires a client certificate (set certfile and keyfile)"
    expired = _expired_on(tls.certfile)
    if expired is not None:
        return f"{closed}: the client certificate {tls.certfile} expired on {expired}"
    return (f"{closed}: it probably refused the client certificate {tls.certfile} "
            "(not signed by a CA it trusts?)")  # fmt: skip


def _expired_on(certfile: str) -> str | None:
    """When the certificate in `certfile` expired, if it has; None if valid or unreadable."""
    # The one reader of a certificate's dates in the standard library (CPython's test helper).
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        not_after = decode(certfile)["notAfter"]
        if ssl.cert_time_to_seconds(not_after) < time.time():
            return str(not_after)
    except (OSError, ValueError, KeyError, ssl.SSLError):
        return None
    return None
