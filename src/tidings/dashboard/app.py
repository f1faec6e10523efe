"""The dashboard's web application (Starlette): server-rendered pages, fragments, events.

    /                          services: instances, rates, timings, retries, failures, backlog
    /failed                    failed messages, grouped; /failed/message one of them
    /confirm  -> POST /act     replay one, a group, all; purge — after a confirmation page
    /conversations             find by correlation id, message id or a value in a body
    /conversation?id=...       one conversation as a sequence diagram
    /message/{row}             one delivery's record: outcome, headers, body
    /fragment/...              the live parts of the pages, re-fetched on each event
    /events                    server-sent events: message, heartbeat, failed
    /static/...                the page's CSS and its one small script

Pages are whole HTML documents without JavaScript; `static/dashboard.js` only re-fetches the
fragments marked `data-live` when `/events` says something arrived.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from tidings.dashboard.depth import queue_depths
from tidings.dashboard.diagram import build_diagram
from tidings.dashboard.failed import FailedMessages
from tidings.dashboard.live import Live
from tidings.dashboard.overview import WINDOW, overview
from tidings.dashboard.security import Guard
from tidings.dashboard.store import Store, distinct

__all__ = ["Parts", "make_app"]

_HERE = resources.files("tidings.dashboard")
#: Bytes of a posted form read: the forms hold a few ids.
_MAX_FORM = 64 * 1024


@dataclass(frozen=True, slots=True)
class Parts:
    """What the pages read and act through."""

    store: Store
    failed: FailedMessages
    live: Live
    guard: Guard
    #: What the page header says the dashboard watches (the transport, credentials hidden).
    transport_label: str


def _when(moment: float | None) -> str:
    if moment is None:
        return "-"
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _pretty(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def _body(data: bytes) -> str:
    try:
        return _pretty(data.decode("utf-8"))
    except UnicodeDecodeError:
        return f"(not UTF-8, {len(data)} bytes) {data[:200]!r}"


def make_app(parts: Parts) -> Starlette:
    """The application over `parts` (whose lifetimes the caller manages)."""
    templates = Jinja2Templates(directory=str(_HERE / "templates"))
    templates.env.filters.update(when=_when, ms=_ms, ago=_ago, pretty=_pretty, body=_body)
    templates.env.globals.update(transport=parts.transport_label, needs_token=parts.guard.needs_token)
    store, failed, live, guard = parts.store, parts.failed, parts.live, parts.guard

    def page(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    async def service_views() -> list[Any]:
        names = await store.services()
        now = time.time()
        counts, durations = await store.window(now - WINDOW)
        return overview(
            names,
            await store.instances(),
            counts,
            durations,
            await failed.counts(names),
            await queue_depths(failed.transport, names),
            now=now,
        )

    async def services_page(request: Request) -> Response:
        return page(request, "services.html", services=await service_views(), window=WINDOW)

    async def services_fragment(request: Request) -> Response:
        return page(request, "_services.html", services=await service_views(), window=WINDOW)

    async def groups() -> list[Any]:
        return await failed.groups(await store.services())

    async def failed_page(request: Request) -> Response:
        done = request.query_params.get("done")
        return page(request, "failed.html", groups=await groups(), done=done)

    async def failed_fragment(request: Request) -> Response:
        return page(request, "_failed.html", groups=await groups())

    async def failed_message(request: Request) -> Response:
        service = request.query_params.get("service", "")
        message_id = request.query_params.get("id", "")
        found = await failed.get(service, message_id)
        if found is None:
            return page(request, "missing.html", 404, what=f"dead letter {message_id} of {service}")
        deliveries = await store.deliveries_of(message_id)
        return page(request, "failed_message.html", service=service, failed=found, deliveries=deliveries)

    async def confirm(request: Request) -> Response:
        action = _action(request.query_params)
        if action is None:
            return page(request, "missing.html", 400, what="an action to confirm")
        count = await _count(action)
        return page(request, "confirm.html", action=action, count=count)

    async def _count(action: dict[str, str]) -> int:
        kind, service = action["action"], action.get("service", "")
        if kind == "replay-one":
            return 1
        if kind == "replay-group":
            found = await failed.groups([service])
            return sum(len(g.messages) for g in found if g.key == action["group"])
        services = [service] if service else await store.services()
        counts = await failed.counts(services)
        return sum(counts.get(s) or 0 for s in services)

    async def act(request: Request) -> Response:
        # The confirmation forms are urlencoded: parsed here rather than with python-multipart.
        body = (await request.body())[:_MAX_FORM].decode("utf-8", errors="replace")
        fields = {key: values[0] for key, values in parse_qs(body).items()}
        action = _action(fields)
        if action is None:
            return page(request, "missing.html", 400, what="an action")
        refusal = guard.refusal(request, fields.get("token"))
        if refusal is not None:
            return page(request, "refused.html", 403, reason=refusal)
        kind, service = action["action"], action.get("service", "")
        services = [service] if service else await store.services()
        if kind == "replay-one":
            moved = await failed.replay(service, [action["id"]])
            done = f"replayed {moved} message onto {service}"
        elif kind == "replay-group":
            moved = await failed.replay_group(service, action["group"])
            done = f"replayed {moved} messages onto {service}"
        elif kind == "replay-all":
            moved = await failed.replay_all(services)
            done = f"replayed {moved} messages"
        else:
            purged = await failed.purge(services)
            done = f"purged {purged} dead letters"
        live.publish("failed")
        return RedirectResponse("/failed?" + urlencode({"done": done}), status_code=303)

    async def conversations_page(request: Request) -> Response:
        query = request.query_params.get("q", "").strip()
        if query:
            ids = await store.find(query)
            if len(ids) == 1:
                return RedirectResponse("/conversation?" + urlencode({"id": ids[0]}), status_code=303)
        else:
            ids = distinct(s.record.correlation_id for s in await store.recent())[:30]
        first = await store.first_records(ids)
        return page(request, "conversations.html", query=query, ids=ids, first=first)

    async def diagram_of(request: Request) -> Any:
        correlation_id = request.query_params.get("id", "")
        return build_diagram(correlation_id, await store.conversation(correlation_id))

    async def conversation_page(request: Request) -> Response:
        diagram = await diagram_of(request)
        if not diagram.arrows:
            return page(request, "missing.html", 404, what=f"conversation {diagram.correlation_id}")
        return page(request, "conversation.html", diagram=diagram)

    async def conversation_fragment(request: Request) -> Response:
        return page(request, "_diagram.html", diagram=await diagram_of(request))

    async def message_page(request: Request) -> Response:
        stored = await store.record(int(request.path_params["row"]))
        if stored is None:
            return page(request, "missing.html", 404, what="that record")
        deliveries = await store.deliveries_of(stored.record.message_id)
        return page(request, "message.html", stored=stored, deliveries=deliveries)

    async def events(request: Request) -> Response:
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(live.stream(), media_type="text/event-stream", headers=headers)

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)

    return Starlette(
        routes=[
            Route("/", services_page),
            Route("/fragment/services", services_fragment),
            Route("/failed", failed_page),
            Route("/fragment/failed", failed_fragment),
            Route("/failed/message", failed_message),
            Route("/confirm", confirm),
            Route("/act", act, methods=["POST"]),
            Route("/conversations", conversations_page),
            Route("/conversation", conversation_page),
            Route("/fragment/conversation", conversation_fragment),
            Route("/message/{row:int}", message_page),
            Route("/events", events),
            Route("/favicon.ico", favicon),
            Mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static"),
        ]
    )


_ACTIONS = {
    "replay-one": ("service", "id"),
    "replay-group": ("service", "group"),
    "replay-all": (),
    "purge": (),
}


def _action(fields: Any) -> dict[str, str] | None:
    """The action named in a query or form, with what it needs; None when it is incomplete."""
    kind = fields.get("action")
    if kind not in _ACTIONS:
        return None
    action = {"action": str(kind)}
    for name in _ACTIONS[kind]:
        value = fields.get(name)
        if not value:
            return None
        action[name] = str(value)
    if fields.get("service"):
        action["service"] = str(fields.get("service"))
    return action
