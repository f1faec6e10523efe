"""The local 3-node cluster of `scripts/rabbitmq-cluster`, for the tests that kill its nodes.

`cluster` (module-scoped, parametrized by RabbitMQ version) starts it unless it runs already and
stops it afterwards if it started it, so at most one cluster runs at a time; the RabbitMQ 4 one
runs only with the full sizes (`scripts/test --full`). A cluster that cannot start skips the test
with the script's reason, and fails it under `CI`. Every test gets a vhost of its own on it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest

from tests.conftest import CI
from tests.helpers import ROOT
from tests.sizes import FULL

SCRIPT = ROOT / "scripts" / "rabbitmq-cluster"
#: The issue's bound on starting the cluster, with room for a machine shared with other runs.
START_TIMEOUT = 180
#: The RabbitMQ versions the cluster tests run on: the machine's, and RabbitMQ 4 in full runs.
VERSIONS = [
    "system",
    pytest.param(
        "4",
        marks=pytest.mark.skipif(
            not FULL and os.environ.get("TIDINGS_CLUSTER_RABBITMQ") != "4",
            reason="full sizes only (or TIDINGS_CLUSTER_RABBITMQ=4)",
        ),
    ),
]


@dataclass(frozen=True)
class Cluster:
    version: str
    #: AMQP ports of nodes 1, 2, 3.
    ports: tuple[int, int, int] = (5701, 5702, 5703)

    def run(self, *args: str, timeout: float = 120) -> str:
        """`scripts/rabbitmq-cluster ARGS`; its output, or `RuntimeError` with its errors."""
        env = {**os.environ, "TIDINGS_CLUSTER_RABBITMQ": self.version}
        process = subprocess.Popen(
            [str(SCRIPT), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # a timeout ends the Erlang VMs of the CLI too
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise RuntimeError(f"rabbitmq-cluster {' '.join(args)} took more than {timeout} s") from None
        if process.returncode != 0:
            raise RuntimeError(f"rabbitmq-cluster {' '.join(args)} failed: {stderr or stdout}")
        return stdout

    def ctl(self, node: int, *args: str) -> str:
        return self.run("ctl", str(node), "-q", *args)

    def node_name(self, node: int) -> str:
        prefix = "tidings4-c" if self.version == "4" else "tidings-c"
        return f"{prefix}{node}@localhost"

    def node_of(self, name: str) -> int:
        return next(node for node in (1, 2, 3) if self.node_name(node) == name)

    def url(self, vhost: str, order: tuple[int, ...] = (1, 2, 3), **options: str) -> str:
        """An AMQP URL naming the nodes in `order` (the first that answers is used)."""
        hosts = ",".join(f"127.0.0.1:{self.ports[node - 1]}" for node in order)
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return f"amqp://guest:guest@{hosts}/{quote(vhost, safe='')}" + (f"?{query}" if query else "")

    def leader(self, vhost: str, queue: str) -> int:
        """The node leading quorum queue `queue` now."""
        for line in self.ctl(
            1, "list_queues", "-p", vhost, "name", "leader", "--no-table-headers"
        ).splitlines():
            name, _, leader = line.partition("\t")
            if name == queue:
                return self.node_of(leader.strip())
        raise AssertionError(f"no queue {queue} in vhost {vhost}")


def _unavailable(reason: str) -> None:
    if CI:
        pytest.fail(f"{reason} (CI is set: the cluster must start)")
    pytest.skip(reason)


@pytest.fixture(scope="module", params=VERSIONS)
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The running cluster of RabbitMQ version `request.param`."""
    cluster = Cluster(request.param)
    try:
        cluster.run("status", timeout=60)
        started_here = False
    except RuntimeError:
        started_here = True
    try:
        if started_here:
            cluster.run("start", timeout=START_TIMEOUT)
    except RuntimeError as error:
        if started_here:
            with contextlib.suppress(RuntimeError):
                cluster.run("stop")
        _unavailable(f"the local RabbitMQ cluster did not start: {error}")
    try:
        yield cluster
    finally:
        if started_here:
            cluster.run("stop", timeout=180)


@pytest.fixture
def vhost(cluster: Cluster) -> Iterator[str]:
    """A vhost of this test's own on the cluster, deleted afterwards."""
    name = f"tidings-cluster-{uuid.uuid4().hex[:8]}"
    cluster.ctl(1, "add_vhost", name)
    cluster.ctl(1, "set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name
    finally:
        # Any running node will do: a test may leave one of them down.
        for node in (1, 2, 3):
            try:
                cluster.ctl(node, "delete_vhost", name)
                break
            except RuntimeError:
                continue
