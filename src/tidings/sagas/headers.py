"""The headers a saga puts on the messages it schedules to itself (`SagaContext.timeout`).

A timeout travels to the saga's own service like any command; these headers say which saga
instance it is for, so its handler needs no key in the message, and that it is a timeout, so one
that arrives after the saga completed is ignored and counted instead of treated as news.
"""

from __future__ import annotations

__all__ = ["SAGA", "SAGA_KEY", "SAGA_TIMEOUT"]

#: The saga type (its `Saga` name) the message belongs to.
SAGA = "tidings-saga"
#: The key of the saga instance it belongs to.
SAGA_KEY = "tidings-saga-key"
#: Present (the saga's name) on a timeout the saga scheduled to itself.
SAGA_TIMEOUT = "tidings-saga-timeout"
