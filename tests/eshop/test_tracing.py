"""One checkout is one trace, across the eshop's five processes and their outboxes.

The scenario of `scripts/demo` runs with `--trace`: each process records its OpenTelemetry spans
(the SDK set up as an application would, a JSON-lines exporter per process), and the gateway's
SERVER span of each checkout call must be the root of one tree holding the work of every service
that call caused, each span under the right parent: a message's processing under the span that
created it, the relay's send under the outbox write it ships.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from examples.eshop.run import Result, run_demo
from examples.eshop.scenario import CHECKOUTS, FLAKY_BUYER, UNANSWERED_BUYER
from examples.eshop.tracing import checkout_root, draw, trace_of

pytestmark = pytest.mark.slow

SERVICES = {"gateway", "basket", "ordering", "payment", "catalog"}
#: The messages each checkout makes each service process (ordering's and catalog's depend on
#: whether the order is paid: carol's is over payment's limit).
PAID = {
    "gateway": ["basket.checkout-result"],
    "basket": ["basket.checkout"],
    "ordering": ["ordering.place-order", "StockReserved", "PaymentSucceeded"],
    "catalog": ["catalog.reserve-stock", "OrderConfirmed"],
    "payment": ["payment.charge"],
}
DECLINED = {
    **PAID,
    "ordering": ["ordering.place-order", "StockReserved", "PaymentFailed"],
    "catalog": ["catalog.reserve-stock", "OrderCancelled"],
}
#: frank's payment is never answered: ordering's order process times out (its own message).
UNANSWERED = {**DECLINED, "ordering": ["ordering.place-order", "StockReserved", "ordering.payment-timed-out"]}
#: The payment timeout every charged order schedules; for an order settled before it, it may fire
#: before the run ends (and be ignored by the saga), or not: it is left out of the comparison.
LATE_TIMEOUT = "ordering.payment-timed-out"


async def traced_run(transport: str, workdir: Path, suffix: str = "") -> Result:
    out = io.StringIO()
    result = await run_demo(transport, workdir, suffix=suffix, out=out, traced=True)
    assert result.problems == [], out.getvalue()
    # The run ends with the tree of the flaky buyer's checkout.
    assert f"The trace of {FLAKY_BUYER}'s checkout" in out.getvalue()
    return result


def check_checkout(spans: list[dict[str, Any]], buyer: str, short: Callable[[str], str]) -> None:
    root = checkout_root(spans, buyer)
    assert root is not None, f"no span of {buyer}'s checkout call"
    tree = trace_of(spans, root)
    picture = "\n".join(draw(spans, root, short=short))
    by_id = {span["span_id"]: span for span in tree}
    assert root["parent_id"] is None, picture
    assert root["kind"] == "SERVER", picture
    assert short(root["service"]) == "gateway"
    # One tree: every span's parent is in the trace, and the root is the only span without one.
    for span in tree:
        if span is not root:
            assert span["parent_id"] in by_id, f"{span['name']} hangs outside the tree\n{picture}"
    assert {short(span["service"]) for span in tree} == SERVICES, picture
    # Everything of the checkout's conversation is in this trace, none of it elsewhere.
    conversation = f"checkout-{buyer}"
    for span in spans:
        if span["attributes"].get("messaging.message.conversation_id") == conversation:
            assert span["trace_id"] == root["trace_id"], f"{span['name']} of {conversation} in another trace"
    processed: dict[str, list[str]] = {}
    for span in tree:
        attributes = span["attributes"]
        parent = by_id.get(span["parent_id"] or "")
        if span["kind"] == "CONSUMER":
            # A message's processing is a child of the span that created it, and linked to it.
            assert parent is not None, f"{span['name']}\n{picture}"
            assert parent["kind"] == "PRODUCER", f"{span['name']}\n{picture}"
            assert parent["attributes"]["messaging.message.id"] == attributes["messaging.message.id"]
            assert parent["span_id"] in span["links"]
            processed.setdefault(short(span["service"]), []).append(attributes["tidings.message.type"])
        elif span["kind"] == "CLIENT" and attributes.get("messaging.operation.type") == "send":
            # The relay's send of an outbox row: under the write that stored it, in the same service.
            assert parent is not None, picture
            assert parent["attributes"]["messaging.operation.type"] == "create", picture
            assert parent["attributes"]["messaging.message.id"] == attributes["messaging.message.id"]
            assert parent["span_id"] in span["links"]
            assert parent["service"] == span["service"]
        elif span["kind"] == "PRODUCER" and attributes.get("messaging.operation.type") == "create":
            # Written in a handler's transaction: under that handler's processing.
            assert parent is not None, picture
            assert parent["kind"] == "CONSUMER", picture
    expected: Mapping[str, list[str]] = DECLINED if buyer == "carol" else PAID
    if buyer == UNANSWERED_BUYER:
        expected = UNANSWERED
    else:
        processed["ordering"] = [kind for kind in processed.get("ordering", []) if kind != LATE_TIMEOUT]
    if buyer == FLAKY_BUYER:
        # The first charge failed and was retried: two deliveries, both under the one send.
        expected = {**expected, "payment": ["payment.charge", "payment.charge"]}
        failed, retried = sorted(
            (
                span
                for span in tree
                if span["name"].startswith("process") and short(span["service"]) == "payment"
            ),
            key=lambda span: span["start"],
        )
        assert failed["attributes"]["error.type"].endswith("ProviderTimeout")
        assert "tidings.retry_scheduled" in [event["name"] for event in failed["events"]]
        assert failed["parent_id"] == retried["parent_id"]
        assert "error.type" not in retried["attributes"]
    assert {service: sorted(types) for service, types in processed.items()} == {
        service: sorted(types) for service, types in expected.items()
    }, picture


def shortener(suffix: str) -> Callable[[str], str]:
    return lambda service: service[: -len(suffix)] if suffix and service.endswith(suffix) else service


async def test_each_checkout_is_one_trace_through_every_service_on_sqlite(tmp_path: Path) -> None:
    result = await traced_run(f"sqlite:///{tmp_path / 'bus.db'}", tmp_path)
    for buyer in CHECKOUTS:
        check_checkout(result.spans, buyer, shortener(""))
    spans = result.spans
    assert {span["attributes"].get("messaging.system") for span in spans} >= {"tidings.sqlite"}


@pytest.mark.rabbitmq
async def test_each_checkout_is_one_trace_through_every_service_on_rabbitmq(
    rabbitmq_url: str, name: Callable[[str], str], tmp_path: Path
) -> None:
    suffix = name("")
    result = await traced_run(rabbitmq_url, tmp_path, suffix=suffix)
    for buyer in CHECKOUTS:
        check_checkout(result.spans, buyer, shortener(suffix))
    sends = [span for span in result.spans if span["attributes"].get("messaging.operation.type") == "send"]
    assert sends
    assert all(span["attributes"]["messaging.system"] == "rabbitmq" for span in sends)
    assert all("messaging.rabbitmq.destination.routing_key" in span["attributes"] for span in sends)
