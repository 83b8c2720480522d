"""The floor of the gateway's own stack: uvicorn (uvloop, httptools) and one pooled aiohttp
session forwarding each request to the provider, with no middleware at all.

The client picks the account key; this proxy passes the request through and streams
every response chunk back as it arrives, as the gateway's upstream app does. Whatever
the gateway costs beyond this row is its own work: auth, parsing, fingerprinting,
routing state, metering.

    python bench/peers/asgi_floor.py --upstream http://127.0.0.1:9100 --port 8090
"""

from __future__ import annotations

import aiohttp
from peer import FORWARD, read_body, run_asgi
from starlette.types import Receive, Scope, Send


class Passthrough:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        assert self.session is not None
        body = await read_body(receive)
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k in FORWARD]
        url = self.upstream + scope["path"]
        async with self.session.post(url, data=body, headers=headers) as resp:
            ctype = resp.headers.get("content-type", "application/json").encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": resp.status,
                    "headers": [(b"content-type", ctype)],
                }
            )
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                    auto_decompress=False,
                    skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def main() -> None:
    run_asgi(Passthrough, __doc__ or "")


if __name__ == "__main__":
    main()
