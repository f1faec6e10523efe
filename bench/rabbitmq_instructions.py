"""Instructions per message on RabbitMQ: the client side of `rabbitmq_throughput.py`, counted.

Wall-clock throughput on a shared 2-core machine swings by ±30 % from one minute to the next (the
broker shares the cores). Instructions do not: callgrind counts those the Python process executes,
whatever else runs. Each contender runs twice under `valgrind --tool=callgrind`, with a small and a
large message count; the difference divided by the difference in messages is the cost of one
message, start-up and imports left out. Both runs include the same short steady phase.

    .venv/bin/python bench/rabbitmq_instructions.py --only raw --only bus

Slow: valgrind runs Python ~50x slower; each contender takes a few minutes.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).with_name("rabbitmq_throughput.py")


def instructions(contender: str, messages: int, url: str) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
             str(BENCH), "--url", url, "--only", contender, "--messages", str(messages),
             "--rate", "100", "--seconds", "1"],
            check=False, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"{contender} with {messages} messages failed:\n{done.stderr[-2000:]}")
        found = re.search(r"^summary: (\d+)", out.read_text(), re.MULTILINE)
        assert found, f"no summary in callgrind's output for {contender}"
        return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=3000)
    parser.add_argument("--only", action="append", choices=["raw", "raw-ce", "port", "bus", "faststream"])
    args = parser.parse_args()
    per_message: dict[str, float] = {}
    for contender in args.only or ["raw", "raw-ce", "bus", "faststream"]:
        small = instructions(contender, args.small, args.url)
        large = instructions(contender, args.large, args.url)
        per_message[contender] = (large - small) / (args.large - args.small)
        print(f"{contender:<11} {per_message[contender] / 1e6:6.3f} M instructions per message", flush=True)
    bus = per_message.get("bus")
    for other in ("raw", "raw-ce", "faststream"):
        if bus and other in per_message:
            print(f"bus / {other}: {bus / per_message[other]:.2f}x the instructions per message")


if __name__ == "__main__":
    main()
