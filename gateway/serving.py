"""Serve an ASGI app with uvicorn on the running event loop (tests, demo, benchmarks)."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
from typing import Self

import uvicorn
from starlette.types import ASGIApp

HTTP_IMPL = "httptools" if importlib.util.find_spec("httptools") else "h11"
LOOP_IMPL = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose connections send small writes at once.

    Sockets accepted from it inherit TCP_NODELAY: without it, an SSE chunk or a small
    response on a kept-alive connection can wait ~40 ms for the peer's delayed ACK.
    """
    sock = socket.create_server((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class AppServer:
    """uvicorn on the current loop. ``port=0`` picks a free port; ``url`` tells which."""

    def __init__(
        self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, graceful: int = 1
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.graceful = graceful
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not started")  # the port is not bound yet
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the server is already started")
        # Bind here: errors surface as OSError (uvicorn would sys.exit inside a task),
        # and the port is known before the first request.
        sock = listen(self.host, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            http=HTTP_IMPL,
            lifespan="on",
            access_log=False,
            server_header=False,
            log_config=None,  # leave the host process's logging alone
            timeout_graceful_shutdown=self.graceful,
        )
        self._server = server = uvicorn.Server(config)
        self._task = task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                sock.close()
                await task
                raise RuntimeError("the server stopped during startup")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = None
        self._task = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
