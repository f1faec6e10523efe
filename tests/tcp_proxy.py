"""A TCP proxy for tests: put it between a client and a server to cut, hold or slow the link.

    async with TcpProxy(("127.0.0.1", 5672)) as proxy:
        url = proxy.rewrite("amqp://guest:guest@127.0.0.1:5672/vhost")  # the client connects here
        proxy.upstream_latency = 0.01  # every chunk the client sends arrives 10 ms late
        proxy.cut()  # every live connection drops, as a failing network would; new ones are accepted
        proxy.pause()  # nothing moves either way (connections stay up) until resume()

It listens on 127.0.0.1 on a port of its own and opens one connection to the target per client
connection. Latency delays each chunk without throttling the link: chunks keep their order and
travel pipelined, as on a long cable. What is on its way (held by latency or a pause) when the
link is cut is lost, like bytes in a network that goes down.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self

__all__ = ["TcpProxy"]


class _Link:
    """One client connection and its connection to the target."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.cut = False

    def abort(self) -> None:
        self.cut = True
        self.client.transport.abort()
        self.server.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `target`; can cut, pause and slow what goes through."""

    def __init__(self, target: tuple[str, int], *, latency: float = 0.0) -> None:
        self.target = target
        #: Seconds each chunk from the client waits before it goes on to the target.
        self.upstream_latency = latency
        #: Seconds each chunk from the target waits before it goes on to the client.
        self.downstream_latency = latency
        #: Refuse new connections (accept and drop them at once): a server that is down.
        self.refusing = False
        #: Connections accepted (refused ones included), and bytes passed on each way.
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def live(self) -> int:
        """Connections open now."""
        return len(self._links)

    def rewrite(self, url: str) -> str:
        """`url` with the target's host:port replaced by the proxy's."""
        host, port = self.target
        where = f"{host}:{port}"
        if where not in url:
            raise ValueError(f"{url!r} does not name {where}")
        return url.replace(where, f"127.0.0.1:{self.port}", 1)

    async def start(self) -> int:
        """Listen; returns the port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def stop(self) -> None:
        """Cut everything and stop listening."""
        if self._server is not None:
            self._server.close()
        self.resume()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.stop()

    def cut(self) -> None:
        """Drop every live connection at once (a reset, both ways); what was on its way is lost."""
        for link in list(self._links):
            link.abort()
        self._links.clear()

    def pause(self) -> None:
        """Hold everything in both directions; the connections stay up."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    async def _accept(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.refusing:
            client.transport.abort()
            return
        try:
            server_reader, server = await asyncio.open_connection(*self.target)
        except OSError:
            client.transport.abort()
            return
        link = _Link(client, server)
        self._links.add(link)
        for reader, writer, upward in ((client_reader, server, True), (server_reader, client, False)):
            task = asyncio.create_task(self._forward(link, reader, writer, upward=upward))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _forward(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upward: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        # Read as fast as it comes and deliver each chunk when its latency has passed: a delay
        # of the link, not a limit on its throughput.
        chunks: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    latency = self.upstream_latency if upward else self.downstream_latency
                    chunks.put_nowait((loop.time() + latency, data))
            chunks.put_nowait(None)

        reading = asyncio.create_task(read())
        try:
            while (chunk := await chunks.get()) is not None:
                due, data = chunk
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                if link.cut:
                    return
                if upward:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                writer.write(data)
                with contextlib.suppress(OSError):
                    await writer.drain()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            # One side closed (or the link was cut): the other goes too, as with a real peer.
            self._links.discard(link)
            link.abort()
