"""Dead-letter tooling: list, inspect, replay and purge a service's error queue.

    async with transport_from_url("sqlite:///shop.db") as transport:
        dead_letters = DeadLetters(transport, "basket")
        for failed in await dead_letters.list():
            print(failed.id, failed.fault.reason, failed.fault.message)
        await dead_letters.replay([failed.id])    # back onto "basket", same id, attempts from 1
        await dead_letters.purge()                # gone for good

The same from a shell: `tidings dead-letters list|show ID|replay ID...|replay --all|purge`
(`--transport URL --service NAME`, `--json`). The moving is the transport's (`Transport.replay`);
this module reads the fault headers (`tidings.faults`) and presents them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from tidings.bus import DEFAULT_TRANSPORT
from tidings.headers import ATTEMPT, FAULT_PREFIX
from tidings.transports import DeadLetter, Transport, transport_from_url

__all__ = ["DeadLetters", "FailedMessage", "Fault", "add_command", "run_command"]

#: How many dead letters `DeadLetters.get` looks through for one id. The port lists oldest first and
#: has no lookup by id; an error queue longer than this wants purging more than browsing.
GET_SCAN_LIMIT = 10_000


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None  # headers of a dead letter are whatever arrived: never trust their shape


def _int(text: str | None) -> int:
    try:
        return int(text or "0")
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """Why a message is in the error queue, read back from its fault headers."""

    #: A stable code: `handler-failed`, `rejected`, `not-retryable`, `delivery-limit`,
    #: `unknown-type`, `invalid-payload`, `too-large`, `not-utf8`, ... (see `tidings.faults`).
    reason: str
    #: The exception's qualified type, when an exception caused it (`builtins.ValueError`).
    exception_type: str | None
    #: The exception's message, or what was wrong with the input.
    message: str | None
    #: The end of the traceback, when an exception caused it.
    traceback: str | None
    #: Handler calls made on the message (0 for input refused before any handler).
    attempts: int
    first_failure: datetime | None
    last_failure: datetime | None
    #: The service and queue the message failed in.
    service: str | None
    queue: str | None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Fault:
        def fault(name: str) -> str | None:
            return headers.get(FAULT_PREFIX + name)

        return cls(
            reason=fault("reason") or "unknown",
            exception_type=fault("type"),
            message=fault("message"),
            traceback=fault("traceback"),
            attempts=_int(fault("attempts")),
            first_failure=_time(fault("first-time")),
            last_failure=_time(fault("last-time")),
            service=fault("service"),
            queue=fault("queue"),
        )


@dataclass(frozen=True, slots=True)
class FailedMessage:
    """A message in an error queue: the message as it arrived, and its fault."""

    id: str
    #: The wire name from the `type` header ("" when the message had none).
    type: str
    #: Every header as stored, the fault headers included.
    headers: Mapping[str, str]
    body: bytes
    fault: Fault

    @classmethod
    def from_dead_letter(cls, dead_letter: DeadLetter) -> FailedMessage:
        headers = dead_letter.headers
        return cls(
            id=dead_letter.message_id,
            type=headers.get("type", ""),
            headers=headers,
            body=dead_letter.body,
            fault=Fault.from_headers(headers),
        )

    @property
    def message_headers(self) -> dict[str, str]:
        """The headers the message itself carried: without the fault and attempt headers."""
        return {k: v for k, v in self.headers.items() if k != ATTEMPT and not k.startswith(FAULT_PREFIX)}


class DeadLetters:
    """The error queue of one service on an open transport."""

    def __init__(self, transport: Transport, service: str) -> None:
        self.transport = transport
        self.service = service

    @property
    def queue(self) -> str:
        """The service's input queue (a `Bus`'s queue is named after its service)."""
        return self.service

    async def list(self, *, limit: int = 100) -> list[FailedMessage]:
        """The oldest `limit` dead letters, without removing them."""
        letters = await self.transport.dead_letters(self.queue, limit=limit)
        return [FailedMessage.from_dead_letter(letter) for letter in letters]

    async def get(self, message_id: str) -> FailedMessage | None:
        """The dead letter with this id, or None when there is none."""
        for letter in await self.transport.dead_letters(self.queue, limit=GET_SCAN_LIMIT):
            if letter.message_id == message_id:
                return FailedMessage.from_dead_letter(letter)
        return None

    async def replay(self, message_ids: Sequence[str]) -> int:
        """Move these dead letters back onto the service's queue; returns how many moved.

        Each keeps its id, body and headers; the fault and attempt headers are dropped, so the
        handler sees it as attempt 1 again.
        """
        if isinstance(message_ids, str):
            # A lone id would otherwise be read as a sequence of one-character ids.
            raise TypeError("replay() takes a sequence of message ids; use replay([message_id])")
        if not message_ids:
            return 0
        return await self.transport.replay(self.queue, list(message_ids))

    async def replay_all(self) -> int:
        """Move every dead letter back onto the service's queue; returns how many moved."""
        return await self.transport.replay(self.queue, None)

    async def purge(self) -> int:
        """Delete every dead letter of the service for good; returns how many."""
        return await self.transport.purge_dead_letters(self.queue)


# -- the command line ----------------------------------------------------------------------------


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
