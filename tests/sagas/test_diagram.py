"""`tidings saga diagram`: the Mermaid diagram drawn from a saga's declarations."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT
from tests.sagas.sagas import Counting
from tests.sagas.test_steps import OrderProcess
from tidings.sagas.declarations import definition_of
from tidings.sagas.diagram import mermaid


def test_a_saga_with_states_is_a_state_diagram_of_its_steps() -> None:
    assert mermaid(definition_of(OrderProcess)).splitlines() == [
        "stateDiagram-v2",
        "    %% saga order-process (state: Order)",
        "    [*] --> reserving : OrderPlaced by order_id",
        "    reserving --> charging : StockReserved by order_id",
        "    charging --> confirmed : PaymentSucceeded by order_id",
        "    charging --> cancelled : PaymentTimedOut (timeout)",
        "    cancelled --> [*]",
        "    confirmed --> [*]",
    ]


def test_a_saga_without_states_is_a_flowchart_of_its_messages() -> None:
    assert mermaid(definition_of(Counting)).splitlines() == [
        "flowchart LR",
        "    saga((counting))",
        "    m0[Step by key] -- starts --> saga",
    ]


def test_the_command_prints_it_and_refuses_what_is_no_saga() -> None:
    command = [sys.executable, "-m", "tidings", "saga", "diagram"]
    shown = subprocess.run(
        [*command, "tests.sagas.test_steps:OrderProcess"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout == mermaid(definition_of(OrderProcess))
    refused = subprocess.run([*command, "tests.sagas.sagas:Tally"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "is not a Saga subclass" in refused.stderr
