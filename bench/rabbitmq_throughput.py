"""Publish-to-handle throughput and latency on RabbitMQ: tidings beside raw aio-pika and FastStream.

Every contender does the same work with the same guarantees, on the same broker, in one process:
persistent messages into a durable quorum queue, every publish confirmed by the broker (at most
`--window` confirms outstanding), manual acks after the handler ran, `--prefetch` unacked at most.

- `raw aio-pika`: a robust connection per side, `Exchange.publish` with confirms, a consumer
  callback that acks. `raw + CE`: the same, each message carrying the CloudEvents attributes
  tidings puts on it (five `cloudEvents_*` headers, `message_id`, `content_type`).
- `tidings port`: `RabbitMQTransport.send` and `receive()` + `Delivery.ack()`.
- `tidings bus`: `Bus.send` of a `Command`, handled by `@bus.handle` in another `Bus` (decode,
  validation, pipeline, ack): the figure that counts.
- `faststream`: `RabbitBroker.publish(persist=True)` on a channel with publisher confirms, a
  `@broker.subscriber` with `AckPolicy.ACK` on a quorum `RabbitQueue`, prefetch on its channel.

Throughput = messages / (first publish to last handled). Latency = publish called to handler
entered, from a timestamp in the message. Then each contender runs at a steady `--rate` for
`--seconds`, for latency under a normal load. Run:

    .venv/bin/python bench/rabbitmq_throughput.py --url amqp://guest:guest@127.0.0.1:5672/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aio_pika

from tidings import Bus, Command, Context
from tidings.envelope import Envelope
from tidings.transports.rabbitmq import RabbitMQTransport


@dataclass
class Result:
    name: str
    mode: str
    messages: int
    seconds: float
    latencies: list[float]
    #: This process's CPU time (publisher and consumer together), per message.
    cpu_per_message: float = 0.0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


class Clock:
    """Collects latencies and tells when the last expected message was handled."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.latencies: list[float] = []
        self.done = asyncio.Event()
        self.seen: set[int] = set()

    def handled(self, seq: int, sent_at: float) -> None:
        if seq in self.seen:
            return  # a redelivery: not part of the measure
        self.seen.add(seq)
        self.latencies.append(time.perf_counter() - sent_at)
        if len(self.seen) == self.expected:
            self.done.set()


async def drive(
    send: Callable[[int], Awaitable[None]], count: int, *, window: int, rate: float | None
) -> None:
    """Call `send(seq)` `count` times, at most `window` at once, at `rate` per second if given."""
    slots = asyncio.Semaphore(window)
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()

    async def one(seq: int) -> None:
        try:
            await send(seq)
        finally:
            slots.release()

    for seq in range(count):
        if rate is not None:
            wait = start + seq / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
        await slots.acquire()
        task = asyncio.create_task(one(seq))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


def payload(seq: int) -> bytes:
    return json.dumps({"seq": seq, "sent_at": time.perf_counter()}).encode()


# -- raw aio-pika -------------------------------------------------------------------------------


def cloudevent_properties(seq: int) -> dict[str, object]:
    """What a CloudEvents-minded aio-pika service would put on a message: what tidings puts."""
    message_id = str(uuid.uuid4())
    return {
        "content_type": "application/json",
        "message_id": message_id,
        "headers": {
            "cloudEvents_id": message_id,
            "cloudEvents_source": "bench",
            "cloudEvents_type": "Work",
            "cloudEvents_specversion": "1.0",
            "cloudEvents_time": datetime.now(UTC).isoformat(),
        },
    }


async def raw_aio_pika(url: str, count: int, args: argparse.Namespace, rate: float | None) -> Result:
    return await _raw(url, count, args, rate, cloudevents=False)


async def raw_aio_pika_cloudevents(
    url: str, count: int, args: argparse.Namespace, rate: float | None
) -> Result:
    return await _raw(url, count, args, rate, cloudevents=True)


async def _raw(
    url: str, count: int, args: argparse.Namespace, rate: float | None, *, cloudevents: bool
) -> Result:
    queue_name = f"bench-raw-{uuid.uuid4().hex[:8]}"
    clock = Clock(count)
    publisher = await aio_pika.connect_robust(url)
    consumer = await aio_pika.connect_robust(url)
    try:
        channel = await publisher.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        consuming = await consumer.channel()
        await consuming.set_qos(prefetch_count=args.prefetch)
        queue_on_consumer = await consuming.get_queue(queue_name)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            body = json.loads(message.body)
            clock.handled(body["seq"], body["sent_at"])
            await message.ack()

        consumer_tag = await queue_on_consumer.consume(on_message)

        async def send(seq: int) -> None:
            extra = cloudevent_properties(seq) if cloudevents else {}
            await channel.default_exchange.publish(
                aio_pika.Message(
                    payload(seq),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    **extra,  # type: ignore[arg-type]
                ),
                queue_name,
            )

        start = time.perf_counter()
        await drive(send, count, window=args.window, rate=rate)
        await clock.done.wait()
        elapsed = time.perf_counter() - start
        await queue_on_consumer.cancel(consumer_tag)
        await queue.delete(if_unused=False, if_empty=False)
    finally:
        await consumer.close()
        await publisher.close()
    return Result("raw + CE" if cloudevents else "raw aio-pika", "", count, elapsed, clock.latencies)


# -- tidings: the transport port ----------------------------------------------------------------


async def tidings_port(url: str, count: int, args: argparse.Namespace, rate: float | None) -> Result:
    url = f"{url}{'&' if '?' in url else '?'}namespace=bench-{uuid.uuid4().hex[:8]}"
    clock = Clock(count)
    async with RabbitMQTransport.from_url(url) as producer, RabbitMQTransport.from_url(url) as consumer:
        await producer.declare_queue("work")

        async def consume() -> None:
            acking: set[asyncio.Task[None]] = set()
            async for delivery in consumer.receive("work", prefetch=args.prefetch):
                body = json.loads(delivery.body)
                clock.handled(body["seq"], body["sent_at"])
                # Acks overlap, as aio-pika's callbacks do: one at a time would measure latency.
                task = asyncio.create_task(delivery.ack())
                acking.add(task)
                task.add_done_callback(acking.discard)

        async def send(seq: int) -> None:
            await producer.send(Envelope(type="Work", source="bench", body=payload(seq)), "work")

        consuming = asyncio.create_task(consume())
        start = time.perf_counter()
        await drive(send, count, window=args.window, rate=rate)
        await clock.done.wait()
        elapsed = time.perf_counter() - start
        consuming.cancel()
        await asyncio.gather(consuming, return_exceptions=True)
        await delete_namespace(producer, ["work"])
    return Result("tidings port", "", count, elapsed, clock.latencies)


async def delete_namespace(transport: RabbitMQTransport, queues: list[str]) -> None:
    """Leave nothing behind: the queues (with their error queues) and the namespace's exchanges."""
    channel = await transport.connection().channel()
    topology = transport.topology
    for queue in queues:
        for name in (topology.queue(queue), topology.error_queue(queue)):
            await channel.queue_delete(name)
    for exchange in (topology.events_exchange, topology.commands_exchange, topology.errors_exchange,
                     topology.delayed_exchange):  # fmt: skip
        await channel.exchange_delete(exchange)
    await channel.close()


# -- tidings: the bus ---------------------------------------------------------------------------


class Work(Command):
    seq: int
    sent_at: float


async def tidings_bus(url: str, count: int, args: argparse.Namespace, rate: float | None) -> Result:
    url = f"{url}{'&' if '?' in url else '?'}namespace=bench-{uuid.uuid4().hex[:8]}"
    clock = Clock(count)
    worker = Bus("worker", url, concurrency=args.concurrency, prefetch=args.prefetch)
    sender = Bus("sender", url)
    sender.route(Work, to="worker")

    @worker.handle(Work)
    async def work(command: Work, ctx: Context) -> None:
        clock.handled(command.seq, command.sent_at)

    async with worker, sender:
        running = asyncio.create_task(worker.run())

        async def send(seq: int) -> None:
            await sender.send(Work(seq=seq, sent_at=time.perf_counter()))

        start = time.perf_counter()
        await drive(send, count, window=args.window, rate=rate)
        await clock.done.wait()
        elapsed = time.perf_counter() - start
        worker.stop()
        await running
        assert isinstance(worker.transport, RabbitMQTransport)
        await delete_namespace(worker.transport, ["worker", "sender"])
    return Result("tidings bus", "", count, elapsed, clock.latencies)


# -- FastStream ---------------------------------------------------------------------------------


async def faststream(url: str, count: int, args: argparse.Namespace, rate: float | None) -> Result:
    from faststream import AckPolicy
    from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue

    queue = RabbitQueue(
        f"bench-faststream-{uuid.uuid4().hex[:8]}",
        durable=True,
        queue_type=QueueType.QUORUM,
    )
    clock = Clock(count)
    consumer = RabbitBroker(url, default_channel=Channel(prefetch_count=args.prefetch), logger=None)
    publisher = RabbitBroker(url, default_channel=Channel(publisher_confirms=True), logger=None)

    @consumer.subscriber(queue, ack_policy=AckPolicy.ACK)
    async def handle(body: dict[str, float]) -> None:
        clock.handled(int(body["seq"]), body["sent_at"])

    async with consumer, publisher:
        await consumer.start()

        async def send(seq: int) -> None:
            await publisher.publish({"seq": seq, "sent_at": time.perf_counter()}, queue=queue, persist=True)

        start = time.perf_counter()
        await drive(send, count, window=args.window, rate=rate)
        await clock.done.wait()
        elapsed = time.perf_counter() - start
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue.name)
    return Result("faststream", "", count, elapsed, clock.latencies)


CONTENDERS = {
    "raw": raw_aio_pika,
    "raw-ce": raw_aio_pika_cloudevents,
    "port": tidings_port,
    "bus": tidings_bus,
    "faststream": faststream,
}


def report(results: list[Result]) -> None:
    print(f"{'contender':<14} {'mode':<10} {'msgs':>7} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'CPU us/msg':>10}")  # fmt: skip
    for result in results:
        print(
            f"{result.name:<14} {result.mode:<10} {result.messages:>7} {result.rate:>8,.0f} "
            f"{result.percentile(0.50):>8.1f} {result.percentile(0.99):>8.1f} "
            f"{result.cpu_per_message * 1e6:>10,.0f}"
        )


def ratios(results: list[Result], mode: str) -> None:
    by_name = {r.name: r for r in results if r.mode == mode}
    bus = by_name.get("tidings bus")
    for other in (by_name.get(name) for name in ("raw aio-pika", "raw + CE", "faststream")):
        if bus and other:
            print(f"{mode}: tidings bus / {other.name}: throughput {bus.rate / other.rate:.2f}x, "
                  f"p99 {bus.percentile(0.99) / other.percentile(0.99):.2f}x, "
                  f"CPU per message {bus.cpu_per_message / other.cpu_per_message:.2f}x")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=500, help="confirms outstanding at most")
    parser.add_argument("--prefetch", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64, help="the bus's handler slots")
    parser.add_argument("--rate", type=float, default=2_000, help="msg/s of the steady run")
    parser.add_argument("--seconds", type=float, default=10, help="length of the steady run")
    parser.add_argument("--rounds", type=int, default=1, help="repeat, interleaved, keep the best")
    parser.add_argument("--only", action="append", choices=sorted(CONTENDERS))
    args = parser.parse_args()
    names = args.only or list(CONTENDERS)
    results: list[Result] = []
    for mode, count, rate in (
        ("max", args.messages, None),
        (f"{args.rate:,.0f}/s", int(args.rate * args.seconds), args.rate),
    ):
        best: dict[str, Result] = {}
        for _ in range(args.rounds):
            for name in names:
                cpu = time.process_time()
                result = await CONTENDERS[name](args.url, count, args, rate)
                result.cpu_per_message = (time.process_time() - cpu) / count
                result.mode = mode
                if name not in best or (
                    result.rate > best[name].rate if rate is None else
                    result.percentile(0.99) < best[name].percentile(0.99)
                ):  # fmt: skip
                    best[name] = result
        results.extend(best.values())
    report(results)
    for mode in dict.fromkeys(r.mode for r in results):
        ratios(results, mode)


if __name__ == "__main__":
    asyncio.run(main())
