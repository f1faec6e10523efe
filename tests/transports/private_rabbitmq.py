"""A private RabbitMQ node of the machine's own RabbitMQ, for tests that stop a broker or raise an
alarm: the shared broker (127.0.0.1:5672) is other test runs' too, and must never see either.

The node has a name, ports, data, logs and configuration of its own under a temporary directory
(no plugins), and a short `dead_letter_worker_publisher_confirm_timeout`, so that at-least-once
dead-lettering retries within a test's patience rather than after the default three minutes. It
shares the system's epmd and, through `su rabbitmq` in Debian's wrappers, its Erlang cookie.
A test module uses it as a module-scoped fixture (`private_broker`); it skips when the node cannot
start here, and fails under `CI`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import CI, answers

#: The AMQP port to use; by default the first free one from 5690 on (a node left behind by a killed
#: run must not make the next run fail), its Erlang distribution port 20000 above it.
PORT_FROM = int(os.environ.get("TIDINGS_TEST_PRIVATE_RABBITMQ_PORT", "5690"))
#: Where the machine's own RabbitMQ is found: not `$PATH`, which the RabbitMQ 4 pass of
#: `scripts/test` points at the private 4.x broker's binaries (they need that broker's setup).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: How long the node may take to start (the first start of a node writes its database).
START_TIMEOUT = 60
#: The dead-letter worker's retry interval on this node, in ms (RabbitMQ's default: 180,000).
DLX_RETRY_MS = 1_000


@dataclass(frozen=True)
class PrivateBroker:
    node: str
    port: int
    env: dict[str, str]

    def url(self, vhost: str = "/", **options: str) -> str:
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{quote(vhost, safe='')}" + (
            f"?{query}" if query else ""
        )

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -n <node> ARGS`; its output, or `RuntimeError`."""
        return _run([_system("rabbitmqctl"), "-q", "-n", self.node, *args], self.env, timeout)


def _run(command: list[str], env: dict[str, str], timeout: float) -> str:
    # A session of its own, so that a timeout ends the Erlang VM the CLI starts as well.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise RuntimeError(f"{' '.join(command)} took more than {timeout} s") from None
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {stderr or stdout}")
    return stdout


def _system(tool: str) -> str:
    return shutil.which(tool, path=SYSTEM_PATH) or tool


def _unavailable(reason: str) -> None:
    if CI:
        pytest.fail(f"{reason} (CI is set: the private RabbitMQ node must start)")
    pytest.skip(reason)


def _free_port() -> int | None:
    for port in range(PORT_FROM, PORT_FROM + 50):
        if not answers(("127.0.0.1", port)) and not answers(("127.0.0.1", port + 20000)):
            return port
    return None


def _environment(base: Path, node: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env["PATH"] = SYSTEM_PATH
    (base / "mnesia").mkdir()
    (base / "log").mkdir()
    (base / "rabbitmq-env.conf").write_text("")  # not the system's: it names the system node
    (base / "enabled_plugins").write_text("[].\n")
    (base / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{port}\nloopback_users.guest = false\n"
    )
    (base / "advanced.config").write_text(
        f"[{{rabbit, [{{dead_letter_worker_publisher_confirm_timeout, {DLX_RETRY_MS}}}]}}].\n"
    )
    env.update(
        RABBITMQ_NODENAME=node,
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(port),
        RABBITMQ_DIST_PORT=str(port + 20000),
        RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
        RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
        RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
        RABBITMQ_LOG_BASE=str(base / "log"),
        RABBITMQ_PID_FILE=str(base / "pid"),
        ERL_EPMD_ADDRESS="127.0.0.1",
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
    )
    return env


@pytest.fixture(scope="module")
def private_broker() -> Iterator[PrivateBroker]:
    """A RabbitMQ node of this module's own, stopped and deleted at the end of the module."""
    if (
        shutil.which("rabbitmq-server", path=SYSTEM_PATH) is None
        or shutil.which("rabbitmqctl", path=SYSTEM_PATH) is None
    ):
        _unavailable("rabbitmq-server is not installed: no private node for this test")
    port = _free_port()
    if port is None:
        _unavailable(f"no free port from {PORT_FROM} on: no private RabbitMQ node")
        return
    base = Path(tempfile.mkdtemp(prefix="tidings-private-rabbitmq-"))
    node = f"tidings-private-{uuid.uuid4().hex[:6]}@localhost"
    try:
        env = _environment(base, node, port)
        if os.geteuid() == 0:
            # Debian's wrappers run the node and the CLI as user rabbitmq (`su`).
            shutil.chown(base, "rabbitmq", "rabbitmq")
            for path in base.rglob("*"):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        broker = PrivateBroker(node, port, env)
        try:
            _run([_system("rabbitmq-server"), "-detached"], env, 30)
            # `wait` waits for the pid file, then for the node to boot (await_startup would give up
            # at once on a node that has not registered with epmd yet).
            broker.ctl("wait", env["RABBITMQ_PID_FILE"], "--timeout", str(START_TIMEOUT),
                       timeout=START_TIMEOUT + 10)  # fmt: skip
        except (RuntimeError, OSError) as error:
            _stop(broker)
            _unavailable(f"the private RabbitMQ node did not start: {error}")
        try:
            yield broker
        finally:
            _stop(broker)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _stop(broker: PrivateBroker) -> None:
    try:
        broker.ctl("stop", timeout=60)
    except RuntimeError as error:
        # A node that never finished starting does not answer `stop`: end it by its pid, so that
        # no broker outlives the test run.
        pid_file = Path(broker.env["RABBITMQ_PID_FILE"])
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            print(f"\nthe private RabbitMQ node {broker.node} did not stop: {error}")
