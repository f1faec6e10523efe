"""`tidings dead-letters list|show ID|replay ID...|replay --all|purge`: the error queue from a shell.

The work is `tidings.dead_letters.DeadLetters`'s; this module parses the command and prints (a
table, one message's fault/headers/body, or JSON with `--json`). It looks only: a SQLite file that
is not there is reported, not created, and a missing queue is reported with the file or broker
looked at. `purge` asks first, unless `--yes`.
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

from tidings.cli.describe import TRANSPORT_VARIABLE, environment_transport, transport_label
from tidings.dead_letters import DeadLetters, FailedMessage
from tidings.errors import ConfigurationError, NoRoute
from tidings.transports import DEFAULT_TRANSPORT, Transport, transport_from_url
from tidings.transports.sqlite import SQLiteTransport

__all__ = ["add_command", "run_command", "run_command_async"]


def add_command(commands: Any) -> None:
    """Add `dead-letters` to the `tidings` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--transport",
        default=None,
        metavar="URL",
        help=f"transport URL (default: ${TRANSPORT_VARIABLE}, else {DEFAULT_TRANSPORT}, relative to "
        "the working directory)",
    )
    common.add_argument("--service", required=True, help="the service whose error queue to use")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    parser = commands.add_parser("dead-letters", help="list, show, replay or purge a service's dead letters")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[common], help="a table of the dead letters, oldest first")
    listing.add_argument("--limit", type=int, default=100, help="at most this many")
    show = actions.add_parser("show", parents=[common], help="one dead letter: fault, headers, body")
    show.add_argument("id", help="the message id")
    replay = actions.add_parser(
        "replay", parents=[common], help="put dead letters back on the service's queue"
    )
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", default=[], metavar="ID", help="the message ids to replay")
    which.add_argument("--all", action="store_true", help="replay every dead letter")
    purge = actions.add_parser(
        "purge", parents=[common], help="delete every dead letter of the service, after asking"
    )
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask: delete them")
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run a parsed `tidings dead-letters ...` command; returns the exit code.

    `purge` without `--yes` asks on the terminal first (before any connection: none waits on a
    person), and purges nothing unless the answer is y.
    """
    transport = _transport(args)
    if args.action == "purge" and not args.yes:
        where = transport_label(transport)
        if not _confirm(f"delete every dead letter of service {args.service!r} in {where} for good? [y/N] "):
            print("nothing purged", file=sys.stderr)
            return 1
        args.yes = True
    return asyncio.run(_run(transport, args, out or sys.stdout))


async def run_command_async(args: argparse.Namespace, out: TextIO) -> int:
    """`run_command` for callers already in an event loop; it asks nothing (`purge` needs `yes`)."""
    transport = _transport(args)
    if args.action == "purge" and not getattr(args, "yes", False):
        raise ConfigurationError("purge deletes the dead letters for good: pass --yes")
    return await _run(transport, args, out)


def _transport(args: argparse.Namespace) -> Transport:
    transport = transport_from_url(args.transport or environment_transport())
    if isinstance(transport, SQLiteTransport) and not os.path.exists(transport.settings.path):
        # Opening would create an empty database: the wrong directory or a typo would then look
        # like a service without dead letters.
        raise ConfigurationError(
            f"no SQLite database at {os.path.abspath(transport.settings.path)} ({transport.url}), so no "
            f"error queue of service {args.service!r} there; nothing was created. Name the file the "
            f"service's bus uses with --transport or ${TRANSPORT_VARIABLE}"
        )
    return transport


def _confirm(question: str) -> bool:
    sys.stderr.write(question)  # not stdout, which --json keeps for its JSON
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


async def _run(transport: Transport, args: argparse.Namespace, out: TextIO) -> int:
    try:
        return await _act(transport, args, out)
    except NoRoute as error:
        # The SQLite transport names the queue only: say which file was looked in.
        shown = str(error) if transport.url in str(error) else f"{error} in {transport_label(transport)}"
        raise NoRoute(f"{shown}: has service {args.service!r} run on this transport?") from None


async def _act(transport: Transport, args: argparse.Namespace, out: TextIO) -> int:
    async with transport:
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


#: How much of a fault's message `list` prints; `show` prints it whole.
MESSAGE_CHARS = 80


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
    header = ("ID", "TYPE", "REASON", "ATTEMPTS", "LAST FAILURE", "SERVICE", "MESSAGE")
    rows = [
        (
            _clean(m.id, 40) or "-",
            _clean(m.type, 40) or "-",
            _clean(m.fault.reason, 24),
            str(m.fault.attempts),
            _when(m.fault.last_failure),
            _clean(m.fault.service or "-", 30),
            # The first line of what went wrong: `show ID` has all of it, and the traceback.
            _clean((m.fault.message or "-").strip().partition("\n")[0], MESSAGE_CHARS) or "-",
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
