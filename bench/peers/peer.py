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
from collections.abc import Callable, Coroutine
from typing import Any

Serve = Callable[[str, str, int], Coroutine[Any, Any, None]]


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
