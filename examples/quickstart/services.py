"""Two services, each run in its own OS process by `main.py`.

catalog publishes `ProductPriceChanged`; basket reacts and sends `ReviewPrice` (a command catalog
owns); catalog handles it and publishes `PriceReviewed`, which basket hears too. Each process stops
once it has seen what it expects.
"""

from __future__ import annotations

import asyncio
import os
import sys
from decimal import Decimal

from examples.quickstart.messages import PriceReviewed, ProductPriceChanged, ReviewPrice
from tidings import Bus, Context

PRODUCTS = 3


def say(service: str, text: str) -> None:
    print(f"[{service:7} pid {os.getpid()}] {text}", flush=True)


async def catalog(url: str) -> None:
    bus = Bus("catalog", url)
    reviewed = 0

    @bus.handle(ReviewPrice)
    async def review(command: ReviewPrice, ctx: Context) -> None:
        nonlocal reviewed
        verdict = "too cheap" if command.seen_price < 5 else "fine"
        say("catalog", f"review of product {command.product_id} at {command.seen_price}: {verdict}")
        await ctx.publish(PriceReviewed(product_id=command.product_id, verdict=verdict))
        reviewed += 1
        if reviewed == PRODUCTS:
            bus.stop()

    async with bus:
        for product_id in range(1, PRODUCTS + 1):
            price = Decimal(product_id * 3)
            await bus.publish(ProductPriceChanged(product_id=product_id, new_price=price))
            say("catalog", f"published ProductPriceChanged(product {product_id}, {price})")
        await bus.run()


async def basket(url: str) -> None:
    bus = Bus("basket", url)
    bus.route(ReviewPrice, to="catalog")
    verdicts = 0

    @bus.subscribe(ProductPriceChanged)
    async def reprice(event: ProductPriceChanged, ctx: Context) -> None:
        say("basket", f"got ProductPriceChanged(product {event.product_id}, {event.new_price})")
        await ctx.send(ReviewPrice(product_id=event.product_id, seen_price=event.new_price))
        say("basket", f"sent ReviewPrice(product {event.product_id}) to catalog")

    @bus.subscribe(PriceReviewed)
    async def on_verdict(event: PriceReviewed, ctx: Context) -> None:
        nonlocal verdicts
        say("basket", f"product {event.product_id} reviewed: {event.verdict}")
        verdicts += 1
        if verdicts == PRODUCTS:
            bus.stop()

    async with bus:
        print("ready", flush=True)
        await bus.run()


if __name__ == "__main__":
    role, url = sys.argv[1], sys.argv[2]
    asyncio.run(catalog(url) if role == "catalog" else basket(url))
