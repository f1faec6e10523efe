"""A private RabbitMQ node with a TLS listener, and the certificates for it, made with `openssl`.

The test CA signs the broker's certificate (for `localhost` only, so that `127.0.0.1` is a
hostname mismatch), a client certificate, and an expired client certificate; a second CA signs
nothing the broker knows. The node asks every client for a certificate
(`fail_if_no_peer_cert`) and checks it against the test CA. It is a `private_rabbitmq` node
(its own name, ports, data; the machine's RabbitMQ) with the TLS listener added to its
configuration, started once per session: the permission and secret tests use its plain listener
(their users and refusals stay off the shared broker, and its log is theirs to read). It skips
when it cannot start here, and fails under `CI`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import answers
from tests.transports import private_rabbitmq
from tests.transports.private_rabbitmq import START_TIMEOUT, PrivateBroker

#: Where the TLS listener's port is looked for (the plain one is private_rabbitmq's).
TLS_PORT_FROM = 5760


@dataclass(frozen=True)
class TLSBroker:
    broker: PrivateBroker
    tls_port: int
    certs: Path

    def url(self, host: str = "localhost", **options: str) -> str:
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return f"amqps://guest:guest@{host}:{self.tls_port}/" + (f"?{query}" if query else "")

    def file(self, name: str) -> str:
        return str(self.certs / name)

    def plain_url(self, user: str, password: str, vhost: str, **options: str) -> str:
        """An `amqp://` URL of the node's plain listener."""
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return f"amqp://{user}:{password}@127.0.0.1:{self.broker.port}/{vhost}" + (
            f"?{query}" if query else ""
        )

    @property
    def log(self) -> Path:
        """The node's log file."""
        return Path(self.broker.env["RABBITMQ_LOG_BASE"]) / f"{self.broker.node}.log"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(where: Path) -> None:
    """ca.pem (the test CA), other-ca.pem, server.pem/key, client.pem/key, expired.pem/key."""
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out",
                 f"{ca}.pem", "-days", "2", "-subj", f"/CN=tidings test {ca}", cwd=where)  # fmt: skip
    (where / "server.ext").write_text("subjectAltName=DNS:localhost\n")
    for name, subject in (("server", "/CN=localhost"), ("client", "/CN=tidings-client"),
                          ("expired", "/CN=tidings-expired")):  # fmt: skip
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subject, cwd=where)  # fmt: skip
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=where)  # fmt: skip
    _openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "client.pem", "-days", "2", cwd=where)  # fmt: skip
    # `openssl x509` (3.0) cannot backdate a certificate: `openssl ca` with dates in the past can.
    (where / "index.txt").write_text("")
    (where / "ca.cnf").write_text(
        "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nnew_certs_dir = .\nserial = ca.srl\n"
        "default_md = sha256\npolicy = any\n[any]\ncommonName = supplied\n"
    )
    _openssl("ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key",
             "-in", "expired.csr", "-out", "expired.pem", "-startdate", "20200101000000Z",
             "-enddate", "20200102000000Z", "-notext", cwd=where)  # fmt: skip


def _free_tls_port() -> int | None:
    return next((p for p in range(TLS_PORT_FROM, TLS_PORT_FROM + 40) if not answers(("127.0.0.1", p))), None)


@pytest.fixture(scope="session")
def tls_broker() -> Iterator[TLSBroker]:
    """A private node with a TLS listener that requires a client certificate from the test CA."""
    if shutil.which("openssl") is None:
        private_rabbitmq._unavailable("openssl is not installed: no certificates for the TLS node")
    port, tls_port = private_rabbitmq._free_port(), _free_tls_port()
    if port is None or tls_port is None:
        private_rabbitmq._unavailable("no free ports for a private TLS node")
        return
    base = Path(tempfile.mkdtemp(prefix="tidings-tls-rabbitmq-"))
    certs = base / "certs"
    certs.mkdir()
    node = f"tidings-tls-{uuid.uuid4().hex[:6]}@localhost"
    try:
        make_certificates(certs)
        env = private_rabbitmq._environment(base, node, port)
        with (base / "rabbitmq.conf").open("a") as conf:
            conf.write(
                f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
                f"ssl_options.cacertfile = {certs / 'ca.pem'}\n"
                f"ssl_options.certfile = {certs / 'server.pem'}\n"
                f"ssl_options.keyfile = {certs / 'server.key'}\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = true\n"
            )
        if os.geteuid() == 0:  # Debian's wrappers run the node as user rabbitmq
            for path in [base, *base.rglob("*")]:
                shutil.chown(path, "rabbitmq", "rabbitmq")
        broker = PrivateBroker(node, port, env)
        try:
            private_rabbitmq._run([private_rabbitmq._system("rabbitmq-server"), "-detached"], env, 30)
            broker.ctl("wait", env["RABBITMQ_PID_FILE"], "--timeout", str(START_TIMEOUT),
                       timeout=START_TIMEOUT + 10)  # fmt: skip
        except (RuntimeError, OSError) as error:
            private_rabbitmq._stop(broker)
            private_rabbitmq._unavailable(f"the private TLS node did not start: {error}")
        try:
            yield TLSBroker(broker, tls_port, certs)
        finally:
            private_rabbitmq._stop(broker)
    finally:
        shutil.rmtree(base, ignore_errors=True)
