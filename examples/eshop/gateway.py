"""gateway: the one synchronous entry point. HTTP (Starlette) outside, tidings inside.

A client speaks HTTP to the gateway only; the gateway turns each call into requests to the service
that owns the data (`bus.request`, a command out and a `Reply` back, never a held-open connection)
and composes the answers. It holds no state of its own.

    GET  /products                        catalog  ListProducts
    PUT  /products/{id}/price             catalog  ChangeProductPrice   {"price": "3.50"}
    GET  /baskets/{buyer}                 basket   GetBasket
    POST /baskets/{buyer}/items           catalog  GetProduct, then basket AddBasketItem
                                                                        {"product_id": 1, "quantity": 2}
    POST /baskets/{buyer}/checkout        basket   CheckoutBasket       -> 202 and the order's URL
    GET  /orders/{order_id}               ordering GetOrder             -> pending, confirmed, cancelled

An `X-Correlation-Id` request header becomes the correlation id of every message the call causes
(a new one otherwise), so the trace of one HTTP call can be followed through every service.

The bus lives in the app's lifespan (`bus.running()`, docs/web-apps.md): started before the first
HTTP call, consumed under supervision while the server runs, stopped after the last call.

    python -m examples.eshop.gateway --transport sqlite:///bus.db [--port 8000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import uvicorn
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from examples.eshop import messages as m
from examples.eshop.service import Names, emit, parse_options, start_tracing, write_stats
from tidings import Bus, Command, RemoteError, Reply, RequestTimeout

#: How long one HTTP call waits for a service's reply before answering 504.
REQUEST_TIMEOUT = 5.0

R = TypeVar("R", bound=Reply)
Endpoint = Callable[[Request], Awaitable[Response]]


def make_bus(names: Names, transport: str) -> Bus:
    """The gateway's bus: it only asks (requests), so it routes and handles nothing."""
    bus = Bus(names.gateway, transport)
    owners: dict[str, tuple[type[Command], ...]] = {
        names.catalog: (m.GetProduct, m.ListProducts, m.ChangeProductPrice),
        names.basket: (m.AddBasketItem, m.GetBasket, m.CheckoutBasket),
        names.ordering: (m.GetOrder,),
    }
    for owner, commands in owners.items():
        for command in commands:
            bus.route(command, to=owner)
    return bus


def _json(model: BaseModel, status_code: int = 200, **extra: Any) -> JSONResponse:
    return JSONResponse({**model.model_dump(mode="json"), **extra}, status_code=status_code)


def _problem(status_code: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code)


def make_app(
    bus: Bus,
    *,
    started: Callable[[], None] | None = None,
    failed: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """The HTTP application over `bus`, which its lifespan runs.

    `started` is called once the bus is running, before the first HTTP call is answered; `failed`
    with the error that ended the bus (at startup, or a fatal one later), before it is raised.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            async with bus.running():
                if started is not None:
                    started()
                yield
        except Exception as error:
            if failed is not None:
                failed(error)
            raise

    async def ask(request: Request, command: Command, expect: type[R]) -> R:
        correlation_id = request.headers.get("x-correlation-id") or f"http-{uuid.uuid4().hex[:12]}"
        request.state.correlation_id = correlation_id
        return await bus.request(
            command, expect=expect, timeout=REQUEST_TIMEOUT, correlation_id=correlation_id
        )

    def endpoint(handler: Endpoint) -> Endpoint:
        """Map the bus's failures to HTTP and echo the correlation id."""

        async def call(request: Request) -> Response:
            try:
                response = await handler(request)
            except RequestTimeout as error:
                response = _problem(504, str(error))
            except RemoteError as error:
                response = _problem(502, str(error))
            correlation_id = getattr(request.state, "correlation_id", None)
            if correlation_id:
                response.headers["x-correlation-id"] = correlation_id
            return response

        return call

    @endpoint
    async def list_products(request: Request) -> Response:
        return _json(await ask(request, m.ListProducts(), m.ProductList))

    @endpoint
    async def change_price(request: Request) -> Response:
        body = await request.json()
        try:
            price = Decimal(str(body["price"]))
        except (KeyError, TypeError, InvalidOperation):
            return _problem(422, 'expected {"price": "12.50"}')
        if not price.is_finite() or price <= 0:
            return _problem(422, "a price is a positive number")
        product_id = int(request.path_params["product_id"])
        result = await ask(
            request, m.ChangeProductPrice(product_id=product_id, new_price=price), m.PriceChangeResult
        )
        if result.product is None:
            return _problem(404, f"no product {product_id}")
        return _json(result)

    @endpoint
    async def get_basket(request: Request) -> Response:
        return _json(await ask(request, m.GetBasket(buyer=request.path_params["buyer"]), m.BasketView))

    @endpoint
    async def add_item(request: Request) -> Response:
        body = await request.json()
        try:
            product_id, quantity = int(body["product_id"]), int(body.get("quantity", 1))
        except (KeyError, TypeError, ValueError):
            return _problem(422, 'expected {"product_id": 1, "quantity": 2}')
        if quantity < 1:
            return _problem(422, "quantity must be at least 1")
        # The gateway composes: catalog knows the product and its price now, basket keeps it.
        details = await ask(request, m.GetProduct(product_id=product_id), m.ProductDetails)
        if details.product is None:
            return _problem(404, f"no product {product_id}")
        command = m.AddBasketItem(
            buyer=request.path_params["buyer"],
            product_id=product_id,
            product_name=details.product.name,
            unit_price=details.product.price,
            quantity=quantity,
        )
        return _json(await ask(request, command, m.BasketView))

    @endpoint
    async def checkout(request: Request) -> Response:
        result = await ask(request, m.CheckoutBasket(buyer=request.path_params["buyer"]), m.CheckoutResult)
        if result.order_id is None:
            return _problem(409, result.reason or "cannot check out")
        # 202: the order is on its way, not done; the client follows it at its URL.
        return _json(result, 202, status_url=f"/orders/{result.order_id}")

    @endpoint
    async def get_order(request: Request) -> Response:
        view = await ask(request, m.GetOrder(order_id=request.path_params["order_id"]), m.OrderView)
        if view.status is None:
            # Checkout answered, but PlaceOrder has not reached ordering yet: not an error, not yet.
            return _json(view, 404, detail="ordering has not seen this order yet")
        return _json(view)

    async def health(request: Request) -> Response:
        return JSONResponse({"service": bus.service})

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/health", health),
            Route("/products", list_products),
            Route("/products/{product_id:int}/price", change_price, methods=["PUT"]),
            Route("/baskets/{buyer}", get_basket),
            Route("/baskets/{buyer}/items", add_item, methods=["POST"]),
            Route("/baskets/{buyer}/checkout", checkout, methods=["POST"]),
            Route("/orders/{order_id}", get_order),
        ],
    )


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # main() handles SIGINT/SIGTERM itself: uvicorn's own handling re-raises the signal after a
        # clean shutdown, and the process would die of it instead of exiting 0.
        yield


async def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (default: a free one)")
    options = parse_options(__doc__ or "gateway", database=None, extra=own)
    start_tracing(options, options.names.gateway)
    bus = make_bus(options.names, options.transport)
    failures: list[BaseException] = []
    # Port 0: the OS picks a free one, reported in `ready`. The socket listens from here on, so a
    # client that comes before uvicorn accepts waits in the backlog.
    with socket.create_server(("127.0.0.1", options.extra["port"])) as sock:
        port = sock.getsockname()[1]

        def started() -> None:
            emit("ready", service=bus.service, port=port, url=f"http://127.0.0.1:{port}")

        def failed(error: BaseException) -> None:
            # uvicorn logs an error out of the lifespan after startup but goes on serving, every
            # call then failing on the closed bus: stop instead, and exit with an error.
            failures.append(error)
            server.should_exit = True

        app = make_app(bus, started=started, failed=failed)
        if options.trace_dir is not None:
            from examples.eshop.tracing import HttpSpans

            app = HttpSpans(app)  # a SERVER span per HTTP call: the root of its trace
        server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, lambda: setattr(server, "should_exit", True))
        await server.serve(sockets=[sock])
    if options.stats is not None:
        write_stats(bus, options.stats)
    if failures:
        raise SystemExit(f"{bus.service}: the bus failed: {failures[0]!r}")
    emit("stopped", service=bus.service)


if __name__ == "__main__":
    asyncio.run(main())
