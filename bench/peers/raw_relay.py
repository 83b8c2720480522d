"""The floor of a Python relay: one asyncio process (uvloop), httptools on both sides, no
ASGI server and no HTTP client library.

Every response chunk from the provider is framed and written to the client's transport
from the provider connection's `data_received`: no task wakes per chunk, no stream
reader, no `send` call. Kept-alive provider connections are pooled. The client picks the
account key; the relay passes the request through, as `asgi_floor.py` does. What the
`asgi-floor` row costs beyond this row is uvicorn's and aiohttp's own work.

    python bench/peers/raw_relay.py --upstream http://127.0.0.1:9100 --port 8091
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import cast

import httptools
from peer import ClientConnection, address, run_server


class Relay:
    """The provider's address and its idle kept-alive connections."""

    def __init__(self, upstream: str) -> None:
        self.host, self.port, self.host_header = address(upstream)
        self.idle: list[Upstream] = []

    def forward(self, head: bytes, body: bytes, client: Client) -> None:
        while self.idle:
            upstream = self.idle.pop()
            if not upstream.closed:
                upstream.start(head, body, client)
                return
        asyncio.get_running_loop().create_task(self._connect(head, body, client))

    async def _connect(self, head: bytes, body: bytes, client: Client) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        except OSError:
            client.fail()
            return
        upstream.start(head, body, client)


class Upstream(asyncio.Protocol):
    """One connection to the provider; relays one response at a time to its client."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.ctype = b"application/json"
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def start(self, head: bytes, body: bytes, client: Client) -> None:
        assert self.transport is not None
        self.client = client
        self.transport.writelines((head, body))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._drop()

    def on_message_begin(self) -> None:
        self.ctype = b"application/json"

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.ctype = value

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if self.client is not None:
            reason = HTTPStatus(status).phrase.encode()
            self.client.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n"
                % (status, reason, self.ctype)
            )

    def on_body(self, body: bytes) -> None:
        if self.client is not None:
            self.client.write(b"%x\r\n%s\r\n" % (len(body), body))

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.write(b"0\r\n\r\n")
        if self.parser.should_keep_alive():
            self.relay.idle.append(self)
        else:
            self._drop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.client is not None:
            self.client.fail()
            self.client = None

    def _drop(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Client(ClientConnection):
    """One client connection: requests in order, each forwarded once it is whole."""

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay

    def request(self, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        head = b"POST %s HTTP/1.1\r\nhost: %s\r\n%scontent-length: %d\r\n\r\n" % (
            path,
            self.relay.host_header,
            b"".join(b"%s: %s\r\n" % h for h in headers),
            len(body),
        )
        self.relay.forward(head, body, self)


async def serve(upstream: str, host: str, port: int) -> None:
    relay = Relay(upstream)
    server = await asyncio.get_running_loop().create_server(lambda: Client(relay), host, port)
    async with server:
        await server.serve_forever()


def main() -> None:
    run_server(serve, __doc__ or "")


if __name__ == "__main__":
    main()
