"""tidings.testing: test a service's handlers on the real bus, without running its neighbours.

    from tidings.testing import Harness

    async with Harness(bus) as h:                        # the bus on a private memory broker
        await h.send(CheckoutBasket(buyer="alice"))      # as if from another service
        await h.idle()                                   # every message in flight settled
        assert h.sent(PlaceOrder)[0].buyer == "alice"    # what the bus sent on
        assert h.handled(CheckoutBasket) and not h.dead_lettered

The pytest plugin (`tidings.testing.pytest_plugin`, registered as a `pytest11` entry point) adds
the `tidings_harness` fixture and the `--tidings-transport URL` option. docs/testing.md is the guide.
"""

from tidings.dead_letters import FailedMessage, Fault
from tidings.testing.clock import Clock
from tidings.testing.harness import DEFAULT_TIMEOUT, Harness, HarnessOptions, RetryDelays
from tidings.testing.recording import Delivered, Outcome, Outgoing, RecordingTransport

__all__ = [
    "DEFAULT_TIMEOUT",
    "Clock",
    "Delivered",
    "FailedMessage",
    "Fault",
    "Harness",
    "HarnessOptions",
    "Outcome",
    "Outgoing",
    "RecordingTransport",
    "RetryDelays",
]
