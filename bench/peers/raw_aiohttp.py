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

import aiohttp
from peer import ClientConnection, run_server


class Client(ClientConnection):
    """One client connection: each request, once whole, is forwarded by a task."""

    def __init__(self, upstream: str, session: aiohttp.ClientSession) -> None:
        super().__init__()
        self.upstream = upstream
        self.session = session
        self.tasks: set[asyncio.Task[None]] = set()

    def request(self, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        url = self.upstream + path.decode()
        named = [(k.decode(), v.decode()) for k, v in headers]
        task = asyncio.get_running_loop().create_task(self.forward(url, named, body))
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
