"""Sagas: business processes that span services, persisted, correlated, timed out, compensated.

    from tidings import Saga, SagaContext, starts, handles, timeout

    class OrderProcess(Saga[OrderState], final=("confirmed", "cancelled")):
        @starts(OrderPlaced, by="order_id", to="reserving")
        async def placed(self, event: OrderPlaced, ctx: SagaContext) -> None: ...

    bus.saga(OrderProcess)       # a bus with a database: the state lives in tidings_sagas

The modules, top to bottom (each imports only from those below it):

- `registry`: `Sagas`, a service's sagas, their store and counters (what the bus holds);
- `runner`: one step: find, load, call, save, run again on a conflict; `diagram`: Mermaid;
- `store`: the `tidings_sagas` table (SQLAlchemy); `context`: `SagaContext`;
- `declarations`: `Saga`, `starts`/`handles`/`timeout`, finders; `settings`, `stats`, `headers`.

This package's `__init__` imports only what needs no SQLAlchemy (docs/sagas.md).
"""

from tidings.sagas.context import SagaContext
from tidings.sagas.declarations import (
    Finder,
    MissingPolicy,
    Saga,
    correlation,
    handles,
    header,
    starts,
    timeout,
)
from tidings.sagas.settings import SagaSettings
from tidings.sagas.stats import SagaStats, Transition

__all__ = [
    "Finder",
    "MissingPolicy",
    "Saga",
    "SagaContext",
    "SagaSettings",
    "SagaStats",
    "Transition",
    "correlation",
    "handles",
    "header",
    "starts",
    "timeout",
]
