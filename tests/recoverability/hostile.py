"""Hostile messages, each with the reason code it must be dead-lettered with.

Each case is a full raw message (headers + body) for a service that handles `Job`. The header
`x-case` names the case, so that it can be found in the error queue even when its `id` is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

from tidings.envelope import DEFAULT_MAX_BODY_SIZE, new_message_id

JOB = "rec.job"
#: A module that exists on the test's sys.path and must never be imported (see the tests).
CANARY_MODULE = "tidings_recoverability_canary"


@dataclass(frozen=True)
class Hostile:
    name: str
    reason: str
    headers: dict[str, str]
    body: bytes


def _headers(case: str, **changes: str | None) -> dict[str, str]:
    headers: dict[str, str | None] = {
        "id": new_message_id(),
        "source": "mallory",
        "type": JOB,
        "specversion": "1.0",
        "time": "2026-01-01T00:00:00Z",
        "datacontenttype": "application/json",
        "x-case": case,
    }
    headers.update(changes)
    return {k: v for k, v in headers.items() if v is not None}


def hostile_messages(tag: str = "") -> list[Hostile]:
    """One of each kind; `tag` makes the case names unique when the list is made several times."""

    def case(name: str, reason: str, body: bytes, **changes: str | None) -> Hostile:
        return Hostile(name + tag, reason, _headers(name + tag, **changes), body)

    return [
        case("not-utf8", "not-utf8", b'{"n": "\xff\xfe"}'),
        case("truncated-json", "not-json", b'{"n": 1, "note": "unfinis'),
        case("empty-body", "not-json", b""),
        case("deep-nesting", "too-deep", b"[" * 100_000 + b"]" * 100_000),
        case("huge-integer", "number-too-large", b'{"n": ' + b"9" * 5_000 + b"}"),
        case("nan", "not-finite", b'{"n": 1, "note": NaN}'),
        case("infinity", "not-finite", b'{"n": Infinity}'),
        case("overflowing-float", "not-finite", b'{"n": 1, "x": 1e999}'),
        case("unknown-type", "unknown-type", b'{"n": 1}', type="rec.nobody-handles-this"),
        case("python-path-type", "unknown-type", b'{"n": 1}', type="os:system"),
        case("builtin-type", "unknown-type", b'{"n": 1}', type="builtins.eval"),
        case("canary-type", "unknown-type", b'{"n": 1}', type=f"{CANARY_MODULE}:Job"),
        case("invalid-payload", "invalid-payload", b'{"n": "one"}'),
        case("payload-out-of-range", "invalid-payload", b'{"n": -1}'),
        case("payload-not-an-object", "invalid-payload", b"[1, 2, 3]"),
        case("too-large", "too-large", b'{"n": 1, "note": "' + b"a" * DEFAULT_MAX_BODY_SIZE + b'"}'),
        case("pickle", "unsupported-content-type", b"\x80\x04K\x01.", datacontenttype="application/x-pickle"),
        case("no-type", "missing-attribute", b'{"n": 1}', type=None),
        case("no-id", "missing-attribute", b'{"n": 1}', id=None),
        case("no-source", "missing-attribute", b'{"n": 1}', source=None),
        case("no-specversion", "missing-attribute", b'{"n": 1}', specversion=None),
        case("empty-type", "missing-attribute", b'{"n": 1}', type=""),
        case("old-specversion", "bad-attribute", b'{"n": 1}', specversion="0.3"),
        case("bad-time", "bad-attribute", b'{"n": 1}', time="yesterday"),
    ]
