"""The transport tests' shared fixtures: the private TLS node, one per session (tls_broker)."""

from tests.transports.tls_broker import tls_broker

__all__ = ["tls_broker"]
