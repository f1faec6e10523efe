"""Shared fixtures: real servers when they answer, a clear skip when not (a failure under CI)."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

CI = bool(os.environ.get("CI"))

# `TIDINGS_TEST_RABBITMQ=host:port` points the tests at another broker than 127.0.0.1:5672.
_host, _, _port = os.environ.get("TIDINGS_TEST_RABBITMQ", "").rpartition(":")
RABBITMQ_HOST = (_host, int(_port)) if _host else ("127.0.0.1", 5672)
#: The broker's node name for `rabbitmqctl -n`, when it is not the default one.
RABBITMQ_NODE = os.environ.get("TIDINGS_TEST_RABBITMQ_NODE")
#: Every transport, and those whose systems span OS processes (memory:// lives in one process). The
#: RabbitMQ parameter carries the `rabbitmq` marker: `pytest -m "not rabbitmq"` needs no broker.
_RABBITMQ = pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)
TRANSPORTS = ["memory", "sqlite", _RABBITMQ]
DURABLE_TRANSPORTS = ["sqlite", _RABBITMQ]
POSTGRES_HOST = ("127.0.0.1", 5432)


def answers(host: tuple[str, int]) -> bool:
    """Whether something accepts TCP connections there."""
    try:
        with socket.create_connection(host, timeout=1):
            return True
    except OSError:
        return False


def require_server(name: str, host: tuple[str, int]) -> None:
    """Skip the test when the server does not answer; under CI, fail it instead."""
    if answers(host):
        return
    reason = f"{name} does not answer on {host[0]}:{host[1]}"
    if CI:
        pytest.fail(f"{reason} (CI is set: the server must be running)")
    pytest.skip(reason)


def unique(prefix: str = "t") -> str:
    """A name no other test (or test run) uses."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def system_url(kind: str, tmp_path: Path, *, visibility_timeout: float | None = None) -> str:
    """A URL naming a fresh, empty system on transport `kind` (memory, sqlite or rabbitmq).

    RabbitMQ systems get a namespace of their own; the test skips when the broker does not
    answer (and fails under CI). `visibility_timeout` shortens SQLite's, for kill -9 tests.
    """
    if kind == "memory":
        return f"memory://{unique()}"
    if kind == "sqlite":
        query = f"?visibility_timeout={visibility_timeout}" if visibility_timeout else ""
        return f"sqlite:///{tmp_path / 'bus.db'}{query}"
    if kind == "rabbitmq":
        return rabbitmq_system_url()
    raise ValueError(f"no transport kind {kind!r}")


def rabbitmq_system_url(prefix: str = "ns") -> str:
    """A URL naming a fresh namespace in this test session's vhost (see `session_vhost`)."""
    require_server("RabbitMQ", RABBITMQ_HOST)
    host, port = RABBITMQ_HOST
    return f"amqp://guest:guest@{host}:{port}/{quote(session_vhost(), safe='')}?namespace={unique(prefix)}"


def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl` against the test broker; its output, or `RuntimeError`."""
    node = ["-n", RABBITMQ_NODE] if RABBITMQ_NODE else []
    # In a session of its own, so that a timeout ends the whole CLI (rabbitmqctl runs `su`, a shell
    # and an Erlang VM): a VM left behind keeps its distribution port, and enough of them make every
    # later rabbitmqctl fail to start.
    process = subprocess.Popen(
        ["rabbitmqctl", "-q", *node, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {stderr or stdout}")
    return stdout


def add_vhost(name: str) -> None:
    """Make vhost `name` on the test broker, open to guest; the caller deletes it (`delete_vhost`)."""
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    except BaseException:
        rabbitmqctl("delete_vhost", name)
        raise


_session_vhost: str | None = None


def session_vhost() -> str:
    """A vhost made for this test session on first use, deleted with all in it when it ends.

    Every test still takes a namespace of its own inside it; the vhost is what lets the session
    leave nothing behind on a shared broker. Without `rabbitmqctl` (a remote broker) the tests use
    the default vhost and leave their namespaces there.
    """
    global _session_vhost
    if _session_vhost is None:
        if shutil.which("rabbitmqctl") is None:
            _session_vhost = "/"
        else:
            name = unique("tidings-session-")
            add_vhost(name)
            _session_vhost = name  # deleted when the session ends
    return _session_vhost


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs RabbitMQ `rabbitmq`: its module, its parameter or its fixture says so."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "rabbitmq" in item.nodeid.lower() or "rabbitmq_url" in fixtures:
            item.add_marker(pytest.mark.rabbitmq)


#: Seconds before pytest-timeout ends a test that the watchdog shows what it is waiting for.
WATCHDOG_LEAD = 5.0
_WATCHDOG = pytest.StashKey[threading.Timer]()


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    """Arm a watchdog just before pytest-timeout's timer (which still fires, unchanged).

    pytest-timeout shows where the main thread is: for an asyncio test, always the event loop's
    `select()`. The watchdog prints what every task of the running loop is waiting on, so that a
    hang says where it is stuck. Returning None lets pytest-timeout set its own timer as usual.
    """
    timeout = float(getattr(settings, "timeout", 0) or 0)
    if timeout <= 0:
        return
    timer = threading.Timer(max(timeout - WATCHDOG_LEAD, timeout / 2), _dump_tasks, (item.nodeid,))
    timer.daemon = True
    timer.start()
    item.stash[_WATCHDOG] = timer


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    timer = item.stash.get(_WATCHDOG, None)
    if timer is not None:
        timer.cancel()


def _dump_tasks(nodeid: str) -> None:
    """Print the stack of every task of each running event loop (the watchdog's thread)."""
    out = sys.__stderr__
    if out is None:
        return
    out.write(f"\n+++ {nodeid} is about to time out; the asyncio tasks and what they wait on:\n")
    loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()]
    for loop in loops:
        dumped = threading.Event()

        def dump(loop: asyncio.AbstractEventLoop = loop, dumped: threading.Event = dumped) -> None:
            # In the loop's own thread: the tasks do not change under the dump.
            text = io.StringIO()
            for task in asyncio.all_tasks(loop):
                text.write(f"--- {task!r}\n")
                task.print_stack(limit=20, file=text)
            out.write(text.getvalue())
            dumped.set()

        loop.call_soon_threadsafe(dump)
        if not dumped.wait(5):
            # The loop does not come round: something blocks its thread. Show the threads instead.
            out.write("the event loop does not answer; the stacks of the threads:\n")
            faulthandler.dump_traceback(file=out, all_threads=True)
    if not loops:
        faulthandler.dump_traceback(file=out, all_threads=True)
    out.write("+++\n")
    out.flush()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    vhost = _session_vhost
    if vhost is not None and vhost != "/":
        try:
            rabbitmqctl("delete_vhost", vhost)
        except (RuntimeError, subprocess.TimeoutExpired) as error:  # the run's result stands
            print(f"\nthe test vhost {vhost} was not deleted: {error}")


@pytest.fixture
def rabbitmq_url() -> str:
    """A RabbitMQ URL with a namespace of its own, so tests never see each other's exchanges."""
    return system_url("rabbitmq", Path())


@pytest.fixture
def postgres_url() -> str:
    """The local PostgreSQL test database, for SQLAlchemy with asyncpg."""
    require_server("PostgreSQL", POSTGRES_HOST)
    return "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def name() -> Callable[[str], str]:
    """Unique service names, so RabbitMQ queues of different tests never meet."""
    suffix = unique("-")

    def make(service: str) -> str:
        return service + suffix

    return make
