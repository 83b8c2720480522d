"""Serving the emulator: in-process for tests, demos and benchmarks, or from the CLI."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import socket
import sys
from dataclasses import replace

import uvicorn
from starlette.types import ASGIApp

from gateway.emulator.app import EmulatorApp
from gateway.emulator.asgi import InjectedStreamCut
from gateway.emulator.config import EmulatorConfig, default_config, load_config

_HTTP = "httptools" if importlib.util.find_spec("httptools") else "h11"
_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


class _HideInjectedCuts(logging.Filter):
    """A deliberately cut stream is the emulator working, not an application error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None or not isinstance(record.exc_info[1], InjectedStreamCut)


def _hide_injected_cuts() -> None:
    server_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideInjectedCuts) for f in server_log.filters):
        server_log.addFilter(_HideInjectedCuts())


def create_app(config: EmulatorConfig) -> ASGIApp:
    """The emulator as a pure ASGI app."""
    _hide_injected_cuts()
    return EmulatorApp(config)


class EmulatorServer:
    """uvicorn serving the emulator on the current event loop.

    ``port=0`` picks a free port; ``url`` reports the bound one once started.
    """

    def __init__(self, config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self._app = EmulatorApp(config)
        self._host = host
        self._port = port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._bound_port: int | None = None

    @property
    def app(self) -> EmulatorApp:
        return self._app

    @property
    def url(self) -> str:
        if self._bound_port is None:
            raise RuntimeError("the emulator is not started")
        return f"http://{self._host}:{self._bound_port}"

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the emulator is already started")
        _hide_injected_cuts()
        # Binding here surfaces errors as OSError (uvicorn would sys.exit inside a task),
        # and tells us the port before the first request.
        sock = socket.create_server((self._host, self._port), reuse_port=False)
        self._bound_port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            http=_HTTP,
            lifespan="on",
            access_log=False,
            log_config=None,  # leave the host process's logging alone
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                sock.close()
                await self._task  # re-raises what went wrong
                raise RuntimeError("the emulator stopped during startup")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = None
        self._task = None
        self._bound_port = None

    async def __aenter__(self) -> EmulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``affinity-gateway emulate``."""
    parser.add_argument("--accounts", type=int, default=4, help="number of accounts (default 4)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9100, help="port (default 9100)")
    parser.add_argument("--config", help="YAML emulator config (overrides --accounts)")
    parser.add_argument("--seed", type=int, help="seed for output text and fault rolls")
    parser.add_argument("--time-scale", type=float, help="divide every duration by this factor")


def main(args: argparse.Namespace) -> int:
    """Run the emulator until interrupted."""
    config = load_config(args.config) if args.config else default_config(args.accounts)
    overrides = {"seed": args.seed, "time_scale": args.time_scale}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    app = create_app(config)
    names = ", ".join(spec.name for spec in config.accounts)
    print(f"emulating {len(config.accounts)} accounts ({names})", file=sys.stderr)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        http=_HTTP,
        loop=_LOOP,
        lifespan="on",
        access_log=False,
        log_level="info",
    )
    return 0
