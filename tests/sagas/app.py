"""The saga service of the process tests, run with `tidings run tests.sagas.app:bus`.

Configured by environment variables, like `tests/storage/app.py`: `TEST_DATABASE` (`sqlite:<path>`
or `postgresql:<schema>`, see `tests/storage/databases.py`) and `TIDINGS_TRANSPORT` (read by `Bus`).
"""

from __future__ import annotations

import os

from tests.sagas.sagas import Counting, Waiting
from tests.storage.databases import engine_for
from tidings import Bus
from tidings.outbox import OutboxSettings

SERVICE = "tally"

database = engine_for(os.environ.get("TEST_DATABASE", "sqlite:unset.db"), pool_size=20)
bus = Bus(SERVICE, database=database, outbox_settings=OutboxSettings(poll_interval=0.1, claim_timeout=2))
bus.saga(Counting)
bus.saga(Waiting)
