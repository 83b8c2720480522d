"""Half of the asgi-floor hop: uvicorn serving an ASGI app, with the provider reached over
raw kept-alive asyncio connections parsed by httptools instead of an aiohttp session.

Chunks reach the request's task through one future per wake-up, as they would for any
ASGI app (its `send` is a coroutine): the row prices uvicorn and the ASGI hand-off, and
`asgi-floor` minus this row is aiohttp's own share.

    python bench/peers/uvicorn_raw.py --upstream http://127.0.0.1:9100 --port 8092
"""

from __future__ import annotations

import asyncio
from typing import cast

import httptools
from peer import FORWARD, address, read_body, run_asgi
from starlette.types import Receive, Scope, Send


class Upstream(asyncio.Protocol):
    """One kept-alive provider connection; one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.ctype = b"application/json"
        self.chunks: list[bytes] = []
        self.headers_done = False
        self.done = False
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.ctype = b"application/json"
        self.headers_done = self.done = False
        self.transport.writelines((head, body))

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.connection_lost(None)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.ctype = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.done = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.done = self.headers_done = True
        self._wake()


class Passthrough:
    def __init__(self, upstream: str) -> None:
        self.host, self.port, self.host_header = address(upstream)
        self.idle: list[Upstream] = []

    async def _connection(self) -> Upstream:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Upstream, self.host, self.port)
        return conn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = await read_body(receive)
        headers = b"".join(b"%s: %s\r\n" % (k, v) for k, v in scope["headers"] if k in FORWARD)
        head = b"POST %s HTTP/1.1\r\nhost: %s\r\n%scontent-length: %d\r\n\r\n" % (
            scope["raw_path"],
            self.host_header,
            headers,
            len(body),
        )
        conn = await self._connection()
        conn.send(head, body)
        while not conn.headers_done:
            await conn.wait()
        await send(
            {
                "type": "http.response.start",
                "status": conn.status or 502,
                "headers": [(b"content-type", conn.ctype)],
            }
        )
        while True:
            if conn.chunks:
                ready, conn.chunks = conn.chunks, []
                for chunk in ready:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            elif conn.done:
                break
            else:
                await conn.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if not conn.closed and conn.parser.should_keep_alive():
            self.idle.append(conn)


def main() -> None:
    run_asgi(Passthrough, __doc__ or "")


if __name__ == "__main__":
    main()
