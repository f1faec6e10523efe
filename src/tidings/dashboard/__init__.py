"""`tidings dashboard`: a web page over the audit feed, the heartbeats and the error queues.

    tidings dashboard --transport URL [--store URL] [--host 127.0.0.1] [--port 8088]

The modules, bottom up: `schema` and `store` (its own database: SQLite by default, PostgreSQL
optional), `ingest` (the audit queue into the store), `retention` (old records out, in batches),
`live` (server-sent events to the open pages), `overview`, `failed` and `diagram` (what the pages
show: services, error queues through `tidings.dead_letters`, a conversation as a sequence
diagram), `security` (who may replay and purge), `app` (the Starlette pages) and `server` (all of
it as one process). docs/dashboard.md.
"""

from __future__ import annotations

from tidings.dashboard.server import DEFAULT_RETENTION, DashboardSettings, serve
from tidings.dashboard.store import DEFAULT_STORE, Store

__all__ = ["DEFAULT_RETENTION", "DEFAULT_STORE", "DashboardSettings", "Store", "serve"]
