"""Run the eshop: start every service in its own process, drive the scenario, check the end state.

    python -m examples.eshop.run                                    # the embedded SQLite transport
    python -m examples.eshop.run --transport amqp://guest:guest@127.0.0.1:5672/

Prints a live trace of every message handled (service, type, correlation id, sender, outcome),
then a summary, and exits 0 only when every service's database holds what the scenario should
have left there and the counters say what they should (one duplicate suppressed, one retry, no
dead letter). Ctrl-C stops every service cleanly (SIGTERM, in-flight messages finished) and exits 130.

With `--trace` every process records its OpenTelemetry spans (`tracing.py`), and the run ends with
the trace of one checkout drawn as a tree: the HTTP call, the request to basket, the outboxes and
their relays, and the work of ordering, catalog and payment that the order caused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx

from examples.eshop.processes import SERVICES, Deployment
from examples.eshop.report import Trace, milliseconds
from examples.eshop.scenario import (
    FLAKY_BUYER,
    PATIENCE,
    PAYMENT_LIMIT,
    PAYMENT_TIMEOUT,
    POLL_INTERVAL,
    UNANSWERED_BUYER,
    Outcome,
    Tap,
    differences,
    read_state,
    run_scenario,
    stats_problems,
)
from examples.eshop.service import Names


@dataclass(slots=True)
class Result:
    """Everything a run leaves behind, for the exit code and for tests."""

    outcome: Outcome = field(default_factory=Outcome)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: With tracing: every span every process recorded (`tracing.read_spans`).
    spans: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


async def _converge(deployment: Deployment, trace: Trace, result: Result) -> None:
    """Wait until the databases hold the expected state: the last events may still be on their way."""
    databases = {name: deployment.database(name) for name in SERVICES if name != "gateway"}
    started = time.monotonic()
    while True:
        result.state = read_state(databases, result.outcome.orders)
        problems = differences(result.state)
        if not problems:
            trace.say(
                "demo",
                f"every database holds the expected state ({milliseconds(time.monotonic() - started)})",
            )
            return
        if time.monotonic() - started > PATIENCE:
            result.problems += problems
            return
        await asyncio.sleep(POLL_INTERVAL)


async def run_demo(
    transport: str,
    workdir: Path,
    *,
    suffix: str = "",
    out: TextIO | None = None,
    verbose: bool = False,
    deployment_holder: list[Deployment] | None = None,
    traced: bool = False,
) -> Result:
    """Start the eshop, run the scenario, stop everything, and report what happened.

    `traced`: every process records its spans in `workdir/spans`, and the report ends with the
    trace of `TRACED_BUYER`'s checkout.
    """
    names = Names(suffix)
    trace = Trace(names, out=out, verbose=verbose)
    result = Result()
    options = {
        "payment": [
            *("--limit", str(PAYMENT_LIMIT), "--flaky-buyer", FLAKY_BUYER),
            *("--unanswered-buyer", UNANSWERED_BUYER),
        ],
        "ordering": ["--payment-timeout", str(PAYMENT_TIMEOUT)],
    }
    trace_dir = workdir / "spans" if traced else None
    deployment = Deployment(transport, workdir, names, trace.on_line, options, trace_dir=trace_dir)
    if deployment_holder is not None:
        deployment_holder.append(deployment)
    trace.heading(f"Starting catalog, basket, ordering, payment and gateway on {_redacted(transport)}")
    started = False
    try:
        async with deployment:
            started = True
            async with (
                Tap(names.tap, transport) as tap,
                httpx.AsyncClient(base_url=deployment.gateway_url, timeout=PATIENCE) as client,
            ):
                result.outcome = await run_scenario(client, trace, tap, names.basket)
            await _converge(deployment, trace, result)
            trace.heading("Stopping every service (SIGTERM)")
    except (TimeoutError, RuntimeError, httpx.HTTPError) as error:
        result.problems.append(f"the scenario stopped: {type(error).__name__}: {error}")
    result.stats = deployment.stats()
    result.exit_codes = dict(deployment.exit_codes)
    if started:  # before every service was up, counters and exit codes say nothing more
        result.problems += stats_problems(result.stats)
        result.problems += [
            f"{name} exited with {code} (see {deployment.workdir / (name + '.log')})"
            for name, code in result.exit_codes.items()
            if code != 0
        ]
    trace.summary(result.stats, list(result.outcome.latencies.values()), result.problems)
    if trace_dir is not None:
        _draw_checkout(trace, trace_dir, result)
    return result


#: The checkout whose trace `--trace` draws: the one whose payment failed once and was retried.
TRACED_BUYER = FLAKY_BUYER


def _draw_checkout(trace: Trace, trace_dir: Path, result: Result) -> None:
    from examples.eshop.tracing import checkout_root, draw, read_spans

    result.spans = read_spans(trace_dir)
    root = checkout_root(result.spans, TRACED_BUYER)
    if root is None:
        result.problems.append(f"no trace of {TRACED_BUYER}'s checkout in {trace_dir}")
        return
    trace.heading(f"The trace of {TRACED_BUYER}'s checkout ({len(result.spans)} spans recorded in all)")
    for line in draw(result.spans, root, short=trace.short):
        print(f"  {line}", file=trace.out)
    trace.out.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transport", help="the bus (default: sqlite:///<workdir>/bus.db)")
    parser.add_argument(
        "--workdir", type=Path, help="where databases and logs go (default: a temporary folder)"
    )
    parser.add_argument("--suffix", default="", help="appended to every service name (queues of their own)")
    parser.add_argument("--verbose", action="store_true", help="also trace the client's polling requests")
    parser.add_argument(
        "--trace", action="store_true", help="record OpenTelemetry spans; end with one checkout's trace"
    )
    parser.add_argument(
        "--dashboard", action="store_true", help="audit on, and the dashboard left running at the end"
    )
    parser.add_argument("--dashboard-port", type=int, default=8088, help="the dashboard's port (0: any)")
    return parser


def _stop_leftovers(holder: Sequence[Deployment]) -> None:
    """After a second Ctrl-C cut the clean stop short: no service may outlive the demo."""
    for deployment in holder:
        for service in deployment.services.values():
            if service.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(service.process.pid, signal.SIGKILL)


async def _main(args: argparse.Namespace, workdir: Path, holder: list[Deployment]) -> int:
    # SIGTERM to the demo stops it the way Ctrl-C does: the services are stopped, not orphaned.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    transport = args.transport or f"sqlite:///{workdir / 'bus.db'}"
    dashboard = None
    if args.dashboard:  # started first, so it sees the whole run (examples/eshop/dashboard.py)
        from examples.eshop.dashboard import DashboardProcess

        dashboard = await DashboardProcess.start(transport, workdir, args.dashboard_port)
    try:
        result = await run_demo(
            transport,
            workdir,
            suffix=args.suffix,
            verbose=args.verbose,
            deployment_holder=holder,
            traced=args.trace,
        )
        if dashboard is not None:
            await dashboard.stay(sys.stdout)
    finally:
        if dashboard is not None:
            code = await dashboard.stop()
    if dashboard is not None and code != 0:
        print(f"the dashboard exited with {code} (see {workdir / 'dashboard.log'})", file=sys.stderr)
        return 1
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="eshop-"))
    workdir.mkdir(parents=True, exist_ok=True)
    holder: list[Deployment] = []
    try:
        return asyncio.run(_main(args, workdir, holder))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: every service was stopped", file=sys.stderr)
        return 130
    finally:
        _stop_leftovers(holder)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
