"""`tidings dead-letters list|show ID|replay ID...|replay --all|purge`: the error queue from a shell.

The work is `tidings.dead_letters.DeadLetters`'s; this module parses the command and prints (a
table, one message's fault/headers/body, or JSON with `--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from tidings.dead_letters import DeadLetters, FailedMessage
from tidings.transports import DEFAULT_TRANSPORT, transport_from_url

__all__ = ["add_command", "run_command", "run_command_async"]


def add_command(commands: Any) -> None:
    """Add `dead-letters` to the `tidings` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--transport",
        default=None,
        help=f"transport URL (default: $TIDINGS_TRANSPORT, else {DEFAULT_TRANSPORT})",
    )
    common.add_argument("--service", required=True, help="the service whose error queue to use")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    parser = commands.add_parser("dead-letters", help="list, show, replay or purge a service's dead letters")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[common], help="a table of the dead letters, oldest first")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    show = actions.add_parser("show", parents=[common], help="one dead letter: fault, headers, body")
    show.add_argument("id", help="the message id")
    replay = actions.add_parser(
        "replay", parents=[common], help="put dead letters back on the service's queue"
    )
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", default=[], metavar="ID", help="the message ids to replay")
    which.add_argument("--all", action="store_true", help="replay every dead letter")
    actions.add_parser("purge", parents=[common], help="delete every dead letter of the service")


def run_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run a parsed `tidings dead-letters ...` command; returns the exit code."""
    return asyncio.run(run_command_async(args, out or sys.stdout))


async def run_command_async(args: argparse.Namespace, out: TextIO) -> int:
    """`run_command` for callers already in an event loop."""
    url = args.transport or os.environ.get("TIDINGS_TRANSPORT", DEFAULT_TRANSPORT)
    async with transport_from_url(url) as transport:
        dead_letters = DeadLetters(transport, args.service)
        if args.action == "list":
            failed = await dead_letters.list(limit=args.limit)
            out.write(_to_json([_summary(m) for m in failed]) if args.json else _table(failed))
            return 0
        if args.action == "show":
            found = await dead_letters.get(args.id)
            if found is None:
                print(f"no dead letter {args.id!r} for service {args.service!r}", file=sys.stderr)
                return 1
            out.write(_to_json(_details(found)) if args.json else _text(found))
            return 0
        if args.action == "replay":
            return await _replay(dead_letters, args, out)
        purged = await dead_letters.purge()
        out.write(_to_json({"purged": purged}) if args.json else f"purged {purged} dead letter(s)\n")
        return 0


async def _replay(dead_letters: DeadLetters, args: argparse.Namespace, out: TextIO) -> int:
    if args.all:
        moved = await dead_letters.replay_all()
    elif args.ids:
        moved = await dead_letters.replay(args.ids)
    else:
        print("replay needs message ids or --all", file=sys.stderr)
        return 2
    queue = dead_letters.queue
    out.write(_to_json({"replayed": moved}) if args.json else f"replayed {moved} message(s) onto {queue}\n")
    if not args.all and moved < len(set(args.ids)):
        print(f"{len(set(args.ids)) - moved} of the ids were not in the error queue", file=sys.stderr)
        return 1
    return 0


def _clean(text: str, width: int | None = None) -> str:
    # Headers of a dead letter may be hostile: escape control characters so that a crafted type
    # header cannot rewrite the operator's terminal.
    cleaned = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    if width is not None and len(cleaned) > width:
        cleaned = cleaned[: width - 3] + "..."
    return cleaned


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z") if moment else "-"


def _table(failed: Sequence[FailedMessage]) -> str:
    if not failed:
        return "no dead letters\n"
    header = ("ID", "TYPE", "REASON", "ATTEMPTS", "LAST FAILURE", "SERVICE")
    rows = [
        (
            _clean(m.id, 40) or "-",
            _clean(m.type, 40) or "-",
            _clean(m.fault.reason, 24),
            str(m.fault.attempts),
            _when(m.fault.last_failure),
            _clean(m.fault.service or "-", 30),
        )
        for m in failed
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (header, *rows)
    ]
    return "\n".join(lines) + "\n"


def _summary(failed: FailedMessage) -> dict[str, Any]:
    fault = failed.fault
    return {
        "id": failed.id,
        "type": failed.type,
        "reason": fault.reason,
        "attempts": fault.attempts,
        "first_failure": _when(fault.first_failure) if fault.first_failure else None,
        "last_failure": _when(fault.last_failure) if fault.last_failure else None,
        "service": fault.service,
        "queue": fault.queue,
        "exception_type": fault.exception_type,
        "message": fault.message,
    }


def _details(failed: FailedMessage) -> dict[str, Any]:
    details = _summary(failed)
    details["traceback"] = failed.fault.traceback
    details["headers"] = dict(failed.message_headers)
    try:
        details["body"] = failed.body.decode("utf-8")
    except UnicodeDecodeError:
        details["body_base64"] = base64.b64encode(failed.body).decode("ascii")
    return details


def _to_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=True) + "\n"


#: How much of a body `show` prints as text; `--json` gives all of it.
SHOW_BODY_CHARS = 4_000


def _text(failed: FailedMessage) -> str:
    fault = failed.fault
    lines = [
        f"id:             {_clean(failed.id)}",
        f"type:           {_clean(failed.type)}",
        f"reason:         {_clean(fault.reason)}",
        f"exception:      {_clean(fault.exception_type or '-')}",
        f"message:        {_clean(fault.message or '-')}",
        f"attempts:       {fault.attempts}",
        f"first failure:  {_when(fault.first_failure)}",
        f"last failure:   {_when(fault.last_failure)}",
        f"service/queue:  {_clean(fault.service or '-')} / {_clean(fault.queue or '-')}",
        "headers:",
        *(f"  {_clean(k)}: {_clean(v)}" for k, v in sorted(failed.message_headers.items())),
        f"body ({len(failed.body)} bytes):",
    ]
    try:
        body = failed.body.decode("utf-8")
    except UnicodeDecodeError:
        body = f"(not UTF-8) {failed.body[:200]!r}"
    if len(body) > SHOW_BODY_CHARS:
        body = body[:SHOW_BODY_CHARS] + f"... ({len(body) - SHOW_BODY_CHARS} more characters; --json)"
    lines.append("  " + "\n  ".join(_clean(line) for line in body.splitlines() or [""]))
    if fault.traceback:
        lines += ["traceback:", *(f"  {_clean(line)}" for line in fault.traceback.splitlines())]
    return "\n".join(lines) + "\n"
