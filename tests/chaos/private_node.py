"""A private RabbitMQ 3.10 node for the scenarios that stop, kill, alarm or reconfigure a broker.

The shared broker (rabbit@localhost on 5672) belongs to every test run and is never touched: this
node has its own name, AMQP port (from 5780 on), distribution port (+20000), **its own epmd**
(`ERL_EPMD_PORT`, so the system's epmd never learns of it), data and logs in a temporary
directory, its own configuration (extra `rabbitmq.conf` lines, e.g. `consumer_timeout`, and
`rabbit` settings for `advanced.config`), and a
soft open-files limit raised to the hard one (quorum queues hold file handles; 1,024 wedges a node).

    with PrivateNode.started() as node:
        node.url(namespace="x")
        node.stop_app(); node.start_app()    # restart
        node.kill(); node.start()            # SIGKILL the VM, start it again
        node.ctl("set_vm_memory_high_watermark", "0.0001")

`started` stops the node (and its epmd) whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from tests.conftest import answers
from tests.transports.private_rabbitmq import SYSTEM_PATH, _run, _system, _unavailable

PORT_FROM = int(os.environ.get("TIDINGS_TEST_CHAOS_RABBITMQ_PORT", "5780"))
START_TIMEOUT = 90


#: Runs a command with the soft open-files limit raised to the hard one.
_WITH_FILES = 'ulimit -S -n "$(ulimit -H -n)" && exec "$0" "$@"'


class PrivateNode:
    def __init__(self, base: Path, port: int, extra_config: str = "", advanced: str = "") -> None:
        self.base = base
        self.port = port
        self.epmd_port = port - 1400  # 4380 for 5780: away from 4369 (system) and 4371 (rabbitmq4)
        self.node = f"tidings-chaos-{uuid.uuid4().hex[:6]}@localhost"
        for sub in ("mnesia", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq-env.conf").write_text("")
        (base / "enabled_plugins").write_text("[].\n")
        (base / "advanced.config").write_text(f"[{{rabbit, [{advanced}]}}].\n")
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{port}\nloopback_users.guest = false\n{extra_config}"
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        self.env.update(
            PATH=SYSTEM_PATH,
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(port),
            RABBITMQ_DIST_PORT=str(port + 20000),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_PID_FILE=str(base / "pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        if os.geteuid() == 0:  # Debian's wrappers run the node and the CLI as user rabbitmq
            for path in (base, *base.rglob("*")):
                shutil.chown(path, "rabbitmq", "rabbitmq")

    def url(self, vhost: str = "/", **options: str) -> str:
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{quote(vhost, safe='')}" + (
            f"?{query}" if query else ""
        )

    def _run(self, command: list[str], timeout: float) -> str:
        # With the open-files limit raised first (quorum queues hold file handles).
        return _run(["sh", "-c", _WITH_FILES, *command], self.env, timeout)

    def ctl(self, *args: str, timeout: float = 90) -> str:
        return self._run([_system("rabbitmqctl"), "-q", "-n", self.node, *args], timeout)

    def start(self) -> None:
        """Start the node (again) and wait until it answers AMQP."""
        self._run([_system("rabbitmq-server"), "-detached"], 30)
        self.ctl("wait", str(self.base / "pid"), "--timeout", str(START_TIMEOUT), timeout=START_TIMEOUT + 10)
        self._until_amqp()

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self._until_amqp()

    def kill(self) -> None:
        """SIGKILL the node's VM (no shutdown at all), and wait until its port is free."""
        pid = int((self.base / "pid").read_text().strip())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while answers(("127.0.0.1", self.port)) and time.monotonic() < deadline:
            time.sleep(0.1)
        (self.base / "pid").unlink(missing_ok=True)

    def running(self) -> bool:
        """Whether the node's app answers (`stop_app` leaves the VM up, the app down)."""
        return answers(("127.0.0.1", self.port))

    def _until_amqp(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not answers(("127.0.0.1", self.port)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.node} does not answer on {self.port}")
            time.sleep(0.1)

    def shutdown(self) -> None:
        """Stop the node and its epmd; by SIGKILL when it does not answer."""
        try:
            self.ctl("stop", timeout=60)
        except RuntimeError:
            with contextlib.suppress(OSError, ValueError):
                self.kill()
        # Its own epmd too; it refuses while it has not yet seen the node go, so a few tries.
        for _ in range(10):
            with contextlib.suppress(RuntimeError, OSError):
                self._run([_system("epmd"), "-port", str(self.epmd_port), "-kill"], 10)
            if not answers(("127.0.0.1", self.epmd_port)):
                break
            time.sleep(1)

    @classmethod
    @contextlib.contextmanager
    def started(cls, extra_config: str = "", advanced: str = "") -> Iterator[PrivateNode]:
        """A node in a temporary directory of its own (user rabbitmq must reach it: not pytest's)."""
        if shutil.which("rabbitmq-server", path=SYSTEM_PATH) is None:
            _unavailable("rabbitmq-server is not installed: no private node")
        port = next(
            (
                p
                for p in range(PORT_FROM, PORT_FROM + 40)
                if not any(answers(("127.0.0.1", q)) for q in (p, p + 20000, p - 1400))
            ),
            None,
        )
        if port is None:
            _unavailable(f"no free port from {PORT_FROM} on")
            return
        directory = Path(tempfile.mkdtemp(prefix="tidings-chaos-rabbitmq-"))
        try:
            node = cls(directory, port, extra_config, advanced)
            try:
                try:
                    node.start()
                except RuntimeError as error:
                    _unavailable(f"the private RabbitMQ node did not start: {error}")
                yield node
            finally:
                node.shutdown()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
