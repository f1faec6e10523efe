"""The contracts the eshop services share: every message that crosses a service boundary.

Each service could hold its own copy of the classes it uses (receivers are tolerant readers and
match on wire names); one shared module keeps the sample short. Wire names are explicit and
prefixed with the owning service for commands and replies, so renaming a Python class never
changes what travels.

Who sends what:

    gateway  -> catalog   GetProduct, ListProducts, ChangeProductPrice   (requests)
    gateway  -> basket    AddBasketItem, GetBasket, CheckoutBasket       (requests)
    gateway  -> ordering  GetOrder                                       (request)
    catalog  => *         ProductPriceChanged, StockReserved, StockReservationFailed
    basket   -> ordering  PlaceOrder
    ordering -> catalog   ReserveStock
    ordering -> payment   ChargePayment
    ordering => *         OrderConfirmed, OrderCancelled
    ordering -> ordering  PaymentTimedOut (the order process's timeout, to itself)
    payment  => *         PaymentSucceeded, PaymentFailed

(`->` a command to its one owner, `=>` an event to every subscriber.)
"""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, ConfigDict

from tidings import Command, Event, Reply


class Line(BaseModel):
    """One product and quantity at a unit price, as carried inside messages."""

    model_config = ConfigDict(frozen=True)

    product_id: int
    product_name: str
    unit_price: Decimal
    quantity: int


class Product(BaseModel):
    """A product as catalog shows it."""

    model_config = ConfigDict(frozen=True)

    id: int
    name: str
    price: Decimal
    stock: int


# -- catalog -------------------------------------------------------------------------------------


class GetProduct(Command, name="catalog.get-product"):
    product_id: int


class ProductDetails(Reply, name="catalog.product-details"):
    product: Product | None


class ListProducts(Command, name="catalog.list-products"):
    pass


class ProductList(Reply, name="catalog.product-list"):
    products: list[Product]


class ChangeProductPrice(Command, name="catalog.change-price"):
    product_id: int
    new_price: Decimal


class PriceChangeResult(Reply, name="catalog.price-change-result"):
    product: Product | None
    old_price: Decimal | None = None


class ProductPriceChanged(Event):
    product_id: int
    product_name: str
    old_price: Decimal
    new_price: Decimal


class ReserveStock(Command, name="catalog.reserve-stock"):
    order_id: str
    lines: list[Line]


class StockReserved(Event):
    order_id: str


class StockReservationFailed(Event):
    order_id: str
    reason: str


# -- basket --------------------------------------------------------------------------------------


class AddBasketItem(Command, name="basket.add-item"):
    buyer: str
    product_id: int
    product_name: str
    unit_price: Decimal
    quantity: int


class GetBasket(Command, name="basket.get"):
    buyer: str


class BasketView(Reply, name="basket.view"):
    buyer: str
    lines: list[Line]
    total: Decimal
    #: What changed under the buyer's feet (price changes), oldest first.
    notices: list[str]


class CheckoutBasket(Command, name="basket.checkout"):
    buyer: str


class CheckoutResult(Reply, name="basket.checkout-result"):
    order_id: str | None
    #: Why there is no order (an empty basket), when there is none.
    reason: str | None = None


# -- ordering ------------------------------------------------------------------------------------


class PlaceOrder(Command, name="ordering.place-order"):
    order_id: str
    buyer: str
    lines: list[Line]


class GetOrder(Command, name="ordering.get-order"):
    order_id: str


class OrderView(Reply, name="ordering.order-view"):
    order_id: str
    #: None while ordering has not seen the order yet (PlaceOrder still on its way).
    status: str | None
    buyer: str | None = None
    step: str | None = None
    total: Decimal | None = None
    reason: str | None = None


class PaymentTimedOut(Command, name="ordering.payment-timed-out"):
    """The order process's own timeout: no answer from payment in time (`ctx.timeout`)."""


class OrderConfirmed(Event):
    order_id: str


class OrderCancelled(Event):
    order_id: str
    reason: str


# -- payment -------------------------------------------------------------------------------------


class ChargePayment(Command, name="payment.charge"):
    order_id: str
    buyer: str
    amount: Decimal


class PaymentSucceeded(Event):
    order_id: str
    amount: Decimal


class PaymentFailed(Event):
    order_id: str
    reason: str
