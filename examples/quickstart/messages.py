"""The messages the two quickstart services share (each could hold its own copy: wire names match)."""

from decimal import Decimal

from tidings import Command, Event


class ProductPriceChanged(Event):
    product_id: int
    new_price: Decimal


class ReviewPrice(Command, name="catalog.review-price"):
    product_id: int
    seen_price: Decimal


class PriceReviewed(Event):
    product_id: int
    verdict: str
