"""The other half of the asgi-floor hop: one aiohttp session reaching the provider, behind
a raw asyncio server parsed by httptools instead of uvicorn.

Each request runs in a task of its own (as under any server: the aiohttp calls are
coroutines) and writes the provider's chunks to the client's transport as they come:
the row prices aiohttp, and `asgi-floor` minus this row is uvicorn's and ASGI's share.

    python bench/peers/raw_aiohttp.py --upstream http://127.0.0.1:9100 --port 8093
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import cast

import aiohttp
import httptools
from peer import run_server

_FORWARD = frozenset({b"authorization", b"x-api-key", b"content-type", b"anthropic-version"})


class Client(asyncio.Protocol):
    """One client connection: each request, once whole, is forwarded by a task."""

    def __init__(self, upstream: str, session: aiohttp.ClientSession) -> None:
        self.upstream = upstream
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url: list[bytes] = []
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail()

    def on_message_begin(self) -> None:
        self.url = []
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in _FORWARD:
            self.headers.append((name.decode(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url = self.upstream + b"".join(self.url).decode()
        task = asyncio.get_running_loop().create_task(
            self.forward(url, self.headers, b"".join(self.body))
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def forward(self, url: str, headers: list[tuple[str, str]], body: bytes) -> None:
        try:
            async with self.session.post(url, data=body, headers=headers) as resp:
                ctype = resp.headers.get("content-type", "application/json").encode()
                reason = HTTPStatus(resp.status).phrase.encode()
                self.write(
                    b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n"
                    % (resp.status, reason, ctype)
                )
                async for chunk in resp.content.iter_any():
                    self.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.write(b"0\r\n\r\n")
        except aiohttp.ClientError:
            self.fail()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def fail(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(upstream: str, host: str, port: int) -> None:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    ) as session:
        base = upstream.rstrip("/")
        server = await asyncio.get_running_loop().create_server(
            lambda: Client(base, session), host, port
        )
        async with server:
            await server.serve_forever()


def main() -> None:
    run_server(serve, __doc__ or "")


if __name__ == "__main__":
    main()
