"""`tidings dashboard`: ingest the audit feed, read the error queues, serve the web page.

    tidings dashboard --transport URL [--store URL] [--host 127.0.0.1] [--port 8088]
                      [--retention-hours 168] [--token TOKEN]

It binds 127.0.0.1 unless told otherwise; on any other address replay and purge need a token,
`--token` or `$TIDINGS_DASHBOARD_TOKEN`, else one is made and printed at start. One line once it
listens (`dashboard at http://127.0.0.1:8088/ ...`, on stdout, for scripts to read the address
from), one when it stops; SIGINT/SIGTERM stop it (exit 0). docs/dashboard.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from tidings.cli.describe import TRANSPORT_VARIABLE, environment_transport
from tidings.errors import ConfigurationError
from tidings.transports import DEFAULT_TRANSPORT

__all__ = ["TOKEN_VARIABLE", "add_command"]

TOKEN_VARIABLE = "TIDINGS_DASHBOARD_TOKEN"
_NEEDS = ("starlette", "uvicorn", "jinja2", "sqlalchemy", "aiosqlite", "greenlet", "asyncpg")


def add_command(commands: Any) -> None:
    """Add `dashboard` to the `tidings` command's subparsers."""
    parser = commands.add_parser(
        "dashboard",
        help="serve the dashboard: services, failed messages, conversations (docs/dashboard.md)",
        description="Consume the audit feed and heartbeats of the buses with audit on into a store, "
        "read the services' error queues, and serve the dashboard's web page.",
    )
    parser.add_argument(
        "--transport",
        default=None,
        metavar="URL",
        help=f"the services' transport (default: ${TRANSPORT_VARIABLE}, else {DEFAULT_TRANSPORT})",
    )
    parser.add_argument(
        "--store",
        default="sqlite:///tidings-dashboard.db",
        metavar="URL",
        help="sqlite:/// or postgresql:// URL",
    )
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--port", type=int, default=8088, help="the port (0: any free one)")
    parser.add_argument(
        "--retention-hours",
        type=float,
        default=168.0,
        metavar="HOURS",
        help="how long audit records are kept",
    )
    parser.add_argument(
        "--token", default=None, help=f"needed to replay or purge (default: ${TOKEN_VARIABLE})"
    )
    parser.add_argument("--queue", default="tidings.audit", help="the audit queue")
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    try:
        from tidings.dashboard import DashboardSettings, serve
        from tidings.dashboard.security import is_loopback, new_token
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] in _NEEDS:
            raise ConfigurationError(
                f"tidings dashboard needs the 'dashboard' extra ({error.name} is not installed): "
                "pip install 'tidings[dashboard]'"
            ) from error
        raise
    if args.retention_hours <= 0:
        raise ConfigurationError("--retention-hours must be more than 0")
    token = args.token or os.environ.get(TOKEN_VARIABLE) or None
    made = False
    if token is None and not is_loopback(args.host):
        token, made = new_token(), True
    settings = DashboardSettings(
        transport=args.transport or environment_transport(),
        store=args.store,
        host=args.host,
        port=args.port,
        retention=args.retention_hours * 3600,
        token=token,
        queue=args.queue,
    )

    def ready(url: str) -> None:
        extra = f"; replay and purge need the token {token}" if made else ""
        print(f"dashboard at {url} (store {settings.store}){extra}", flush=True)

    try:
        asyncio.run(serve(settings, ready=ready))
    except OSError as error:  # the port is taken, the address is not this machine's
        raise ConfigurationError(f"cannot listen on {args.host}:{args.port}: {error}") from None
    print("dashboard stopped", file=sys.stderr, flush=True)
    return 0
