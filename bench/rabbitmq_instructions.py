"""Instructions per message on RabbitMQ: the client side of `rabbitmq_throughput.py`, counted.

Wall-clock throughput on a shared 2-core machine swings by ±30 % from one minute to the next (the
broker shares the cores). Instructions do not: callgrind counts those the Python process executes,
whatever else runs. Each contender runs twice under `valgrind --tool=callgrind`, with a small and a
large message count; the difference divided by the difference in messages is the cost of one
message, start-up and imports left out. Both runs include the same short steady phase.

    .venv/bin/python bench/rabbitmq_instructions.py --only raw --only bus
    .venv/bin/python bench/rabbitmq_instructions.py --only bus --baseline /tmp/before   # a checkout

With `--baseline DIR` (another checkout of tidings, e.g. `git worktree add /tmp/before HEAD~3`),
the bus contender also runs from that checkout's `src/` and `bench/`, in the same invocation, and
the ratio of the two counts is printed: how a change moved the bus path's cost.

Slow: valgrind runs Python ~50x slower; each contender takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from callgrind import instructions_of

BENCH = Path(__file__).with_name("rabbitmq_throughput.py")


def instructions(contender: str, messages: int, url: str, checkout: Path | None = None) -> int:
    bench, env = BENCH, dict(os.environ)
    if checkout is not None:  # that checkout's code first on the path, and its benchmark script
        bench = checkout / "bench" / BENCH.name
        env["PYTHONPATH"] = os.pathsep.join([str(checkout / "src"), env.get("PYTHONPATH", "")])
    return instructions_of(
        [str(bench), "--url", url, "--only", contender, "--messages", str(messages), "--rate", "100",
         "--seconds", "1"],
        what=f"{contender} with {messages} messages", env=env,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=3000)
    parser.add_argument("--only", action="append", choices=["raw", "raw-ce", "port", "bus", "faststream"])
    parser.add_argument("--baseline", type=Path, help="another checkout: run the bus from it too")
    args = parser.parse_args()
    per_message: dict[str, float] = {}
    for contender in args.only or ["raw", "raw-ce", "bus", "faststream"]:
        small = instructions(contender, args.small, args.url)
        large = instructions(contender, args.large, args.url)
        per_message[contender] = (large - small) / (args.large - args.small)
        print(f"{contender:<11} {per_message[contender] / 1e6:6.3f} M instructions per message", flush=True)
    bus = per_message.get("bus")
    if args.baseline is not None:
        small = instructions("bus", args.small, args.url, args.baseline)
        large = instructions("bus", args.large, args.url, args.baseline)
        baseline = (large - small) / (args.large - args.small)
        print(f"{'bus@base':<11} {baseline / 1e6:6.3f} M instructions per message ({args.baseline})")
        if bus:
            print(f"bus / bus@base: {bus / baseline:.3f}x the instructions per message")
    for other in ("raw", "raw-ce", "faststream"):
        if bus and other in per_message:
            print(f"bus / {other}: {bus / per_message[other]:.2f}x the instructions per message")


if __name__ == "__main__":
    main()
