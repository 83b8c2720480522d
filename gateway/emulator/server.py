"""Serving the emulator: in-process for tests, demos and benchmarks, or from the CLI."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from dataclasses import replace

import uvicorn
from starlette.types import ASGIApp

from gateway.emulator.app import EmulatorApp
from gateway.emulator.asgi import InjectedStreamCut
from gateway.emulator.config import EmulatorConfig, default_config, load_config
from gateway.serving import AppServer

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


class EmulatorServer(AppServer):
    """uvicorn serving the emulator on the current event loop.

    ``port=0`` picks a free port; ``url`` reports the bound one once started.
    """

    app: EmulatorApp

    def __init__(self, config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(EmulatorApp(config), host, port)

    async def start(self) -> None:
        _hide_injected_cuts()
        await super().start()


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
