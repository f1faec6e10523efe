"""The systems the chaos scenarios run on: the shared broker and database, or private ones.

`system` names a transport and a database as URLs the harness's processes understand. Scenarios
that stop, kill or alarm a broker or a database start a private one (`private_node.py`,
`private_postgres.py`); the shared servers only ever see namespaced queues and tables come and go.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_HOST, rabbitmq_system_url, require_server
from tests.sizes import FULL

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"

#: Scenarios (and negative controls) left out of the smoke set, which keeps `scripts/test` in its
#: budget: they run with `scripts/test --full`.
full_only = pytest.mark.skipif(not FULL, reason="full sizes only (scripts/test --full)")


@dataclass(frozen=True)
class System:
    transport: str
    database: str


#: RabbitMQ with PostgreSQL, and the SQLite transport with a SQLite database.
SYSTEMS = [
    pytest.param("rabbitmq+postgresql", marks=[pytest.mark.rabbitmq, pytest.mark.postgres]),
    "sqlite+sqlite",
]


def make_system(kind: str, directory: Path) -> System:
    if kind == "rabbitmq+postgresql":
        require_server("PostgreSQL", POSTGRES_HOST)
        return System(rabbitmq_system_url("chaos"), POSTGRES)
    if kind == "rabbitmq+sqlite":
        return System(rabbitmq_system_url("chaos"), f"sqlite:///{directory / 'service.db'}")
    if kind == "sqlite+sqlite":
        # A short visibility timeout: a killed consumer's messages come back within a second.
        return System(
            f"sqlite:///{directory / 'bus.db'}?visibility_timeout=1", f"sqlite:///{directory / 'service.db'}"
        )
    raise ValueError(kind)


@pytest.fixture
def system(request: pytest.FixtureRequest, tmp_path: Path) -> System:
    return make_system(request.param, tmp_path)
