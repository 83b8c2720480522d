"""What the Python peers of bench.overhead share: their command line and how they run.

Each peer is a script run by path (`python bench/peers/NAME.py --upstream URL --port N`),
so the scripts import this module as `peer`, from their own directory. Nothing is
imported here that a peer does not use: the raw relays load neither uvicorn nor starlette
(peak RSS is one of the benchmark's columns).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit

import httptools

Serve = Callable[[str, str, int], Coroutine[Any, Any, None]]
# The request headers every peer passes on: the client picks the account key.
FORWARD = frozenset({b"authorization", b"x-api-key", b"content-type", b"anthropic-version"})


class Address(NamedTuple):
    """Where the provider listens, and the Host header that names it."""

    host: str
    port: int
    host_header: bytes


def address(upstream: str) -> Address:
    parts = urlsplit(upstream)
    return Address(parts.hostname or "127.0.0.1", parts.port or 80, parts.netloc.encode())


async def read_body(receive: Callable[[], Awaitable[dict[str, Any]]]) -> bytes:
    """An ASGI request's whole body."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def arguments(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    return parser.parse_args()


def run_server(serve: Serve, doc: str) -> None:
    """A peer that is its own server: ``serve(upstream, host, port)`` on uvloop."""
    args = arguments(doc)
    main = serve(args.upstream, args.host, args.port)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def run_asgi(app: Callable[[str], Any], doc: str) -> None:
    """A peer that is an ASGI app: ``app(upstream)`` under uvicorn (uvloop, httptools), as
    the gateway is served."""
    import uvicorn

    args = arguments(doc)
    uvicorn.run(
        app(args.upstream),
        host=args.host,
        port=args.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        access_log=False,
        log_level="warning",
    )


class ClientConnection(asyncio.Protocol):
    """One client connection of a peer that is its own server, parsed by httptools: each
    request, once whole, goes to ``request`` with its path, its FORWARD headers and body."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def request(self, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        raise NotImplementedError

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
        if name.lower() in FORWARD:
            self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.request(b"".join(self.url), self.headers, b"".join(self.body))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def fail(self) -> None:
        if self.transport is not None:
            self.transport.close()
