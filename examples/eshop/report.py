"""The demo's live trace and its closing summary.

Every handler call in every service arrives here as a `trace` line (see `service.trace`) and is
printed at once, one line per delivery: when, which service, which message, its correlation id,
who sent it and how it went. The orchestrator adds its own lines (HTTP calls, order statuses).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from examples.eshop.service import Names

#: Requests the client repeats while it waits (order status, basket): counted, not printed.
POLLS = frozenset({"ordering.get-order", "basket.get"})

_COLORS = {
    "catalog": "36",
    "basket": "33",
    "ordering": "35",
    "payment": "34",
    "gateway": "32",
    "client": "1",
    "demo": "1;31",
}


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile (`p` in 0-100) of non-empty `values`."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


class Trace:
    """Prints the trace as it happens and keeps what the summary needs."""

    def __init__(self, names: Names, *, out: TextIO | None = None, verbose: bool = False) -> None:
        self.names = names
        self.out = out or sys.stdout
        self.verbose = verbose
        self.color = self.out.isatty() and not os.environ.get("NO_COLOR")
        self.started = time.time()
        #: Every trace line received, in arrival order.
        self.deliveries: list[Mapping[str, Any]] = []

    # -- input ---------------------------------------------------------------------------------

    def on_line(self, line: Mapping[str, Any]) -> None:
        """A JSON line from a service (the `Deployment` listener)."""
        if line.get("kind") == "trace":
            self.deliveries.append(line)
            if self.verbose or line["type"] not in POLLS or line["outcome"] != "ok":
                self._delivery(line)
        elif line.get("kind") == "ready":
            self.say(self.short(line["service"]), "ready" + (f" at {line['url']}" if "url" in line else ""))
        elif line.get("kind") == "saga":  # a step of ordering's order process (ordering.py)
            self._saga_step(line)
        elif line.get("kind") == "stopped":
            self.say(self.short(line["service"]), "stopped cleanly (in-flight messages settled)")

    def _saga_step(self, line: Mapping[str, Any]) -> None:
        after = f"{line['after']} (completed)" if line["completed"] else line["after"]
        moved = f"{line['before']} -> {after}" if line["before"] else f"started -> {after}"
        self.say(
            self.short(line["service"]), f"saga {line['key']}: {moved} on {line['message']}", at=line["t"]
        )

    def seen(self, predicate: Callable[[Mapping[str, Any]], bool]) -> bool:
        return any(predicate(line) for line in self.deliveries)

    # -- output --------------------------------------------------------------------------------

    def short(self, service: str) -> str:
        """A service's name without the deployment's suffix."""
        suffix = self.names.suffix
        return service[: -len(suffix)] if suffix and service.endswith(suffix) else service

    def _paint(self, who: str, text: str) -> str:
        code = _COLORS.get(who)
        return f"\x1b[{code}m{text}\x1b[0m" if self.color and code else text

    def say(self, who: str, text: str, *, at: float | None = None) -> None:
        elapsed = (at or time.time()) - self.started
        print(f"{elapsed:7.3f}s  {self._paint(who, f'{who:9}')}{text}", file=self.out, flush=True)

    def heading(self, text: str) -> None:
        print(f"\n{self._paint('client', '== ' + text)}", file=self.out, flush=True)

    def _delivery(self, line: Mapping[str, Any]) -> None:
        outcome = line["outcome"]
        if outcome == "ok":
            how = f"ok, {line['took_ms']:.0f} ms (waited {line['queued_ms']:.0f} ms)"
        elif outcome == "duplicate":
            how = self._paint("demo", "DUPLICATE: handled before, acknowledged without calling the handler")
        else:
            how = self._paint("demo", f"FAILED attempt {line['attempt']}: {line['error']}")
        if outcome == "ok" and line["attempt"] > 1:
            how += f", attempt {line['attempt']}"
        text = (
            f"<- {line['type']:27} corr {line['correlation_id']:16} from {self.short(line['source']):9} {how}"
        )
        self.say(self.short(line["service"]), text, at=line["t"])

    # -- summary -------------------------------------------------------------------------------

    def summary(
        self,
        stats: Mapping[str, Mapping[str, int]],
        order_latencies: Sequence[float],
        problems: Sequence[str],
    ) -> None:
        def total(counter: str) -> int:
            return sum(service.get(counter, 0) for service in stats.values())

        def by_service(counter: str) -> str:
            parts = [f"{name} {values[counter]}" for name, values in stats.items() if values.get(counter)]
            return f"  ({', '.join(parts)})" if parts else ""

        waits = [line["queued_ms"] / 1000 for line in self.deliveries if line["attempt"] == 1]
        rows = [
            ("messages handled", f"{total('handled')}{by_service('handled')}"),
            ("duplicates suppressed", f"{total('duplicates')}{by_service('duplicates')}"),
            (
                "retries",
                f"{total('retries_scheduled')} scheduled after {total('failed_attempts')} failed "
                f"attempt(s){by_service('retries_scheduled')}",
            ),
            ("dead letters", f"{total('dead_lettered')}{by_service('dead_lettered')}"),
        ]
        if order_latencies:
            rows.append(
                (
                    "checkout -> final status",
                    f"p50 {milliseconds(percentile(order_latencies, 50))}, "
                    f"p99 {milliseconds(percentile(order_latencies, 99))}  ({len(order_latencies)} orders)",
                )
            )
        if waits:
            rows.append(
                (
                    "message sent -> handled",
                    f"p50 {milliseconds(percentile(waits, 50))}, p99 {milliseconds(percentile(waits, 99))}"
                    f"  ({len(waits)} deliveries)",
                )
            )
        # The databases' final state, the counters above and the exit codes, all checked.
        rows.append(("result", "everything as expected" if not problems else f"{len(problems)} problem(s)"))
        self.heading("Summary")
        for label, value in rows:
            print(f"  {label:26} {value}", file=self.out)
        for problem in problems:
            print(f"  - {problem}", file=self.out)
        self.out.flush()
